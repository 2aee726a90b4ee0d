"""One GPU check: throughput, memory, the decoder's share of the GPU's peak, then quality.

Run through ``benchmarks/gpu_check.sh`` (which only sets defaults). Within ``--budget``
seconds of wall time (default 540: 9 minutes) it writes, under ``--out``:

1. ``env.txt``: the device, torch and CUDA versions.
2. ``throughput.md`` / ``throughput.json``: training and evaluation images/s and peak
   memory of Tetrominoes and CLEVR6 at batch 32, in bf16 and in float32, and the decoder
   convolutions' achieved TFLOP/s as a fraction of the device's peak (its rated bf16 or
   float32 peak where the device is known, else a large matmul's measured rate).
3. ``quality.md`` / ``quality.json``: the `paper`, `deepmind` and `fast` presets trained
   side by side on Tetrominoes, and `fast` on Multi-dSprites (K = 6, the paper's network:
   about 17 times a Tetrominoes step, so a CPU cannot tell how far it gets), for the rest
   of the budget (concurrently, one process each), then held-out FG-ARI, ARI, MSE, KL and
   the slots owning the background of the last refinement step on 256 images.

``--tiny`` shrinks every part (batch 2, narrow networks, a few seconds of training): the
CPU test of the script's plumbing, not a measurement.

    bash benchmarks/gpu_check.sh                          # OUT defaults to runs/gpu-check
    bash benchmarks/gpu_check.sh --device cpu --tiny --budget 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import QUICK, measure  # noqa: E402

from iodine_pyro.config import make_config  # noqa: E402

# Rated dense peak TFLOP/s (bf16, float32 without TF32) of devices the check may meet.
RATED_TFLOPS = {"H200": (989.0, 66.9), "H100": (989.0, 66.9), "A100": (312.0, 19.5),
                "L40S": (362.0, 91.6), "A10": (125.0, 31.2), "L4": (121.0, 30.3), "V100": (125.0, 15.7)}
# (dataset, preset) of the quality runs, trained side by side
QUALITY = (("tetrominoes", "paper"), ("tetrominoes", "deepmind"), ("tetrominoes", "fast"),
           ("multi_dsprites", "fast"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: torch.device) -> str:
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"pyro {pyro.__version__}", f"device {device}"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines += [f"gpu {p.name}", f"memory {p.total_memory / 2**30:.1f} GiB", f"cuda {torch.version.cuda}",
                  f"cudnn {torch.backends.cudnn.version()}", f"bf16 {torch.cuda.is_bf16_supported()}"]
    else:
        lines.append(f"cpu {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return "\n".join(lines) + "\n"


def peak_tflops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """The device's peak (rated where known, else a measured large matmul) and where it came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (b, f) in RATED_TFLOPS.items():
            if key in name:
                return (b if bf16 else f), f"rated {key}"
    dtype = torch.bfloat16 if bf16 else torch.float32
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ a
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12, f"measured {n}x{n} matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(dataset: str, bf16: bool, device: torch.device, tiny: bool, reps: int) -> dict:
    """`bench_throughput.measure` of one configuration at batch 32 (tiny: 2), and the decoder
    convolutions' share of the device's peak."""
    over = {"train.batch_size": 2 if tiny else 32, **(QUICK if tiny else {})}
    if tiny and dataset == "clevr6":
        over["model.image_size"] = (32, 32)
    cfg = make_config(dataset, "paper", over)
    settings = SimpleNamespace(amp=bf16, channels_last=device.type == "cuda", no_plain=True, warmup=1, reps=reps)
    r = measure(cfg, settings, device)
    peak, source = peak_tflops(device, bf16)
    return {"dataset": dataset, "precision": "bf16" if bf16 else "fp32", "batch": cfg.train.batch_size,
            "K": cfg.model.num_slots, "T": cfg.guide.num_iters, "size": cfg.model.image_size[0],
            "train_img_s": r["train_ips"], "eval_img_s": r["eval_ips"], "train_peak_mib": r["train_mib"],
            "eval_peak_mib": r["eval_mib"], "decoder_tflops": r["dec_gflops"] / 1e3, "peak_tflops": peak,
            "peak_source": source, "decoder_fraction_of_peak": r["dec_gflops"] / 1e3 / peak}


