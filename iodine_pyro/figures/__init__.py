"""The paper's figures of trained runs, each written as a PNG and the data behind it.

=================  ===============  ==============  ==========================================
kind               function         paper figures   data file next to ``FILE.png``
=================  ===============  ==============  ==========================================
decomposition      `decomposition`  16 to 19        ``FILE.npz``: ``image`` [N, C, H, W],
                                                    ``recon`` [N, S, C, H, W], ``masks``
                                                    [N, S, K, H, W], ``means`` [N, S, K, C, H, W],
                                                    ``step`` [S] (1-based refinement steps),
                                                    ``image_index`` [N]
sequence           `sequence`       12              ``FILE.npz``: ``image``, ``recon``
                                                    [F, C, H, W], ``masks`` [F, K, H, W],
                                                    ``true_masks`` [F, G, H, W], ``frame`` [F],
                                                    ``image_index``
mask-logits        `mask_logits`    20 to 22        ``FILE.npz``: ``image`` [N, C, H, W],
                                                    ``masks``, ``mask_logits`` [N, K, H, W],
                                                    ``true_masks`` [N, G, H, W], ``image_index``
traversal          `traversal`      30 to 32        ``FILE.npz``: ``image`` [C, H, W],
                                                    ``image_index``, ``slot``, ``posterior_mean``
                                                    [K, n_z], ``kl`` [n_z], ``dims`` [D] (the
                                                    rows: most KL first), ``offsets`` [V]
                                                    (prior sd), ``values`` [D, V], ``renders``
                                                    [D, V, C, H, W] (rows in ``dims`` order),
                                                    ``recon`` [C, H, W], ``slot_mask`` [H, W]
projection         `projection`     24 to 29        ``FILE.npz``: one row per matched object:
                                                    ``latent`` [M, n_z], ``pca`` [M, 2],
                                                    ``pca_explained`` [2], ``tsne`` [M, 2],
                                                    ``image_index``, ``group``, ``slot``, ``iou``
                                                    [M], ``factor_<name>`` [M] or [M, 3]
curves             `curves`         (training)      ``FILE.json``: ``{"keys", "smooth", "runs":
                                                    [{"label", "run_dir", "step": [...],
                                                    "loss": [...], ...}]}`` (null for missing)
ablation           `ablation`       33 to 40        ``FILE.json``: as curves, one run per
                                                    ablation (``full``, ``no-<input>``)
=================  ===============  ==============  ==========================================

Figures that run the model take a `iodine_pyro.run.Run` (or what `Run.open` takes: a run
directory, a checkpoint file, ``pretrained:NAME``) and read the run's held-out images
unless ``data`` names another dataset. This is the package's one figure toolkit:
`fit`'s pictures, the ``plot`` figures, multi-stability, the guide comparison and ``data
show`` all draw with it. Every random choice
(posterior samples, the traversal's image and slot, t-SNE) follows ``seed``, so the same
arguments give the same PNG, byte for byte.

Each figure computes apart from drawing: ``KIND_arrays`` (``curves_data`` for the curves)
runs the model or reads the metrics and returns the data file's arrays, with torch but no
matplotlib; ``draw_KIND`` draws such arrays; the figure's own function calls both and hands
the data and the drawing to `write_figure` (``files.py``), which writes the data file and
the PNG as a pair, both whole or neither (`iodine_pyro.io`'s staged files). matplotlib is
imported only by the drawing functions (``drawing.py``: Agg, slot colours, the panels), so
importing this package, or a module that draws with it only on demand, loads none.

=================  ==========================================================================
module             holds
=================  ==========================================================================
files.py           `FigureFiles`, `save_figure` (one PNG, whole) and `write_figure` (the pair)
inputs.py          the computing side's shared pieces: a run and its data, images, seed
drawing.py         the drawing side's shared pieces: matplotlib, `slot_colors`, the panels
decompositions.py  decomposition, sequence, mask-logits
traversals.py      traversal
projections.py     projection
training.py        curves, ablation, learning speed, branches of a resumed run
datasets.py        ``data show``'s grid of images and ground-truth masks
comparison.py      the guide comparison's ELBO, FG-ARI and MSE panels
=================  ==========================================================================
"""


from __future__ import annotations

from .comparison import draw_comparison
from .datasets import dataset_grid, dataset_grid_arrays
from .decompositions import (decomposition, decomposition_arrays, draw_decomposition, draw_mask_logits,
                             draw_sequence, mask_logits, mask_logits_arrays, sequence, sequence_arrays)
from .files import DPI, FigureFiles, save_figure, write_figure
from .projections import CATEGORICAL, RGB_NAMES, draw_projection, projection, projection_arrays
from .training import (BRANCH_KEYS, CURVE_KEYS, CURVE_LABELS, FEW_POINTS, ablation, ablation_runs, branch_curves,
                       curves, curves_data, draw_branches, draw_curves, draw_learning_speed)
from .traversals import TRAVERSAL_DIMS, draw_traversal, traversal, traversal_arrays

__all__ = [
    "FigureFiles", "decomposition", "sequence", "mask_logits", "traversal", "projection", "curves",
    "ablation", "ablation_runs", "save_figure", "slot_colors", "write_figure",
    "decomposition_arrays", "sequence_arrays", "mask_logits_arrays", "traversal_arrays",
    "projection_arrays", "curves_data", "dataset_grid_arrays",
    # the drawing halves and the constants other modules and tests use
    "draw_comparison", "dataset_grid", "draw_decomposition", "draw_mask_logits", "draw_sequence", "DPI",
    "CATEGORICAL", "RGB_NAMES", "draw_projection", "CURVE_KEYS", "CURVE_LABELS", "FEW_POINTS", "draw_curves",
    "draw_learning_speed", "BRANCH_KEYS", "branch_curves", "draw_branches", "TRAVERSAL_DIMS", "draw_traversal",
]

_DRAWING = ("slot_colors",)   # names of the drawing side, imported (with matplotlib) when first used


def __getattr__(name: str):
    if name in _DRAWING:
        from . import drawing

        value = globals()[name] = getattr(drawing, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_DRAWING})
