"""Deploy tooling: package, upload, register, deploy, autoscale, invoke, batch, teardown.

A Python API (one module per step, each a function taking an :class:`AwsContext`) with
a thin CLI over it: ``python -m s1_mini.deploy <subcommand> --help``.
"""
