"""The commands of the ``iodine-pyro`` command line, one module per command group.

`train` (fit, ablate), `evaluate`, `posterior` (sample, compare), `plot` (one subcommand
per figure) and `data` (generate, info, convert, show); `options` declares the options
they share and their checks once. `iodine_pyro.cli` builds the Typer app from them.
"""
