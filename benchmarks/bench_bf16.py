"""bf16 autocast against float32 for one training step on this machine's CPU.

Two systems with the same initial parameters, one with its networks under bf16 autocast
(`Iodine.use_fast_paths`), take alternating optimisation steps on the same batch, so that
both see the same machine state; the medians of their CPU times and the ratio are
measured in one run. Whether bf16 pays depends on the processor: with AVX512-BF16 (AMD
Zen 4, Intel from Cooper Lake) or AMX it is faster, without them torch emulates it.

    python benchmarks/bench_bf16.py --dataset tetrominoes --preset fast --steps 7 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import pyro
import torch

from iodine_pyro.config import make_config
from iodine_pyro.system import Iodine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="tetrominoes")
    p.add_argument("--preset", default="fast")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=7, help="measured steps of each (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pyro.enable_validation(False)
    cfg = make_config(a.dataset, a.preset)
    B = a.batch_size or cfg.train.batch_size
    torch.manual_seed(0)
    systems = {"fp32": Iodine(cfg)}
    systems["bf16"] = Iodine(cfg).use_fast_paths(torch.bfloat16)
    systems["bf16"].load_state_dict(systems["fp32"].state_dict())
    opts = {k: torch.optim.Adam(s.parameters(), lr=cfg.train.lr) for k, s in systems.items()}
    x = torch.rand(B, cfg.model.image_channels, *cfg.model.image_size)
    times: dict[str, list[float]] = {k: [] for k in systems}
    for i in range(a.steps + 1):
        for k, s in systems.items():
            t0 = time.process_time()
            opts[k].zero_grad(set_to_none=True)
            s.loss(x).backward()
            opts[k].step()
            if i:                                   # the first step of each warms up
                times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    flags = {name: bool(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)())
             for name in ("avx512_bf16", "amx_tile")}
    print(f"cpu {platform.processor() or platform.machine()}, {flags}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {a.dataset} {a.preset} batch {B}")
    print(f"fp32_step_cpu_s={med['fp32']:.3f} bf16_step_cpu_s={med['bf16']:.3f} "
          f"fp32_over_bf16={med['fp32'] / med['bf16']:.2f}")


if __name__ == "__main__":
    main()
