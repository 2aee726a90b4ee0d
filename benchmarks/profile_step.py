"""Where the CPU time of one IODINE training step (and of one evaluation pass) goes.

Every part of the step is timed alone, on the very tensors a real step gives it
(captured with forward hooks during a step), forward and backward separately, under the
same autocast as the step, and multiplied by the number of times the step runs it:

    decoder                  the spatial broadcast decoder (convolutions, ELUs, first
                             layer), all T passes: forward, and backward in the final
                             `backward`
    gradient inputs          the guide's inner `torch.autograd.grad` of each image's -ELBO
                             w.r.t. lambda, the means and the mask logits (T - 1 calls);
                             its backward pass through the decoder to z is shown apart
    refinement network       f_phi's convolutions, pooling and MLP (T - 1 passes)
    LSTM                     where the preset has one (shown apart; inside f_phi's row)
    ELU activations          of the decoder and f_phi's convolutions (shown apart; inside
                             the rows above)
    likelihood and softmax   `mixture_terms` (component log-probabilities, log-softmax of
                             the mask logits, logsumexp), every call, forward and backward
    other refinement inputs  masks, mask posterior, leave-one-out, tiling, concatenation
    layer norms              the `InputNorm`s of the gradient and likelihood inputs
    optimiser                global-norm clip and Adam (on a copy of the parameters)
    fit's guards             the batch checks, the snapshot of parameters and Adam state
                             and the finiteness check of `train_step`
    Pyro bookkeeping         the Pyro step minus a plain-PyTorch step of the same networks
                             (the loop of `bench_train_step.plain_loss`, the refinement
                             network under the same autocast), minus the likelihood
                             evaluations Pyro's model repeats (the plain loop shares them)
    left                     the whole step minus all of the above (Python, allocation,
                             KL, sampling)

The whole step is `iodine_pyro.training.step.train_step`, what `fit` runs on one CPU process
(Pyro validation off, as in `fit`); the evaluation pass is `Iodine.infer` on the same
batch, its parts timed likewise. The decoder and the refinement network are also timed
in float32 and channels-last, and a lone convolution of the decoder's shape gives the
rate this core reaches on that op.

All times are CPU time of the calling thread (`time.thread_time`, torch on one thread):
medians over `--steps` rounds in which every measurement runs once, in turn (a short
one as the mean of enough calls to last ~20 ms), so that other work on the machine
changes them little. A torch.profiler run of one step and of one evaluation pass groups
the self time of the ops by kind (a cross-check; the profiler's clock is wall time), and
`FlopCounterMode` counts their FLOPs, set against this CPU's assumed peak.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --threads 1     # ~1.5 min of CPU
    python benchmarks/profile_step.py --no-amp --steps 3                  # float32 networks
    python benchmarks/profile_step.py --set guide.lstm=64 --steps 1       # with an LSTM
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import re
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from torch.distributions import kl_divergence
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from iodine_pyro.config import make_config
from iodine_pyro.guides.inputs import Context
from iodine_pyro.models import generative, likelihood
from iodine_pyro.models.generative import autocast
from iodine_pyro.models.likelihood import MixtureTerms
from iodine_pyro.system import Iodine
from iodine_pyro.training.speed import cpu_has_fast_bf16
from iodine_pyro.training.state import make_optimizer
from iodine_pyro.training.step import Snapshot, train_step

# -- measuring -------------------------------------------------------------------------------


@dataclass
class Probe:
    """One timed call: `fn(setup())`, the setup untimed."""

    label: str
    fn: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None
    reps: int = 1              # calls per measurement, set so that one lasts ~20 ms
    ms: list[float] = field(default_factory=list)
    flops: float = 0.0         # per call

    @property
    def median(self) -> float:
        return statistics.median(self.ms) if self.ms else math.nan


def run_once(p: Probe) -> float:
    """CPU ms of the calling thread for one call of the probe (the mean of `reps` calls)."""
    total = 0.0
    for _ in range(p.reps):
        arg = p.setup() if p.setup else None
        t0 = time.thread_time()
        p.fn(arg)
        total += time.thread_time() - t0
    return total * 1e3 / p.reps


def calibrate(probes: list[Probe]) -> None:
    """Warm every probe up, count its FLOPs, and choose its repetitions."""
    for p in probes:
        run_once(p)
        arg = p.setup() if p.setup else None
        with FlopCounterMode(display=False) as fc:
            p.fn(arg)
        p.flops = float(fc.get_total_flops())
        p.reps = max(1, min(50, round(20.0 / max(run_once(p), 1e-3))))


def measure(probes: list[Probe], rounds: int) -> None:
    """`rounds` rounds, each running every probe once, in turn (medians in `Probe.ms`)."""
    for _ in range(rounds):
        for p in probes:
            p.ms.append(run_once(p))


def grad_of(outputs, inputs: list[torch.Tensor], retain: bool = True):
    """The backward pass of `outputs` (random output gradients) into `inputs`, returned
    rather than accumulated into `.grad`."""
    outputs = [o for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs]) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outputs]
    inputs = [t for t in inputs if t.requires_grad]
    return lambda _: torch.autograd.grad(outputs, inputs, grads, retain_graph=retain, allow_unused=True)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` that is a leaf requiring grad."""
    return t.detach().clone().requires_grad_(True)


