"""Integrations with other libraries, each an optional extra that imports its library only when it is imported:

* :mod:`fastmtl.integrations.flair`: ``accelerate(tagger)`` runs a flair ``SequenceTagger``'s LSTMs and CRF on
  fastmtl's kernels (``pip install fastmtl[flair]``).
"""
