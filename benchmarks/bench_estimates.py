"""How far each long command's first estimate of its time is from the time it took.

Runs each command in its own process (one thread: ``--threads 1``, ``--workers 1``), reads its progress bar
as it is written, and takes the bar's first estimate of the total (time spent plus the time
left it shows, once it shows one) and the time the bar finally took. Prints, per command,
the first estimate, the final time and their ratio; a ratio within 0.5-2 is an estimate a
user can plan with. Nothing is asserted.

    python benchmarks/bench_estimates.py                       # all commands, ~25 min idle
    python benchmarks/bench_estimates.py --only evaluate sample

The commands use ``pretrained:tetrominoes`` on its generated held-out images; compare
runs the three shipped guides on 64 images with its defaults (its 10-minute time limit).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

BAR = re.compile(r"\[((?:\d+:)?\d+:\d+)<((?:\d+:)?\d+:\d+)")   # [spent<left], once the bar has a rate


def seconds(text: str) -> float:
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return 3600 * h + 60 * m + s


def commands(out: str) -> dict[str, list[str]]:
    compared = [f"pretrained:{name}" for name in ("tetrominoes", "tetrominoes-amortized", "tetrominoes-slot_attention")]
    return {
        "fit": ["fit", "--out", f"{out}/fit", "--steps", "300", "--num-images", "2000", "--threads", "1"],
        "data generate": ["data", "generate", "tetrominoes", "--num-images", "20000", "--out", f"{out}/data",
                          "--workers", "1"],
        "evaluate": ["evaluate", "pretrained:tetrominoes", "--num-images", "1024", "--threads", "1"],
        "sample": ["sample", "pretrained:tetrominoes", "--num-images", "16", "--num-samples", "100",
                   "--out", f"{out}/samples.nc", "--threads", "1"],
        "compare": ["compare", *compared, "--num-images", "64", "--out", f"{out}/compare", "--threads", "1"],
    }


def measure(args: list[str]) -> dict[str, dict[str, float]]:
    """Run `iodine-pyro args`; per progress bar (by its label), its first estimate of the
    total and the time it finally showed; and the command's exit status and wall time."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "iodine-pyro"), *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bars: dict[str, dict[str, float]] = {}

    def read():
        buf = b""
        while chunk := proc.stderr.read(256):
            buf += chunk
            *segments, buf = re.split(rb"[\r\n]", buf)
            for seg in segments:
                text = seg.decode(errors="replace")
                m = BAR.search(text)
                if not m:
                    continue
                label = text.split(":")[0].strip() or "bar"
                spent, left = seconds(m.group(1)), seconds(m.group(2))
                bar = bars.setdefault(label, {})
                if "first" not in bar and spent + left > 0:
                    bar["first"] = spent + left
                bar["final"] = spent

    reader = threading.Thread(target=read)
    reader.start()
    rc = proc.wait()
    reader.join()
    return {"rc": rc, "wall": time.perf_counter() - t0, "bars": bars}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="commands to run (default: all)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        todo = commands(out)
        names = a.only or list(todo)
        print(f"{'command':<14} {'bar':<10} {'first estimate':>15} {'bar final':>10} {'wall':>8} {'ratio':>6}")
        fmt = lambda v: f"{v:.0f} s" if v is not None else "n/a"
        for name in names:
            r = measure(todo[name])
            for label, bar in r["bars"].items():
                first, final = bar.get("first"), bar.get("final")
                ratio = f"{first / final:.2f}" if first and final else "n/a"
                print(f"{name:<14} {label[:10]:<10} {fmt(first):>15} {fmt(final):>10} {fmt(r['wall']):>8} "
                      f"{ratio:>6}" + (f"   (exit {r['rc']})" if r["rc"] else ""), flush=True)


if __name__ == "__main__":
    main()