# -- capturing a real step's tensors ---------------------------------------------------------


@contextlib.contextmanager
def capture(system: Iodine):
    """Count what the calls inside run, and keep (a copy of) the inputs of the first call
    of each part: yields (calls: Counter, first: dict)."""
    calls, first = Counter(), {}
    model, guide = system.model, system.guide

    def keep(name, make):
        calls[name] += 1
        if name not in first:
            first[name] = make()

    def graph(name):
        return name if torch.is_grad_enabled() else name + " (no grad)"

    hooks = [model.decoder.register_forward_hook(lambda m, i, o: keep(graph("decoder"), lambda: i[0].detach().clone())),
             guide.net.register_forward_hook(lambda m, i, o: keep(graph("refinement"), lambda: [leaf(t) for t in i[:2]]))]
    if guide.net.lstm is not None:
        hooks.append(guide.net.lstm.register_forward_hook(
            lambda m, i, o: keep(graph("lstm"), lambda: [t.detach().clone() for t in i[:1]])))
    for net in (model.decoder, guide.net.convs):
        for m in net.modules():
            if isinstance(m, torch.nn.ELU):
                hooks.append(m.register_forward_hook(lambda m, i, o: keep(graph("elu"), lambda: i[0].detach().clone())))
    for name, norm in guide.norms.items():
        hooks.append(norm.register_forward_hook(
            lambda m, i, o, name=name: keep(graph("norm/" + name), lambda: i[0].detach().clone())))
    terms_fn, gradients_fn = likelihood.mixture_terms, guide._loss_gradients

    def terms(x, means, mask_logits, pixel, scale):
        keep(graph("likelihood"), lambda: (x.detach().clone(), means.detach().clone(), mask_logits.detach().clone()))
        return terms_fn(x, means, mask_logits, pixel, scale)

    def gradients(x, lam, q, decoded, terms, keep_graph):
        out = gradients_fn(x, lam, q, decoded, terms, keep_graph)
        keep("gradients", lambda: {"x": x.detach().clone(), "lam": lam.detach().clone(),
                                   "means": decoded.means.detach(), "mask_logits": decoded.mask_logits.detach(),
                                   "terms": [t.detach() for t in terms], "grads": {k: v.detach() for k, v in out.items()}})
        return out

    likelihood.mixture_terms = generative.mixture_terms = terms
    guide._loss_gradients = gradients
    try:
        yield calls, first
    finally:
        for h in hooks:
            h.remove()
        likelihood.mixture_terms = generative.mixture_terms = terms_fn
        del guide._loss_gradients


# -- the steps -------------------------------------------------------------------------------


def plain_loss(system: Iodine, x: torch.Tensor) -> torch.Tensor:
    """sum_t w_t L_t in plain torch with the system's own modules: the loop of
    `bench_train_step.plain_loss`, with the refinement network called through
    `IterativeGuide.refine` so that it runs under the step's autocast. Each step's mixture
    terms are computed once and shared by the loss and the refinement inputs."""
    guide, model = system.guide, system.model
    weights = system.weights()
    B, K = x.shape[0], model.cfg.num_slots
    prior = model.prior(B, like=x)
    lam, state, total = guide.lambda0.expand(B, K, -1), None, x.new_zeros(())
    for t, w in enumerate(weights):
        q = guide.posterior(lam)
        decoded = model.decode(q.rsample())
        terms = model.terms(x, decoded)
        if w > 0:
            total = total + w * (-terms.log_px.sum((1, 2)).mean() + kl_divergence(q, prior).sum((1, 2)).mean())
        if t < len(weights) - 1:
            spatial, vector = guide.refinement_inputs(x, lam, q, decoded, keep_graph=True, terms=terms)
            delta, state = guide.refine(spatial, vector, state)
            lam = lam + delta.view(B, K, -1)
    return total


def core_step(system: Iodine, opt: torch.optim.Optimizer, loss: Callable[[], torch.Tensor]) -> None:
    """zero_grad, loss, backward, global-norm clip, Adam (the step without fit's guards)."""
    opt.zero_grad(set_to_none=True)
    loss().backward()
    with record_function("clip_grad_norm"):
        torch.nn.utils.clip_grad_norm_([p for p in system.parameters() if p.grad is not None],
                                       system.cfg.train.clip_norm)
    opt.step()


