"""(in progress)"""
MultiTaskHeads = SequenceTask = TokenTask = TaskOutput = None  # TEMP local stub, not committed
