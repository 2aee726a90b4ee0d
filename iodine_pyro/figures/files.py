"""A figure's files: the PNG and the data behind it, written as a pair.

Every figure ends the same way: its data file (``FILE.npz`` or ``FILE.json``, beside
``FILE.png``) is staged, the picture is drawn, and the PNG's rename puts both in place
(`write_figure`). Nothing here imports matplotlib: a figure object is closed through the
drawing side only once one exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..io import atomic_file, commit, discard, stage_npz, stage_text

DPI = 100


@dataclass(frozen=True)
class FigureFiles:
    """The files a figure wrote: the PNG and the data behind it."""

    png: Path
    data: Path


def save_figure(fig, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` to `path` (creating its folder) and close it: whole or not at all, and
    together with the data file staged for it (`iodine_pyro.io`: temporary files, then
    renames; a full disk or a read-only folder leaves neither file and names the path;
    never through a link)."""
    from .drawing import plt

    path = Path(path)
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, dpi=dpi, format=path.suffix.lower().lstrip(".") or None)
    except BaseException:
        discard(path)
        raise
    finally:
        plt.close(fig)
    commit(path)
    return path


def write_figure(data: Mapping[str, Any] | str, png: str | Path, draw: Callable[[Path], Any]) -> FigureFiles:
    """Write a figure's data file and its PNG as a pair: both whole, or neither.

    `data` is staged first, beside `png` and bound to it (`iodine_pyro.io.stage_npz` for a
    mapping of arrays -> ``FILE.npz``, `stage_text` for JSON text, written as given ->
    ``FILE.json``); then ``draw(png)`` draws the picture and writes it with `save_figure`,
    whose rename puts the staged file in place in the same journaled step. A kill between
    the two renames is finished by the next write in the folder (`iodine_pyro.io.finish_pairs`),
    so a PNG and a data file from different runs are never left side by side; a failure
    before the PNG is in place (the drawing's own included) removes the staged file.
    """
    png = png_path(png)
    target = data_path(png, ".json" if isinstance(data, str) else ".npz")
    if isinstance(data, str):
        stage_text(target, data, companion=png)
    else:
        stage_npz(target, data, companion=png)
    try:
        draw(png)
    except BaseException:
        discard(png)
        raise
    return FigureFiles(png, target)


def png_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    return out


def data_path(png: Path, suffix: str) -> Path:
    """The data file next to `png`: staged (`iodine_pyro.io.stage_npz`, `stage_text`) and put
    in place only together with the PNG (`save_figure`)."""
    return png.with_suffix(suffix)