def nograd(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(arg):
        with torch.no_grad():
            return fn(arg)
    return run


# -- the parts, timed alone ------------------------------------------------------------------


def decoder_probes(system: Iodine, z: torch.Tensor) -> dict[str, Probe]:
    """The decoder on its input z [B*K, D], under the model's autocast, with its output cast
    back to float32 as `IodineModel.decode` does: forward (with and without a graph), the
    backward of the final `backward` (into z and the weights) and the backward to z alone."""
    model = system.model
    z = leaf(z)

    def forward(_=None):
        with autocast(z, model.amp_dtype):
            out = model.decoder(z)
        return out.to(z.dtype)

    out = forward()
    return {"fwd": Probe("fwd", forward),
            "fwd_ng": Probe("fwd, no grad", nograd(forward)),
            "bwd": Probe("bwd", grad_of(out, [z, *model.decoder.parameters()])),
            "bwd_z": Probe("bwd to z", grad_of(out, [z]))}


def refinement_probes(guide, spatial_vector: list[torch.Tensor]) -> dict[str, Probe]:
    """f_phi on the step's [B*K, C_in, H, W] and [B*K, V] inputs, under the guide's autocast."""
    spatial, vector = spatial_vector
    forward = lambda _=None: guide.refine(spatial, vector, None)
    delta, _ = forward()
    return {"fwd": Probe("fwd", forward),
            "fwd_ng": Probe("fwd, no grad", nograd(forward)),
            "bwd": Probe("bwd", grad_of(delta, [spatial, vector, *guide.net.parameters()]))}


def lstm_probes(guide, h: torch.Tensor) -> dict[str, Probe]:
    """The refinement network's LSTM cell alone (zero state), under the guide's autocast."""
    h = leaf(h)

    def forward(_=None):
        with autocast(h, guide.amp_dtype):
            return guide.net.lstm(h)

    out = forward()
    return {"fwd": Probe("fwd", forward),
            "bwd": Probe("bwd", grad_of(list(out), [h, *guide.net.lstm.parameters()]))}


def norm_probes(guide, first: dict) -> dict[str, Probe]:
    """Every `InputNorm` of one refinement step on its input (stop-gradient inputs stay
    detached: their backward computes the affine parameters' gradients only)."""
    names = [n for n in guide.norms if f"norm/{n}" in first]
    items = [(guide.norms[n], first[f"norm/{n}"]) for n in names]
    forward = lambda _=None: [norm(t) for norm, t in items]
    outs = forward()
    params = [p for norm, _ in items for p in norm.parameters()]
    return {"fwd": Probe("fwd", forward),
            "fwd_ng": Probe("fwd, no grad", nograd(forward)),
            "bwd": Probe("bwd", grad_of(outs, params))}


def likelihood_probes(model, tensors) -> dict[str, Probe]:
    """`mixture_terms` on the step's x [B, C, H, W], means [B, K, C, H, W], mask logits."""
    x, means, mask_logits = tensors
    means, mask_logits = leaf(means), leaf(mask_logits)
    forward = lambda _=None: likelihood.mixture_terms(x, means, mask_logits, model.cfg.pixel, model.pixel_scale)
    out = forward()
    return {"fwd": Probe("fwd", forward),
            "fwd_ng": Probe("fwd, no grad", nograd(forward)),
            "bwd": Probe("bwd", grad_of(out.log_px.sum(), [means, mask_logits]))}


def elu_probes(h: torch.Tensor) -> dict[str, Probe]:
    """One ELU of the convolution stacks on its [B*K, c, H, W] input (bf16 under autocast)."""
    h = leaf(h)
    forward = lambda _=None: torch.nn.functional.elu(h)
    return {"fwd": Probe("fwd", forward), "fwd_ng": Probe("fwd, no grad", nograd(forward)),
            "bwd": Probe("bwd", grad_of(forward(), [h]))}


def conv_ceiling_probes(system: Iodine, h: torch.Tensor) -> dict[str, Probe]:
    """A lone forward convolution of the decoder's hidden layer shape, float32 and bf16: the
    rate this core reaches on the step's costliest op when nothing else runs."""
    conv = next((m for m in system.model.decoder.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.in_channels == h.shape[1]), None)
    out = {}
    if conv is None:
        return out
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = (t.detach().to(dtype) for t in (h, conv.weight, conv.bias))
        out[str(dtype).split(".")[-1]] = Probe("fwd", lambda _, x=x, w=w, b=b: torch.nn.functional.conv2d(
            x, w, b, padding=conv.padding))
    return out


def gradient_probes(system: Iodine, cap: dict) -> dict[str, Probe]:
    """`IterativeGuide._loss_gradients` (the inner autograd.grad) on a graph rebuilt from
    the step's lambda: posterior, sample, decoder, mixture terms. Training keeps the graph
    (``retain_graph``, as the step does); evaluation frees it, so it is rebuilt (untimed)."""
    guide, model, x = system.guide, system.model, cap["x"]

    def build():
        lam = leaf(cap["lam"])
        q = guide.posterior(lam)
        decoded = model.decode(q.rsample())
        return lam, q, decoded, model.terms(x, decoded)

    graph = build()
    return {"train": Probe("calls", lambda _: guide._loss_gradients(x, *graph, True)),
            "eval": Probe("calls, graph freed", lambda g: guide._loss_gradients(x, *g, False), build)}


def input_probes(guide, cap: dict) -> dict[str, Probe]:
    """The refinement inputs but the layer norms: masks, mask posterior, leave-one-out,
    likelihood, coordinates, tiled over slots and concatenated; from the step's tensors."""
    x, lam, means, mask_logits = cap["x"], leaf(cap["lam"]), leaf(cap["means"]), leaf(cap["mask_logits"])
    terms = MixtureTerms(*(leaf(t) for t in cap["terms"]))
    ctx = Context(x, lam, means, mask_logits, terms, cap["grads"], guide.cfg.mask_posterior)
    B, K = lam.shape[:2]

    def forward(_=None):
        feats = [guide._compute(row, ctx) for row in guide.spatial_inputs]
        spatial = torch.cat([f.expand(B, K, *f.shape[2:]).reshape(B * K, *f.shape[2:]) for f in feats], 1)
        vecs = [guide._compute(row, ctx).reshape(B * K, -1) for row in guide.vector_inputs]
        return [spatial] + ([torch.cat(vecs, 1)] if vecs else [])

    outs = forward()
    return {"fwd": Probe("fwd", forward),
            "fwd_ng": Probe("fwd, no grad", nograd(forward)),
            "bwd": Probe("bwd", grad_of(outs, [lam, means, mask_logits, *terms]))}


# -- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    """A line of a table: the sum of probes times their calls, or a given time."""

    name: str
    terms: list[tuple[Probe, int]] = field(default_factory=list)
    given_ms: float | None = None
    counted: bool = True       # False: a detail of the row above, not added to the total

    @property
    def ms(self) -> float:
        return self.given_ms if self.given_ms is not None else sum(p.median * n for p, n in self.terms)

    @property
    def flops(self) -> float:
        return sum(p.flops * n for p, n in self.terms)

    @property
    def runs(self) -> str:
        return " + ".join(f"{n} {p.label}" for p, n in self.terms if n)


def print_table(title: str, rows: list[Row], total_ms: float) -> None:
    print(f"\n{title}\n")
    print("| part | runs per pass | CPU ms | share | GFLOP | GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        gflop = r.flops / 1e9
        rate = f"{gflop / (r.ms / 1e3):.1f}" if gflop and r.ms > 0 else ""
        name = r.name if r.counted else f"  of which: {r.name}"
        print(f"| {name} | {r.runs} | {r.ms:.1f} | {r.ms / total_ms:.1%} | {gflop:.2f} | {rate} |".replace("| 0.00 |", "| |"))
    print(f"| **total (measured whole)** | | **{total_ms:.1f}** | 100% | | |")


def paired(a: Probe, b: Probe) -> float:
    """The median over rounds of a's time minus b's (measured one after the other)."""
    return statistics.median(p - q for p, q in zip(a.ms, b.ms))


def training_rows(P: dict, calls: Counter, plain_calls: Counter, full: dict) -> list[Row]:
    """The training step's parts; `full` holds the whole-step probes."""
    T_dec, T_ref, n_lik = calls["decoder"], calls["refinement"], calls["likelihood"]
    extra = n_lik - plain_calls["likelihood"]      # evaluations Pyro's model adds to the plain loop
    lik = P["likelihood"]
    rows = [Row("decoder (convolutions, ELUs, first layer)", [(P["decoder"]["fwd"], T_dec), (P["decoder"]["bwd"], T_dec)]),
            Row("gradient inputs (inner autograd.grad)", [(P["gradients"]["train"], calls["gradients"])]),
            Row("decoder backward to z", [(P["decoder"]["bwd_z"], calls["gradients"])], counted=False),
            Row("refinement network", [(P["refinement"]["fwd"], T_ref), (P["refinement"]["bwd"], T_ref)])]
    if "lstm" in P:
        rows.append(Row("LSTM", [(P["lstm"]["fwd"], calls["lstm"]), (P["lstm"]["bwd"], calls["lstm"])], counted=False))
    else:
        rows.append(Row("LSTM: none in this preset", given_ms=0.0, counted=False))
    rows.append(Row("ELU activations in the rows above", [(P["elu"]["fwd"], calls["elu"]),
                                               (P["elu"]["bwd"], calls["elu"] + calls["gradients"] * P["elu_per_decoder"])],
                    counted=False))
    rows += [Row("likelihood and softmax (mixture_terms)", [(lik["fwd"], n_lik), (lik["bwd"], n_lik)]),
             Row("other refinement inputs", [(P["inputs"]["fwd"], T_ref), (P["inputs"]["bwd"], T_ref)]),
             Row("layer norms of the inputs", [(P["norms"]["fwd"], T_ref), (P["norms"]["bwd"], T_ref)]),
             Row("optimiser (clip + Adam)", [(full["optimiser"], 1)]),
             Row("fit's guards (checks, snapshot)", [(full["guards"], 1)])]
    pyro_ms = paired(full["pyro"], full["plain"]) - extra * (lik["fwd"].median + lik["bwd"].median)
    rows.append(Row("Pyro tracing and ELBO bookkeeping", given_ms=pyro_ms))
    parts = sum(r.ms for r in rows if r.counted)
    rows.append(Row("left (Python, allocation, KL, sampling)", given_ms=full["step"].median - parts))
    return rows


def eval_rows(P: dict, calls: Counter, full: dict) -> list[Row]:
    """The evaluation pass's parts (`Iodine.infer`)."""
    n_ref = calls["refinement (no grad)"]
    rows = [Row("decoder forward", [(P["decoder"]["fwd"], calls["decoder"]),
                                    (P["decoder"]["fwd_ng"], calls["decoder (no grad)"])]),
            Row("gradient inputs (inner autograd.grad)", [(P["gradients"]["eval"], calls["gradients"])]),
            Row("decoder backward to z", [(P["decoder"]["bwd_z"], calls["gradients"])], counted=False),
            Row("refinement network", [(P["refinement"]["fwd_ng"], n_ref)]),
            Row("ELU activations in the rows above", [(P["elu"]["fwd"], calls["elu"]), (P["elu"]["fwd_ng"], calls["elu (no grad)"]),
                                           (P["elu"]["bwd"], calls["gradients"] * P["elu_per_decoder"])], counted=False),
            Row("likelihood and softmax (mixture_terms)", [(P["likelihood"]["fwd"], calls["likelihood"]),
                                                           (P["likelihood"]["fwd_ng"], calls["likelihood (no grad)"])]),
            Row("other refinement inputs", [(P["inputs"]["fwd_ng"], n_ref)]),
            Row("layer norms of the inputs", [(P["norms"]["fwd_ng"], n_ref)])]
    parts = sum(r.ms for r in rows if r.counted)
    rows.append(Row("left (Python, Pyro sites, summaries, KL)", given_ms=full["infer"].median - parts))
    return rows


# -- the profiler's view ---------------------------------------------------------------------


GROUPS = {
    "convolution forward": {"mkldnn_convolution", "convolution", "_convolution", "conv2d", "slow_conv2d_forward",
                            "_nnpack_spatial_convolution", "thnn_conv2d"},
    "convolution backward": {"convolution_backward", "mkldnn_convolution_backward", "slow_conv2d_backward"},
    "linear / addmm / mm": {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm"},
    "layer_norm": {"layer_norm", "native_layer_norm", "native_layer_norm_backward"},
    "softmax / logsumexp": {"_softmax", "softmax", "_log_softmax", "log_softmax", "logsumexp",
                            "_softmax_backward_data", "_log_softmax_backward_data"},
    "reductions (sum, mean, var, norms)": {"sum", "mean", "var", "var_mean", "std", "amax", "amin", "max", "min",
                                           "all", "any", "linalg_vector_norm", "norm"},
    "copies, casts, concatenation": {"copy_", "_to_copy", "to", "cat", "clone", "contiguous", "stack", "fill_",
                                     "zero_", "zeros", "zeros_like", "ones", "full", "full_like", "empty",
                                     "empty_strided", "empty_like", "new_zeros", "new_ones", "new_empty",
                                     "new_full", "resize_", "slice_backward", "select_backward", "index_select"},
    "views and metadata": {"view", "as_strided", "as_strided_", "reshape", "_reshape_alias", "_unsafe_view",
                           "expand", "slice", "select", "narrow", "split", "unbind", "unsqueeze", "squeeze",
                           "transpose", "t", "permute", "detach", "alias", "resolve_conj", "resolve_neg",
                           "item", "_local_scalar_dense", "broadcast_tensors", "diag_embed", "meshgrid",
                           "linspace", "arange", "lift_fresh"},
    "random numbers": {"normal_", "normal", "uniform_", "rand", "randn", "bernoulli_"},
}
ELEMENTWISE = re.compile(r"^_?(add|sub|rsub|mul|div|neg|exp|log|log1p|expm1|sqrt|rsqrt|pow|abs|elu|softplus|sigmoid"
                         r"|tanh|where|masked_fill|clamp|clamp_min|clamp_max|eq|ne|lt|le|gt|ge|isfinite|isnan"
                         r"|isinf|logical_\w+|bitwise_\w+|lerp|addcdiv|addcmul|reciprocal|sign|maximum|minimum"
                         r"|square|relu|threshold|foreach_\w+)_?(_backward)?$")
OPTIMIZER = "optimizer (Adam, clip, zero_grad)"


def op_group(event) -> str:
    """The kind of an event of torch.profiler: an aten op by name, or the optimiser's
    (every op under Adam's or the clip's range), or the autograd engine and Python ranges."""
    e = event
    while e is not None:
        if e.name.startswith("Optimizer.") or e.name == "clip_grad_norm":
            return OPTIMIZER
        e = e.cpu_parent
    if not event.name.startswith("aten::"):
        return "autograd engine, ranges (self)"
    op = event.name[len("aten::"):]
    for group, names in GROUPS.items():
        if op in names:
            return group
    return "elementwise (and their backward)" if ELEMENTWISE.match(op) else "other aten ops"


@contextlib.contextmanager
def labelled_clip():
    """Mark the global-norm clip of `train_step` with a profiler range."""
    clip = torch.nn.utils.clip_grad_norm_

    def labelled(*args, **kwargs):
        with record_function("clip_grad_norm"):
            return clip(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = labelled
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = clip


def profile_groups(fn: Callable[[], Any]) -> tuple[dict[str, float], list[tuple[str, float]], float, float]:
    """Self time (ms, the profiler's wall clock) of one call of `fn` by kind of op, the ten
    costliest ops, and the call's wall and thread CPU time under the profiler."""
    with labelled_clip(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall, cpu = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
    groups, ops = defaultdict(float), defaultdict(float)
    for e in prof.events():
        groups[op_group(e)] += e.self_cpu_time_total / 1e3
        ops[e.name] += e.self_cpu_time_total / 1e3
    return dict(groups), sorted(ops.items(), key=lambda kv: -kv[1])[:10], wall, cpu


def print_groups(title: str, groups: dict[str, float], top: list[tuple[str, float]], wall: float, cpu: float) -> None:
    total = sum(groups.values())
    print(f"\n{title}: self time by kind of op (torch.profiler, record_shapes; wall clock)\n")
    print("| kind of op | ms | share of op time |")
    print("|---|---:|---:|")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {ms:.1f} | {ms / total:.1%} |")
    print(f"| all ops | {total:.1f} | 100% |")
    print(f"\nthe profiled call: {wall:.0f} ms wall, {cpu:.0f} ms thread CPU; wall time outside any op "
          f"(Python, Pyro) {wall - total:.1f} ms ({(wall - total) / wall:.1%})")
    print("costliest ops: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in top))


# -- the machine -----------------------------------------------------------------------------


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, and lscpu's "CPU max MHz" if any."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("CPU max MHz:"):
                info["max MHz"] = line.split(":", 1)[1].strip()
    return info


def peak_per_cycle(info: dict[str, str]) -> tuple[int, int, str]:
    """(fp32, bf16) FLOP per cycle of one core, and the assumption behind them."""
    flags = set(info.get("flags", "").split())
    vendor, family = info.get("vendor_id", ""), int(info.get("cpu family", "0") or 0)
    bf16 = "avx512_bf16" in flags
    if vendor == "AuthenticAMD":
        if family >= 26:
            return 64, 128 if bf16 else 64, "AMD Zen 5: 2 x 512-bit FMA pipes -> 64 fp32 FLOP/cycle; AVX512-BF16 twice that"
        if family == 25 and "avx512f" in flags:
            return 32, 64 if bf16 else 32, ("AMD Zen 4: 2 x 256-bit FMA pipes (AVX-512 in two halves) -> 32 fp32 "
                                            "FLOP/cycle; AVX512-BF16 dot products (VDPBF16PS) twice that")
        return 32, 32, "AMD Zen 2/3: 2 x 256-bit FMA pipes -> 32 fp32 FLOP/cycle; no bf16 instructions"
    if "amx_bf16" in flags:
        return 64, 1024, "Intel with AMX: 2 x 512-bit FMA -> 64 fp32 FLOP/cycle; AMX-BF16 tiles 1024 bf16 FLOP/cycle"
    if "avx512f" in flags:
        return 64, 128 if bf16 else 64, "Intel AVX-512, 2 FMA units -> 64 fp32 FLOP/cycle; AVX512-BF16 twice that"
    if "fma" in flags:
        return 32, 32, "AVX2, 2 FMA units -> 32 fp32 FLOP/cycle"
    return 8, 8, "no FMA: 8 FLOP/cycle assumed"


def machine_line(info: dict[str, str], amp: bool, clock_mhz: float | None) -> tuple[float, float, str, float]:
    """(fp32 and bf16 peak GFLOP/s of one core, a description of the machine, the clock in MHz)."""
    flags = set(info.get("flags", "").split())
    mhz = clock_mhz or float(info.get("max MHz") or info.get("cpu MHz") or "nan")
    clock = "--clock-mhz" if clock_mhz else "lscpu CPU max MHz" if info.get("max MHz") else "/proc/cpuinfo cpu MHz"
    fp32, bf16, why = peak_per_cycle(info)
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    text = (f"CPU {info.get('model name', platform.processor())} (vendor {info.get('vendor_id')}, family "
            f"{info.get('cpu family')} model {info.get('model')}), flags {' '.join(shown)}; {mhz:.0f} MHz ({clock}); "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); networks "
            f"{'bf16 autocast' if amp else 'float32'}\npeak per core assumed: {why}: "
            f"{fp32 * mhz / 1e3:.0f} GFLOP/s fp32, {bf16 * mhz / 1e3:.0f} GFLOP/s bf16 at {mhz:.0f} MHz")
    return fp32 * mhz / 1e3, bf16 * mhz / 1e3, text, mhz


# -- putting it together ---------------------------------------------------------------------


def build(a: argparse.Namespace) -> tuple[Iodine, torch.optim.Optimizer, torch.Tensor]:
    """The system as `fit` builds it on this CPU, its Adam, and a batch of random images."""
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    if a.batch_size:
        overrides["train.batch_size"] = a.batch_size
    cfg = make_config(a.dataset, a.preset, overrides)
    torch.manual_seed(0)
    system = Iodine(cfg).use_fast_paths(torch.bfloat16 if a.amp else None)
    x = torch.rand(cfg.train.batch_size, cfg.model.image_channels, *cfg.model.image_size)
    return system, make_optimizer(system, cfg), x


def optimiser_probe(system: Iodine, opt: torch.optim.Optimizer) -> Probe:
    """Global-norm clip and Adam on a copy of the parameters that holds the last step's
    gradients (repeated updates with one gradient must not move the system's own)."""
    params = [p.detach().clone().requires_grad_() for p in system.parameters() if p.grad is not None]
    for copy_, p in zip(params, [p for p in system.parameters() if p.grad is not None]):
        copy_.grad = p.grad.clone()
    adam = torch.optim.Adam(params, **opt.defaults)

    def step(_):
        torch.nn.utils.clip_grad_norm_(params, system.cfg.train.clip_norm)
        adam.step()

    return Probe("call", step)


def guards(system: Iodine, x: torch.Tensor, snap: Snapshot) -> None:
    """What `train_step` does besides the step: batch checks, snapshot, finiteness check."""
    bool(torch.isfinite(x).all())
    system.check_batch(x)
    snap.save()
    bool(snap.finite())


def make_probes(system: Iodine, opt, x: torch.Tensor, snap: Snapshot, first: dict):
    """The parts' probes (by part), the whole-step probes, and the decoder and refinement
    network under other precisions and memory layouts."""
    clip = system.cfg.train.clip_norm
    skipped = []               # train_step skips a step whose loss or update is not finite
    still = copy.deepcopy(system)   # the parts' own copy: the steps update the system's weights in place
    parts = {"decoder": decoder_probes(still, first["decoder"]),
             "refinement": refinement_probes(still.guide, first["refinement"]),
             "norms": norm_probes(still.guide, first),
             "likelihood": likelihood_probes(still.model, first["likelihood"]),
             "gradients": gradient_probes(still, first["gradients"]),
             "inputs": input_probes(still.guide, first["gradients"])}
    if "lstm" in first:
        parts["lstm"] = lstm_probes(still.guide, first["lstm"][0])
    parts["elu"] = elu_probes(first["elu"])
    parts["ceiling"] = conv_ceiling_probes(still, first["elu"])
    full = {"step": Probe("step", lambda _: skipped.append(not train_step(system, opt, x, clip, snapshot=snap)[2])),
            "pyro": Probe("step", lambda _: core_step(system, opt, lambda: system.loss(x, check=False))),
            "plain": Probe("step", lambda _: core_step(system, opt, lambda: plain_loss(system, x))),
            "pyro loss": Probe("loss", lambda _: system.loss(x, check=False)),
            "plain loss": Probe("loss", lambda _: plain_loss(system, x)),
            "optimiser": optimiser_probe(system, opt),
            "guards": Probe("call", lambda _: guards(system, x, snap)),
            "infer": Probe("pass", lambda _: system.infer(x))}
    variants = {}
    for amp, cl in ((torch.bfloat16, False), (torch.bfloat16, True), (None, False), (None, True)):
        other = copy.deepcopy(system).use_fast_paths(amp, cl)
        dec, ref = decoder_probes(other, first["decoder"]), refinement_probes(other.guide, first["refinement"])
        name = f"{'bf16 autocast' if amp else 'float32'}, {'channels-last' if cl else 'NCHW'}"
        variants[name] = {"decoder fwd": dec["fwd"], "decoder bwd": dec["bwd"], "decoder bwd to z": dec["bwd_z"],
                          "refinement fwd": ref["fwd"], "refinement bwd": ref["bwd"]}
    return parts, full, variants, skipped


def print_variants(variants: dict, calls: Counter) -> None:
    n = {"decoder fwd": calls["decoder"], "decoder bwd": calls["decoder"], "decoder bwd to z": calls["gradients"],
         "refinement fwd": calls["refinement"], "refinement bwd": calls["refinement"]}
    print("\nThe networks alone under other settings: CPU ms per call, and per training step\n")
    print("| networks | " + " | ".join(n) + " | per step |")
    print("|---|" + "---:|" * (len(n) + 1))
    for name, probes in variants.items():
        per_step = sum(probes[k].median * n[k] for k in n)
        print(f"| {name} | " + " | ".join(f"{probes[k].median:.2f}" for k in n) + f" | {per_step:.0f} |")


def print_flops(title: str, fn: Callable[[], Any], cpu_ms: float, refs: dict[str, float]) -> None:
    """FLOPs of one call of `fn` by op (FlopCounterMode), and the rate achieved in the CPU
    time measured against the reference rates `refs` (GFLOP/s)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    total = fc.get_total_flops()
    by_op = sorted(((str(op).split(".")[1] if "." in str(op) else str(op), n)
                    for op, n in fc.get_flop_counts().get("Global", {}).items()), key=lambda kv: -kv[1])
    rate = total / (cpu_ms / 1e3) / 1e9
    print(f"\n{title}: {total / 1e9:.2f} GFLOP (" + ", ".join(f"{op} {n / 1e9:.2f}" for op, n in by_op) + ")")
    print(f"achieved {rate:.1f} GFLOP/s over {cpu_ms:.0f} ms of CPU: " +
          ", ".join(f"{rate / v:.0%} of {name} ({v:.0f} GFLOP/s)" for name, v in refs.items()))


def reference_rates(machine: tuple[float, float, str, float], ceiling: dict[str, Probe]) -> dict[str, float]:
    """The assumed peaks and the measured rates of a lone convolution; prints them."""
    peak32, peak16, _, mhz = machine
    refs = {f"fp32 peak at {mhz:.0f} MHz": peak32, f"bf16 peak at {mhz:.0f} MHz": peak16}
    for dtype, p in ceiling.items():
        refs[f"a lone {dtype} conv"] = p.flops / (p.median / 1e3) / 1e9
    if ceiling:
        per_cycle32 = peak32 / mhz * 1e3
        implied = refs["a lone float32 conv"] / per_cycle32 * 1e3
        print("\na lone forward 5x5 convolution of the decoder's hidden shape: " +
              ", ".join(f"{d} {refs[f'a lone {d} conv']:.0f} GFLOP/s ({p.median:.2f} ms)" for d, p in ceiling.items()) +
              f"; at {per_cycle32:.0f} fp32 FLOP/cycle the float32 one alone needs a clock of at least {implied:.0f} MHz")
        if implied > mhz:
            refs[f"bf16 peak at {implied:.0f} MHz"] = peak16 * implied / mhz
    return refs


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="tetrominoes")
    p.add_argument("--preset", default="fast")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=7, help="measurement rounds (medians over them)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the networks (default: as fit on this CPU, on where it has "
                        "AVX512-BF16 or AMX)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a configuration override, e.g. guide.lstm=64")
    p.add_argument("--clock-mhz", type=float, default=None,
                   help="the core clock for the peak (default: lscpu's CPU max MHz, else /proc/cpuinfo's cpu MHz)")
    a = p.parse_args()
    if a.amp is None:
        a.amp = cpu_has_fast_bf16()
    return a


def measured(a: argparse.Namespace, system: Iodine, opt, x: torch.Tensor, snap: Snapshot):
    """Capture a real step's tensors and call counts, then time every probe in rounds."""
    clip = system.cfg.train.clip_norm
    train_step(system, opt, x, clip, snapshot=snap)                         # warm-up
    with capture(system) as (calls, first):
        train_step(system, opt, x, clip, snapshot=snap)
    with capture(system) as (plain_calls, _):
        core_step(system, opt, lambda: plain_loss(system, x))
    with capture(system) as (eval_calls, _):
        system.infer(x)
    print(f"shapes: decoder input {list(first['decoder'].shape)}, refinement inputs "
          f"{[list(t.shape) for t in first['refinement']]}, mixture terms means {list(first['likelihood'][1].shape)}, "
          f"ELU input {list(first['elu'].shape)} {str(first['elu'].dtype).split('.')[-1]}")
    print("LSTM: " + ("yes" if "lstm" in first else "none in this preset"))
    print("calls per training step: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())))
    parts, full, variants, skipped = make_probes(system, opt, x, snap, first)
    probes = [p for d in parts.values() for p in d.values()] + list(full.values())
    probes += [p for d in variants.values() for p in d.values()]
    calibrate(probes)
    measure(probes, a.steps)
    if any(skipped):
        print(f"warning: {sum(skipped)} of {len(skipped)} training steps were skipped (not finite)")
    parts["elu_per_decoder"] = sum(isinstance(m, torch.nn.ELU) for m in system.model.decoder.modules())
    return parts, full, variants, calls, plain_calls, eval_calls


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    pyro.enable_validation(False)                       # as fit
    system, opt, x = build(a)
    cfg, snap = system.cfg, Snapshot(list(system.parameters()), opt)
    machine = machine_line(cpu_info(), a.amp, a.clock_mhz)
    print(f"{a.dataset} {a.preset}: batch {x.shape[0]}, K {cfg.model.num_slots}, images "
          f"{tuple(x.shape[1:])}, {len(system.weights())} decoder passes; {a.steps} rounds")
    print(machine[2])
    parts, full, variants, calls, plain_calls, eval_calls = measured(a, system, opt, x, snap)
    step_ms, infer_ms = full["step"].median, full["infer"].median
    print(f"\nwhole training step: median {step_ms:.0f} ms of CPU (rounds: "
          f"{', '.join(f'{m:.0f}' for m in full['step'].ms)}); the Pyro step without fit's guards "
          f"{full['pyro'].median:.0f} ms, the plain-PyTorch step {full['plain'].median:.0f} ms "
          f"(Pyro/plain {full['pyro'].median / full['plain'].median:.3f}); evaluation pass {infer_ms:.0f} ms (rounds: "
          f"{', '.join(f'{m:.0f}' for m in full['infer'].ms)})")
    lik = parts["likelihood"]
    extra = calls["likelihood"] - plain_calls["likelihood"]
    print(f"Pyro minus plain, paired by round: whole step {paired(full['pyro'], full['plain']):.1f} ms, loss forward "
          f"alone {paired(full['pyro loss'], full['plain loss']):.1f} ms (forward {full['pyro loss'].median:.0f} against "
          f"{full['plain loss'].median:.0f} ms); of which Pyro's model repeats {extra} likelihood evaluations: "
          f"{extra * lik['fwd'].median:.1f} ms forward, {extra * lik['bwd'].median:.1f} ms backward")
    print_table("Training step (train_step: loss, backward, clip, Adam, guards)",
                training_rows(parts, calls, plain_calls, full), step_ms)
    print_table("Evaluation pass (Iodine.infer under no_grad)", eval_rows(parts, eval_calls, full), infer_ms)
    print_variants(variants, calls)
    step = lambda: train_step(system, opt, x, cfg.train.clip_norm, snapshot=snap)
    print_groups("Training step", *profile_groups(step))
    print_groups("Evaluation pass", *profile_groups(lambda: system.infer(x)))
    refs = reference_rates(machine, parts["ceiling"])
    print_flops("FLOPs per training step", step, step_ms, refs)
    print_flops("FLOPs per evaluation pass", lambda: system.infer(x), infer_ms, refs)


if __name__ == "__main__":
    main()
