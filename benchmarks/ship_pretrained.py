"""Ship a trained run as the package's pretrained model, with its figures and figures' data.

    python benchmarks/ship_pretrained.py --run weights/tetrominoes \\
        --official ../shared/data/tetrominoes_mini.tfrecords

1. evaluates the run on its held-out set (``--num-images``, last refinement step) and, with
   ``--official``, on DeepMind's official Tetrominoes file after `data convert`;
2. writes its parameters and configuration (no optimiser state) to
   ``iodine_pyro/pretrained/<name>.pt`` and the evaluation to ``<name>.json`` beside it;
3. draws its decomposition and training curves into ``docs/img/`` (PNG and the data behind);
4. rewrites the README's table of shipped models from every ``<name>.json`` there.

``--table-only`` does step 4 alone. ``--refresh NAME`` evaluates an already shipped model
again (steps 1 and 4: its held-out set, ``--official`` where given) and rewrites the metrics
of its ``<name>.json``, keeping its weights and the rest: for a metric added after it shipped.

``iodine-pyro evaluate pretrained:<name>`` (and sample, compare, plot) then use the weights:
the two files are the whole of shipping (`iodine_pyro.run.pretrained_models`).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import torch

from iodine_pyro import figures
from iodine_pyro.checkpoint import save_weights
from iodine_pyro.data import convert_tfrecords
from iodine_pyro.evaluate import evaluate
from iodine_pyro.run import PRETRAINED_DIR, Run

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("fg_ari", "ari", "bg_slots", "bg_share", "mse", "kl")     # the last refinement step's, per held-out set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="the run directory to ship")
    p.add_argument("--name", default="tetrominoes")
    p.add_argument("--num-images", type=int, default=512, help="held-out images to evaluate")
    p.add_argument("--official", default=None, help="DeepMind's official Tetrominoes file (optional)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hardware", default=None, help="where it was trained, for the README's table")
    p.add_argument("--command", default=None, help="how it was trained, for the README's table")
    p.add_argument("--table-only", action="store_true", help="only rewrite the README's table")
    p.add_argument("--refresh", metavar="NAME", help="evaluate the shipped NAME again and rewrite its metrics")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.table_only:
        write_table()
        return
    if a.refresh:
        refresh(a.refresh, a.num_images, a.official)
        write_table()
        return
    if not a.run:
        p.error("--run is required (or --table-only, --refresh)")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", a.name):    # a file name, and `pretrained:NAME`
        p.error(f"--name {a.name!r}: use lower-case letters, digits, '-' and '_'")
    run = Run.open(a.run)
    held_out = evaluate(run, num_images=a.num_images, batch_size=64, progress=True)
    ckpt = run.ckpt                                                   # loaded once, by Run.open
    generated = (ckpt["data"].get("generated") or {}).get("eval")     # [images, seed] when fit made it
    spent = ckpt["extra"].get("spent", {})                            # training seconds, wall and CPU
    summary = {"name": a.name, "dataset": run.cfg.dataset, "preset": run.cfg.preset, "guide": run.cfg.guide.kind,
               "step": run.step, "train_minutes": round(spent.get("time", 0) / 60, 1),
               "train_cpu_minutes": round(spent.get("cpu_time", 0) / 60, 1),   # thread-seconds, as the study counts
               "hardware": a.hardware, "command": a.command,
               "held_out": {"data": (f"generated: {generated[0]} images, seed {generated[1]}" if generated
                                     else Path(held_out["data"]).name),
                            "generated": list(generated) if generated else None,   # `pretrained_models`
                            "num_images": held_out["num_images"],
                            **shown(held_out)}}
    if a.official:
        summary["official"] = on_official(run, a.official)
    PRETRAINED_DIR.mkdir(parents=True, exist_ok=True)
    save_weights(PRETRAINED_DIR / f"{a.name}.pt", ckpt,
                 extra={"evaluation": summary})
    (PRETRAINED_DIR / f"{a.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    img = ROOT / "docs" / "img"
    shipped = Run.open(f"pretrained:{a.name}")
    figures.decomposition(shipped, img / f"pretrained_{a.name}_decomposition.png", num_images=4)
    figures.curves([Path(a.run)], img / f"pretrained_{a.name}_curves.png", labels=[f"pretrained:{a.name}"],
                   smooth=4)
    write_table()
    print(json.dumps(summary, indent=1))


def shown(result: dict) -> dict:
    """The `SHOWN` metrics of an `evaluate` result, at its last refinement step."""
    return {k: result[k][-1] for k in SHOWN}


def on_official(run: Run, path: str) -> dict:
    """The last refinement step's `SHOWN` metrics on every image of an official file."""
    with tempfile.TemporaryDirectory() as tmp:
        store = convert_tfrecords(path, run.cfg.dataset, Path(tmp) / "official", progress=False)
        official = evaluate(run, num_images=10**6, batch_size=64, data=store, progress=False)
    return {"file": Path(path).name, "num_images": official["num_images"], **shown(official)}


def refresh(name: str, num_images: int, official: str | None) -> None:
    """Evaluate the shipped `name` again on the held-out set it was judged on (and `official`)
    and rewrite the metrics in its json; its weights and training record stay."""
    path = PRETRAINED_DIR / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"no shipped model {name!r}: {path} does not exist")
    info = json.loads(path.read_text())
    run = Run.open(f"pretrained:{name}")
    held_out = evaluate(run, num_images=num_images, batch_size=64, progress=True)
    info["held_out"].update(num_images=held_out["num_images"], **shown(held_out))
    if official:
        info["official"] = on_official(run, official)
    path.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))


TABLE_START, TABLE_END = "<!-- shipped models: benchmarks/ship_pretrained.py -->", "<!-- end of shipped models -->"


def write_table() -> None:
    """The README's table of shipped models, between its two markers, from their JSON files."""
    rows = ["| model | guide | held-out set | images | FG-ARI | ARI | bg slots | bg share | MSE | KL | steps | "
            "training | trained with |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shipped = [json.loads(p.read_text()) for p in PRETRAINED_DIR.glob("*.json")]
    for info in sorted(shipped, key=lambda i: (i.get("guide", "iterative") != "iterative", i["name"])):
        cpu = f" ({info['train_cpu_minutes'] / 60:.1f} CPU-hours)" if info.get("train_cpu_minutes") else ""
        hours = f"{info['train_minutes'] / 60:.1f} h{cpu} on {info.get('hardware') or 'a CPU'}"
        for key in ("held_out", "official"):
            ev = info.get(key)
            if ev is None:
                continue
            where = ev.get("data") or ev.get("file")
            cells = [f"`pretrained:{info['name']}`", info.get("guide", "iterative"), where, str(ev["num_images"]),
                     f"{ev['fg_ari']:.3f}", f"{ev['ari']:.3f}",
                     f"{ev['bg_slots']:.2f}" if "bg_slots" in ev else "-",
                     f"{ev['bg_share']:.2f}" if "bg_share" in ev else "-", f"{ev['mse']:.4f}", f"{ev['kl']:.0f}",
                     f"{info['step']:,}", hours, f"`{info['command']}`" if info.get("command") else "-"]
            rows.append("| " + " | ".join(cells) + " |")
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    readme.write_text(text[:start] + "\n" + "\n".join(rows) + "\n" + text[end:])


if __name__ == "__main__":
    main()
