"""Training steps per minute over thread settings, on an idle machine and with cores busy.

Each setting trains in a fresh process (the OpenMP wait policy is read once, when torch
is loaded): the `fast` preset's Tetrominoes step (batch 8, bf16 where the CPU has it, as
`fit` runs it) on random images, for `--seconds` after one warm-up step. The settings:

    1 thread         torch.set_num_threads(1), the OpenMP wait policy unset (threads spin)
    N threads        all cores, policy unset: torch's own default
    1/N passive      the same with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep)
    N passive, interop 1   and one inter-op thread
    N spin 1e4/1e5   all cores, policy unset, GOMP_SPINCOUNT=10000 / 100000: libgomp spins
                     that many times before it sleeps (its default: 300,000)
    default          what the command line chooses (`iodine_pyro.threads`)

and the situations: ``idle`` (nothing started; whatever else already runs is reported)
and ``loaded`` (`--busy` processes that spin on a core each, started by this script).
Repetitions alternate the settings so that all see the same machine state. Prints steps
per minute (median over repetitions) and the load the machine had; nothing is asserted.

    python benchmarks/bench_threads.py                          # idle and one core busy, ~10 min
    python benchmarks/bench_threads.py --situations loaded --busy 1 --seconds 30 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def settings(cores: int) -> dict[str, dict]:
    return {
        "1 thread": {"threads": 1, "policy": None},
        f"{cores} threads": {"threads": cores, "policy": None},
        "1 passive": {"threads": 1, "policy": "PASSIVE"},
        f"{cores} passive": {"threads": cores, "policy": "PASSIVE"},
        f"{cores} passive, interop 1": {"threads": cores, "policy": "PASSIVE", "interop": 1},
        f"{cores} spin 1e4": {"threads": cores, "policy": None, "spincount": "10000"},
        f"{cores} spin 1e5": {"threads": cores, "policy": None, "spincount": "100000"},
        "default": {"threads": None, "policy": "default"},
    }


def child(threads: int | None, interop: int | None, seconds: float, batch: int) -> None:
    """One measurement, in its own process: prints one JSON line."""
    from iodine_pyro import threads as thread_settings
    if threads is None:                      # the command line's way: policy first, then the count
        thread_settings.prepare_environment()
    import pyro
    import torch

    from iodine_pyro.config import make_config
    from iodine_pyro.system import Iodine
    from iodine_pyro.training import make_optimizer, speed_settings, train_step

    if interop:
        torch.set_num_interop_threads(interop)
    line = thread_settings.apply(threads)
    pyro.enable_validation(False)
    torch.manual_seed(0)
    cfg = make_config("tetrominoes", "fast", {"train.batch_size": batch})
    speed = speed_settings("cpu")
    system = Iodine(cfg).use_fast_paths(speed.amp, speed.channels_last)
    opt = make_optimizer(system, cfg)
    x = torch.rand(batch, 3, 35, 35)
    train_step(system, opt, x, cfg.train.clip_norm)              # warm-up
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        train_step(system, opt, x, cfg.train.clip_norm)
        steps += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"steps_per_min": 60 * steps / elapsed, "steps": steps, "chose": line,
                      "threads": torch.get_num_threads()}))


def measure(setting: dict, seconds: float, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    if setting["policy"] not in (None, "default"):
        env["OMP_WAIT_POLICY"] = setting["policy"]
    if setting.get("spincount"):
        env["GOMP_SPINCOUNT"] = setting["spincount"]
    cmd = [sys.executable, os.path.join(HERE, "bench_threads.py"), "--child", "--seconds", str(seconds),
           "--batch-size", str(batch)]
    if setting["threads"] is not None:
        cmd += ["--threads", str(setting["threads"])]
    if setting.get("interop"):
        cmd += ["--interop", str(setting["interop"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spinners(count: int) -> list[subprocess.Popen]:
    """`count` processes that each keep one core busy until they are stopped."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--situations", default="idle,loaded", help="idle, loaded or both (comma-separated)")
    p.add_argument("--busy", type=int, default=1, help="cores the loaded situation keeps busy")
    p.add_argument("--seconds", type=float, default=30.0, help="training time per measurement")
    p.add_argument("--reps", type=int, default=2, help="repetitions (alternating the settings)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--only", default=None, help="comma-separated setting names to run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--interop", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.threads, a.interop, a.seconds, a.batch_size)
        return
    cores = os.cpu_count() or 1
    chosen = settings(cores)
    if a.only:
        chosen = {k: v for k, v in chosen.items() if k in a.only.split(",")}
    print(f"{cores} cores; batch {a.batch_size}; {a.seconds:.0f} s per measurement, {a.reps} repetitions")
    for situation in a.situations.split(","):
        busy = spinners(a.busy) if situation == "loaded" else []
        try:
            time.sleep(1.0 if busy else 0.0)
            load = os.getloadavg()[0]
            results: dict[str, list[dict]] = {name: [] for name in chosen}
            for _ in range(a.reps):
                for name, setting in chosen.items():
                    results[name].append(measure(setting, a.seconds, a.batch_size))
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
        extra = f", {a.busy} core(s) kept busy by this script" if busy else ""
        print(f"\n{situation}: load average {load:.2f} at the start{extra}")
        if situation == "idle" and load > 0.5:
            print("  (not idle: other work was running; see the load average)")
        print(f"{'setting':<26} {'steps/min':>10}  runs")
        for name, runs in results.items():
            rates = [r["steps_per_min"] for r in runs]
            print(f"{name:<26} {statistics.median(rates):>10.1f}  " + ", ".join(f"{v:.1f}" for v in rates))
        if "default" in results:
            print(f"default chose: {results['default'][-1]['chose']}")


if __name__ == "__main__":
    main()
