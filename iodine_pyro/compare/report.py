"""The comparison's report: compare.md's tables and compare.json, written with the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .protocol import DECODERS


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _pm(r: dict[str, Any], key: str, spec: str, t: int | None = None) -> str:
    """A mean with its standard error, from ``r[key]`` and ``r[key + "_se"]`` (at step t)."""
    v, se = r.get(key), r.get(f"{key}_se")
    if t is not None:
        v, se = (v[t] if v is not None else None), (se[t] if se is not None else None)
    text = _fmt(v, spec)
    return text if text == "n/a" or se is None or math.isnan(se) else f"{text} ± {format(se, spec)}"


def markdown_table(result: dict[str, Any]) -> str:
    """The summary at each run's trained step (means ± standard errors over images), the
    protocol's settings, generalisation, and per-step tables of guides with several steps."""
    s = result["settings"]
    S = s.get("evidence_samples", 0)
    lines = [f"# Guide comparison on {s['num_images']} images of {s['data']}", "",
             f"Decoder fixed per model: {s.get('decoders', DECODERS)}."
             + (f" Networks in {s['precision']}." if s.get("precision", "float32") != "float32" else ""), "",
             f"log p(x): importance sampling with the guide's posterior as proposal, S = {S}; per-step "
             f"ELBO and IWAE with {s['iw_samples']} samples; q*: a per-image diagonal Gaussian fitted "
             f"from the guide's posterior and from the prior (the better per image), Adam lr {s['gap_lr']}, "
             f"checked every {s.get('gap_check_every', 'n/a')} steps, stopped after "
             f"{s.get('gap_patience', 'n/a')} checks without improvement or {s['gap_steps']} steps"
             + (f", on the first {s['gap_images']} images (and the generalisation too)"
                if s.get("gap_images", s["num_images"]) < s["num_images"] else "")
             + f"; seed {s['seed']}"
             + (f"; scenes merged from {s['merge_scenes']} images, "
                f"{_fmt(s['objects_per_image'], '.2f')} objects per scene" if s["merge_scenes"] > 1 else "")
             + ". Nats per image, mean ± standard error over images."
             + (f" Lowered to fit the time limit of {s['time_limit']:.0f} s" if s.get("reduced_for_time") else "")
             + (f", which even the lowest settings exceed (about {s['planned_seconds']:.0f} s planned)."
                if s.get("reduced_for_time") and s["planned_seconds"] > s["time_limit"]
                else "." if s.get("reduced_for_time") else ""),
             "",
             "| run | guide | K | step | ELBO | IWAE | log p(x) | ELBO(q*) | approximation gap | amortization gap "
             "| k-hat (> 0.7) | q* steps (guide / prior) | KL | NLL | MSE | FG-ARI | ARI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        t = r["final_step"] - 1
        khat = (f"{_fmt(r.get('khat'), '.2f')} ({_fmt(r.get('khat_above_0.7'), '.0%')})"
                if "khat" in r else "n/a")
        lines.append(f"| {name} | {r['guide']} | {r['num_slots']} | {r['final_step']} | {_pm(r, 'elbo', '.1f', t)} | "
                     f"{_pm(r, 'iwae', '.1f', t)} | {_pm(r, 'log_px', '.1f')} | {_pm(r, 'optimized_elbo', '.1f')} | "
                     f"{_pm(r, 'approximation_gap', '.1f')} | {_pm(r, 'amortization_gap', '.1f', t)} | {khat} | "
                     f"{_fmt(r.get('gap_steps_from_guide'), '.0f')} / {_fmt(r.get('gap_steps_from_prior'), '.0f')} | "
                     f"{_fmt(r['kl'][t], '.1f')} | {_fmt(r['nll'][t], '.1f')} | {_fmt(r['mse'][t], '.5f')} | "
                     f"{_fmt(r['fg_ari'][t], '.3f')} | {_fmt(r['ari'][t], '.3f')} |")
    general = [(n, r["generalization"]) for n, r in result["runs"].items() if "generalization" in r]
    if general:
        lines += ["", "## Generalisation: more objects, other K (final step)", "",
                  "| run | scenes | objects | K | ELBO | IWAE | MSE | FG-ARI | ARI |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, g in general:
            if "skipped" in g:
                lines.append(f"| {name} | skipped: {g['skipped']} | | | | | | | |")
                continue
            for key, row in g.items():
                if key.startswith("K="):
                    lines.append(f"| {name} | merged from {g['merge_scenes']} | "
                                 f"{_fmt(g['objects_per_image'], '.2f')} | "
                                 f"{key[2:]} | {_pm(row, 'elbo', '.1f')} | {_pm(row, 'iwae', '.1f')} | "
                                 f"{_pm(row, 'mse', '.5f')} | {_pm(row, 'fg_ari', '.3f')} | {_pm(row, 'ari', '.3f')} |")
    for name, r in result["runs"].items():
        lines += ["", f"## {name}: every step against its cost (trained at step {r['trained_step']})", "",
                  "| step | decoder passes | CPU s / image | ELBO | IWAE | amortization gap | KL | NLL | MSE "
                  "| FG-ARI | ARI |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in range(r["steps"]):
            mark = " (T)" if t + 1 == r["trained_step"] else ""
            cost = r.get("cpu_seconds", [float("nan")] * r["steps"])[t]
            lines.append(f"| {t + 1}{mark} | {t + 1} | {_fmt(cost, '.4f')} | {_pm(r, 'elbo', '.1f', t)} | "
                         f"{_pm(r, 'iwae', '.1f', t)} | {_pm(r, 'amortization_gap', '.1f', t)} | "
                         f"{_fmt(r['kl'][t], '.1f')} | {_fmt(r['nll'][t], '.1f')} | {_fmt(r['mse'][t], '.5f')} | "
                         f"{_fmt(r['fg_ari'][t], '.3f')} | {_fmt(r['ari'][t], '.3f')} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.png in directory `out`: all three whole or none
    (the JSON and the table are staged and put in place with the picture, `iodine_pyro.io`)."""
    from ..figures import draw_comparison   # here, not at the top: comparing loads no matplotlib
    from ..io import stage_text

    out = Path(out)
    paths = {"json": out / "compare.json", "table": out / "compare.md", "plot": out / "compare.png"}
    stage_text(paths["json"], json.dumps(result, indent=1) + "\n", companion=paths["plot"])
    stage_text(paths["table"], markdown_table(result), companion=paths["plot"])
    draw_comparison(result, paths["plot"])
    return paths
