"""(in progress)"""
multitask_cross_entropy = multitask_predict = None  # TEMP local stub, not committed
