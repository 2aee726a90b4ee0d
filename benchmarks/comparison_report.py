"""The published comparison of the shipped guides: docs/comparison.md's results, the README's headline.

    python benchmarks/comparison_report.py                         # 256 held-out images, ~1 h on 1 thread
    python benchmarks/comparison_report.py --num-images 64 --time-limit 10m

1. runs `iodine_pyro.compare.compare` on every shipped model of one dataset (IODINE's
   iterative guide, the amortized VAE, the slot-attention guide) on the held-out images of
   the first (all shipped Tetrominoes models share them), with the command line's defaults
   (S = 1000 importance samples, q* from two starts with its stopping rule, generalisation);
2. writes its report, ``compare.json``, ``compare.md`` and ``compare.png``, to
   ``docs/img/comparison/``;
3. puts the report's tables and figure into docs/comparison.md and a headline table into
   the README, each between its two markers.

Run it again whenever a shipped model changes.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from iodine_pyro.commands.options import parse_duration
from iodine_pyro.compare import compare, write_report
from iodine_pyro.compare.report import _fmt, _pm  # the report's own number formats
from iodine_pyro.run import PRETRAINED_PREFIX, pretrained_models

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "comparison"
DOC_START, DOC_END = "<!-- results: benchmarks/comparison_report.py -->", "<!-- end of results -->"
README_START, README_END = "<!-- comparison: benchmarks/comparison_report.py -->", "<!-- end of comparison -->"
MODELS = ("tetrominoes", "tetrominoes-amortized", "tetrominoes-slot_attention")


def between(text: str, start: str, end: str, body: str) -> str:
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a] + "\n" + body.strip("\n") + "\n" + text[b:]


def headline(result: dict) -> str:
    """One row per guide at its trained step: what a reader wants first."""
    rows = ["| guide | model | decoder passes | ELBO | log p(x) | amortization gap | approximation gap "
            "| k-hat | FG-ARI | ARI | CPU ms / image |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        t = r["final_step"] - 1
        pm = lambda k, i=None: _pm(r, k, ".1f", i)
        cpu = r["cpu_seconds"][t] * 1000 if r.get("cpu_seconds") else float("nan")
        rows.append(f"| {r['guide']} | `{PRETRAINED_PREFIX}{name.removeprefix('pretrained-')}` | {r['final_step']} | "
                    f"{pm('elbo', t)} | {pm('log_px')} | {pm('amortization_gap', t)} | {pm('approximation_gap')} | "
                    f"{_fmt(r.get('khat'), '.2f')} | {_fmt(r['fg_ari'][t], '.3f')} | {_fmt(r['ari'][t], '.3f')} | "
                    f"{_fmt(cpu, '.1f')} |")
    s = result["settings"]
    lowered = (f" Settings lowered to fit {s['time_limit'] / 60:.0f} minutes on this CPU (S = {s['evidence_samples']} "
               f"importance samples, q* capped at {s['gap_steps']} steps on {s['gap_images']} images): log p(x), "
               f"the approximation gap and k-hat are not reliable at these settings." if s.get("reduced_for_time") else "")
    return ("\n".join(rows) + f"\n\nNats per image, mean ± standard error over {s['num_images']} held-out images; "
            f"each guide with the decoder it was trained with.{lowered} Details: "
            f"[docs/comparison.md](docs/comparison.md).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--time-limit", default="none", help="as compare's --time-limit (default: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-json", action="store_true",
                   help="rewrite the pages from docs/img/comparison/compare.json without comparing again")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.from_json:
        result = json.loads((OUT / "compare.json").read_text())
    else:
        shipped = pretrained_models()
        missing = [m for m in MODELS if m not in shipped]
        if missing:
            raise SystemExit(f"not shipped: {', '.join(missing)} (benchmarks/ship_pretrained.py ships a run)")
        limit = None if a.time_limit.strip().lower() == "none" else parse_duration(a.time_limit)
        result = compare([PRETRAINED_PREFIX + m for m in MODELS], num_images=a.num_images, time_limit=limit,
                         progress=True)
        n, seed = shipped[MODELS[0]].held_out                # a page names the set, not this machine's cache
        result["settings"]["data"] = f"the shipped models' held-out set (generated: {n} images, seed {seed})"
    paths = write_report(result, OUT)
    report = paths["table"].read_text()
    report = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", report, flags=re.M)   # under "## Results"
    doc = ROOT / "docs" / "comparison.md"
    doc.write_text(between(doc.read_text(), DOC_START, DOC_END,
                           f"![ELBO and FG-ARI against refinement step and decoder passes](img/comparison/compare.png)"
                           f"\n\n{report}"))
    readme = ROOT / "README.md"
    readme.write_text(between(readme.read_text(), README_START, README_END, headline(result)))
    print(headline(result))


if __name__ == "__main__":
    main()
