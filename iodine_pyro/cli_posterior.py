"""Commands `sample` and `compare` (posterior samples, guide comparison)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
