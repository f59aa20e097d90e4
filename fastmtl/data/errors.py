"""The one error type of the data layer: names the file, the line and what was wrong."""


class DataFormatError(ValueError):
    """A malformed data file. ``str(err)`` is ``"<path>:<line>: <problem>"``."""

    def __init__(self, path, line, problem):
        self.path, self.line, self.problem = str(path), line, problem
        where = "%s:%d" % (self.path, line) if line is not None else self.path
        super().__init__("fastmtl: %s: %s" % (where, problem))
