"""CPU threads: how many, and how they wait.

torch runs its CPU kernels on an OpenMP team. By default (``OMP_WAIT_POLICY`` unset) a
thread that finishes its share of a kernel spins for a while before it sleeps; IODINE's
step is thousands of small kernels, so the team spends its life spinning, and when
another process holds one of the cores the thread that waits for it spins away the
time the other one needs. Measured on a 2-core AMD EPYC with both cores busy with two
other trainings (`benchmarks/bench_threads.py`, `fast` preset, batch 8): 2 spinning
threads made 20.5 steps a minute, one thread 40.3, 2 sleeping threads 40.4, and this
module's default (it chose 1 thread) 43.7.

Two settings keep a run at least at one thread's speed whatever else the machine runs:

* ``OMP_WAIT_POLICY=PASSIVE``: waiting threads sleep instead of spinning. The OpenMP
  runtime reads it once, when torch is loaded, so `prepare_environment` sets it before
  torch is imported (the command line does this first; a Python program that imported
  torch already keeps the policy it started with).
* the number of threads: one per core that is not busy with other work when the command
  starts (`free_cores`: two samples of ``/proc/stat`` 0.3 s apart), at least one.

`--threads N` (every command that computes) chooses the count instead; so does
``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os
import time

WAIT_POLICY = "PASSIVE"
SAMPLE_S = 0.3              # how long `free_cores` watches the machine
BUSY_SHARE = 0.5            # a core counts as busy when other work takes more than half of it


_prepared = False           # whether this process chooses its threads (the command line's main)


def prepare_environment() -> None:
    """Make waiting OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose
    a policy; effective only before torch is imported (the command line calls it first).
    From then on `choose` picks the thread count; without it (the commands called from
    Python, as in tests) the count this process already has is kept."""
    global _prepared
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    _prepared = True


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]                     # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cores(sample_s: float = SAMPLE_S) -> float | None:
    """How many cores other work keeps busy right now (this process sleeps while it looks),
    or None where the machine does not say (no /proc/stat)."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(sample_s)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)


def free_cores(sample_s: float = SAMPLE_S) -> tuple[int, int, int]:
    """(cores free of other work but at least one, cores this process may use, cores busy
    with other work)."""
    cores = available_cores()
    busy = busy_cores(sample_s)
    if busy is None:
        return cores, cores, 0
    taken = min(os.cpu_count() or cores, int(busy + (1 - BUSY_SHARE)))   # a core more than half busy is taken
    return max(1, min(cores, (os.cpu_count() or cores) - taken)), cores, taken


def choose(requested: int | None, device: str = "cpu") -> tuple[int, str]:
    """(threads, the reason in words): `requested`, else ``OMP_NUM_THREADS``, else one per
    core free of other work; on a GPU the CPU only feeds it, and the count is left to torch."""
    cores = available_cores()
    if requested is not None:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    if not _prepared:
        import torch
        return torch.get_num_threads(), "as this process set them"
    if not str(device).startswith("cpu"):
        return min(cores, 4), "a GPU run"
    free, cores, taken = free_cores()
    if taken:
        return free, f"{taken} of {os.cpu_count() or cores} cores busy with other work"
    return free, f"{cores} cores idle"


def apply(requested: int | None, device: str = "cpu") -> str:
    """Set torch's thread counts (`choose`) and return the line that says what was chosen."""
    import torch

    threads, why = choose(requested, device)
    torch.set_num_threads(threads)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (threads spin while they wait)")
    return (f"using {threads} CPU thread{'s' if threads != 1 else ''} ({why}; OpenMP wait policy "
            f"{policy}; --threads N to choose)")
