"""Cost of a full training step: the Pyro program against a plain-PyTorch loop.

Both run the same networks (the same module objects, the same parameters) on the same
batch; the plain version is IODINE's loop written directly in torch (rsample, decode,
loss, refinement), without Pyro's sites, plates, scales and ELBO machinery. Steps of the
two alternate so that both see the same machine state; the medians and their ratio are
measured in one run. The last line is ``step_s=<median seconds of one Pyro step>``.
With ``--guide`` another registered guide is measured alone (the plain loop is IODINE's);
``cpu_steps_per_s`` is the steps per second of process CPU time (all threads together).

    python benchmarks/bench_train_step.py --dataset tetrominoes --batch-size 8 --steps 3
    python benchmarks/bench_train_step.py --preset fast --guide slot_attention --threads 1
    python benchmarks/bench_train_step.py --preset fast --guide slot_attention --set slot_attention.refine_steps=1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pyro
import torch
from torch.distributions import kl_divergence

from iodine_pyro.config import make_config
from iodine_pyro.system import Iodine


def plain_loss(system: Iodine, x: torch.Tensor) -> torch.Tensor:
    """sum_t w_t L_t computed by hand with the system's own modules."""
    guide, model = system.guide, system.model
    weights = system.weights()
    B, K = x.shape[0], model.cfg.num_slots
    prior = model.prior(B, like=x)
    lam = guide.lambda0.expand(B, K, -1)                          # [B, K, 2 n_z]
    state, total = None, x.new_zeros(())
    for t, w in enumerate(weights):
        q = guide.posterior(lam)
        z = q.rsample()                                           # [B, K, n_z]
        decoded = model.decode(z)
        terms = model.terms(x, decoded)                           # computed once per step here
        if w > 0:
            nll = -terms.log_px.sum((1, 2)).mean()
            total = total + w * (nll + kl_divergence(q, prior).sum((1, 2)).mean())
        if t < len(weights) - 1:
            spatial, vector = guide.refinement_inputs(x, lam, q, decoded, keep_graph=True, terms=terms)
            delta, state = guide.net(spatial, vector, state)
            lam = lam + delta.view(B, K, -1)
    return total


def step(system, opt, x, loss_fn):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(system, x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(system.parameters(), 5.0)
    opt.step()
    return loss


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="tetrominoes")
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--guide", default="iterative", help="a registered guide kind")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a configuration override, e.g. slot_attention.refine_steps=1")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pyro.enable_validation(False)
    torch.manual_seed(0)
    sets = dict(item.split("=", 1) for item in a.set)
    cfg = make_config(a.dataset, a.preset, {"guide.kind": a.guide, **{k: json.loads(v) for k, v in sets.items()}})
    system = Iodine(cfg).to(a.device)
    opt = torch.optim.Adam(system.parameters(), lr=cfg.train.lr)
    x = torch.rand(a.batch_size, cfg.model.image_channels, *cfg.model.image_size, device=a.device)

    if a.guide != "iterative":
        return guide_alone(a, system, opt, x)
    # the two implementations compute the same loss from the same draws
    torch.manual_seed(1)
    l_pyro = float(system.loss(x).detach())
    torch.manual_seed(1)
    l_plain = float(plain_loss(system, x).detach())
    same = abs(l_pyro - l_plain) <= 1e-4 * abs(l_plain)

    pyro_fn = lambda s, x: s.loss(x)  # noqa: E731
    times, cpu = {"pyro": [], "plain": []}, []
    for i in range(a.warmup + a.steps):
        for name, fn in (("pyro", pyro_fn), ("plain", plain_loss)):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step(system, opt, x, fn)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
                if name == "pyro":
                    cpu.append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"dataset={a.dataset} preset={a.preset} batch={a.batch_size} steps={a.steps} "
          f"device={a.device} threads={torch.get_num_threads()}")
    print(f"same_loss={same} (pyro {l_pyro:.6g}, plain {l_plain:.6g})")
    print(f"plain_step_s={med['plain']:.4f}")
    print(f"pyro_over_plain={med['pyro'] / med['plain']:.3f}")
    print(f"cpu_steps_per_s={1 / statistics.median(cpu):.3f}")
    print(f"step_s={med['pyro']:.4f}")


def guide_alone(a, system, opt, x) -> None:
    """Median wall and CPU seconds of a Pyro training step of a guide without a plain loop."""
    wall, cpu = [], []
    for i in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(system, opt, x, lambda s, x: s.loss(x))
        if i >= a.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    print(f"dataset={a.dataset} preset={a.preset} guide={a.guide} batch={a.batch_size} steps={a.steps} "
          f"device={a.device} threads={torch.get_num_threads()}")
    print(f"cpu_steps_per_s={1 / statistics.median(cpu):.3f}")
    print(f"step_s={statistics.median(wall):.4f}")


if __name__ == "__main__":
    main()