def quality(out: Path, device: str, seconds: float, tiny: bool, eval_images: int) -> list[dict]:
    """The `QUALITY` runs trained at once, one process each, then evaluated."""
    from iodine_pyro.data import generate
    from iodine_pyro.evaluate import evaluate

    n_train = 64 if tiny else 20_000
    for dataset in dict.fromkeys(d for d, _ in QUALITY):
        for name, n, seed in (("train", n_train, 0), ("test", eval_images, 10_000)):
            if not (out / "data" / dataset / name).exists():
                generate(dataset, n, out / "data" / dataset / name, seed=seed, progress=False)
    procs = {}
    for dataset, preset in QUALITY:
        data, run = out / "data" / dataset, out / "runs" / f"{dataset}-{preset}"
        cmd = [sys.executable, "-m", "iodine_pyro", "fit", "--dataset", dataset, "--preset", preset,
               "--steps", str(10**9), "--data", str(data / "train"), "--eval-data", str(data / "test"),
               "--out", str(run), "--device", device, "--time-limit", f"{max(seconds, 1.0):.0f}s",
               "--log-every", "100", "--checkpoint-every", str(10**9), "--quiet", "--overwrite"]
        if tiny:
            toml = out / "tiny.toml"
            toml.write_text("[model]\nlatent_dim = 4\ndecoder_channels = [8, 8]\ndecoder_kernel = 3\n"
                            "[guide]\nconv_channels = [8, 8]\nconv_kernel = 3\nmlp = [16]\n"
                            "[train]\nbatch_size = 4\n")
            cmd += ["--config", str(toml)]
        env = dict(os.environ)
        if device == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(QUALITY)))
        procs[dataset, preset] = (run, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.STDOUT, text=True))
    rows = []
    for (dataset, preset), (run, proc) in procs.items():
        output = proc.communicate()[0]
        if proc.returncode != 0:
            rows.append({"dataset": dataset, "preset": preset,
                         "error": output.strip().splitlines()[-1] if output.strip() else "failed"})
            continue
        res = evaluate(run, num_images=eval_images, batch_size=64, device=device, progress=False)
        rows.append({"dataset": dataset, "preset": preset, "step": res["step"], "train_seconds": seconds,
                     **{k: res[k][-1] for k in ("fg_ari", "ari", "mse", "kl", "bg_slots", "bg_share")}})
        log(f"quality {dataset} {preset}: step {res['step']}, FG-ARI {res['fg_ari'][-1]:.3f}, "
            f"ARI {res['ari'][-1]:.3f}")
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                     ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=540.0, help="wall seconds for the whole check")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check")
    p.add_argument("--tiny", action="store_true", help="shrink everything (the CPU test of the script)")
    p.add_argument("--eval-images", type=int, default=256)
    a = p.parse_args()
    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU (a CPU build of torch, or no driver)")
    pyro.enable_validation(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    (out / "env.txt").write_text(environment(device))
    log(environment(device).replace("\n", "; "))

    rows = []
    for dataset in ("tetrominoes", "clevr6"):
        for bf16 in (True, False):
            if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                continue
            r = throughput(dataset, bf16, device, a.tiny, reps=1 if a.tiny else 3)
            rows.append(r)
            log(f"throughput {dataset} {r['precision']}: train {r['train_img_s']:.1f} img/s, "
                f"eval {r['eval_img_s']:.1f} img/s, decoder {r['decoder_fraction_of_peak']:.1%} of peak")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    (out / "throughput.md").write_text(table(rows, [
        "dataset", "precision", "batch", "K", "T", "size", "train_img_s", "eval_img_s", "train_peak_mib",
        "eval_peak_mib", "decoder_tflops", "peak_tflops", "peak_source", "decoder_fraction_of_peak"]))

    # what is left, less a margin for data generation, evaluation and writing
    margin = 15.0 if a.tiny else 75.0
    seconds = max(1.0, a.budget - (time.time() - t_start) - margin)
    log(f"quality: {', '.join(f'{d} {p}' for d, p in QUALITY)} for {seconds:.0f} s each, concurrently")
    q = quality(out, a.device, seconds, a.tiny, a.eval_images)
    (out / "quality.json").write_text(json.dumps(q, indent=1))
    (out / "quality.md").write_text(table(q, ["dataset", "preset", "step", "train_seconds", "fg_ari", "ari",
                                               "bg_slots", "bg_share", "mse", "kl", "error"]))
    log(f"done in {time.time() - t_start:.0f} s; results in {out}")
    if any("error" in r for r in q):
        sys.exit(1)


if __name__ == "__main__":
    main()
