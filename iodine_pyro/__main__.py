"""``python -m iodine_pyro``: the command line."""

from .cli import main

main()
