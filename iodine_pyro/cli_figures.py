"""Commands `plot` and `ablate` (the paper's figures and input ablations)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
