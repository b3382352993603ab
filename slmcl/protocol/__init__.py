"""The stage protocol shared by every host: the key layout of a results tree, the stage and training
records, train/measure/commit of a stage, drift aggregation, tables, events, and the embedded runner
that drives it in one process. Importing it needs no torch (the monitor uses it without a model).
"""
