"""Held-out curves of a long run and of the copies resumed from it with one lever changed.

A long training (Multi-dSprites here) is studied by branching: at a step of the run, a copy
of its directory is resumed with another schedule (`fit --resume --config ...`, `--lr`,
`--num-slots`) beside the run's own continuation, and both are evaluated on the same
held-out images as they go. Their rows live in a results file, one JSON object per
evaluation, with the fields of `evaluate --json`'s last refinement step and

* ``arm``: the line the row belongs to;
* ``parent``: on the rows of a branch, ``{"arm": ..., "step": ...}``, the arm and step it
  was copied from (the parent's evaluation at that step starts the branch's curve);
* ``step`` and ``cpu_min``: the training step and the run's CPU minutes at the evaluation.

This draws FG-ARI, ARI, the largest background share and MSE (``--keys``) of every arm
against the step, and writes the plotted points beside the picture:

    python benchmarks/branch_curves.py docs/img/multi_dsprites_background_results.jsonl \\
        --variant fast-anneal-0.2-k7-goal-after-split --out docs/img/multi_dsprites_k6_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from iodine_pyro.figures import BRANCH_KEYS, CURVE_LABELS, draw_branches


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="results file: one JSON object per held-out evaluation")
    p.add_argument("--out", type=Path, required=True, help="the PNG (its .json beside it)")
    p.add_argument("--variant", help="only the rows of this variant")
    p.add_argument("--keys", nargs="+", default=list(BRANCH_KEYS), choices=sorted(CURVE_LABELS))
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    rows = [json.loads(line) for line in a.results.read_text().splitlines() if line.strip()]
    if a.variant is not None:
        rows = [r for r in rows if r.get("variant") == a.variant]
    if not rows:
        p.error(f"no rows in {a.results}" + (f" of variant {a.variant!r}" if a.variant else ""))
    title = a.title or f"{a.variant or a.results.stem}: held-out metrics, last refinement step"
    try:
        files = draw_branches(rows, a.out, a.keys, title)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {files.png} and {files.data}")


if __name__ == "__main__":
    main()
