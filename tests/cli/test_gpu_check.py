"""benchmarks/gpu_check.sh runs end to end: on a CPU, shrunk (--tiny), within its budget."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--budget", "25", "--eval-images", "8"],
                          capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("env.txt", "throughput.md", "throughput.json", "quality.md", "quality.json"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "throughput.json").read_text())
    assert {(r["dataset"], r["precision"]) for r in rows} == {(d, p) for d in ("tetrominoes", "clevr6")
                                                              for p in ("bf16", "fp32")}
    assert all(r["train_img_s"] > 0 and r["eval_img_s"] > 0 and r["decoder_fraction_of_peak"] > 0 for r in rows)
    quality = json.loads((out / "quality.json").read_text())
    assert [(r["dataset"], r["preset"]) for r in quality] == [
        ("tetrominoes", "paper"), ("tetrominoes", "deepmind"), ("tetrominoes", "fast"), ("multi_dsprites", "fast")]
    assert all(0 <= r["fg_ari"] <= 1 or r["fg_ari"] != r["fg_ari"] for r in quality)   # a number or NaN
    assert all(r["step"] >= 1 for r in quality)
