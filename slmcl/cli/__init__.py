"""The `slmcl` command line: run, validate, metrics, stability, and the client commands that installed
packages add through the `slmcl.commands` entry point.
"""
