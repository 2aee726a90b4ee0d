"""Recomputation of one refinement step in the backward pass (appendix A.2's memory limit).

Training backpropagates through every refinement step, so by default each step keeps the
activations of a decoder pass and a refinement-network pass until the backward pass:
memory grows linearly with T. `recompute(fn, inputs, params)` runs a step's networks
once in the forward pass, keeps only the step's inputs (a few [B, K, 2 n_z] tensors and
the LSTM state) and its outputs, and runs the same function again in the backward pass to
get the activations it needs there.

Why not ``torch.utils.checkpoint``: a refinement step differentiates its own ELBO
(``torch.autograd.grad`` for the gradient inputs). Inside a non-reentrant checkpoint that
inner gradient unpacks tensors the checkpoint has just discarded, which triggers a
recomputation already in the forward pass: two decoder passes per sample before the
backward pass even starts (measured: 2 forward calls and 3 in all, against 1 and 2 here).
The reentrant variant runs the function without grad and cannot differentiate inside it.
Here the forward runs `fn` under ``enable_grad`` on detached inputs, so its inner
gradients come from a local graph that is dropped when `fn` returns; the backward runs
`fn` again and differentiates its outputs with ``torch.autograd.grad`` with respect to
the inputs and the parameters, which are passed as inputs so that the gradients reach
them through autograd (``.backward()`` and ``torch.autograd.grad`` of the loss both work).

`fn` must be deterministic in its inputs (no random draws: the step's noise is an input),
so the backward pass sees exactly the forward's values.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, num_inputs: int, *args):
        inputs, params = args[:num_inputs], args[num_inputs:]
        ctx.fn, ctx.num_inputs, ctx.params = fn, num_inputs, params
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        with torch.enable_grad():                              # the step's own inner gradients
            outputs = fn(*_leaves(inputs))
        return tuple(o.detach() for o in outputs)              # its local graph is dropped here

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        inputs = _leaves(ctx.saved_tensors)
        with torch.enable_grad():
            outputs = ctx.fn(*inputs)                          # the second pass, by design
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        wrt = [t for t in (*inputs, *ctx.params) if t.requires_grad]
        if not pairs or not wrt:
            return (None, None) + (None,) * (len(inputs) + len(ctx.params))
        found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                         allow_unused=True))
        return (None, None) + tuple(next(found) if t.requires_grad else None
                                    for t in (*inputs, *ctx.params))


def _leaves(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies (no data copied) that require grad where the originals do."""
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]


def recompute(fn: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
              params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """`fn(*inputs)` (a tuple of tensors) without keeping its activations for the backward pass.

    Args:
        fn: a deterministic function of `inputs` and of the parameters `params`.
        inputs: its tensor arguments (those that require grad get gradients).
        params: every trainable tensor `fn` reads besides `inputs`.
    """
    params = [p for p in params if p.requires_grad]
    return _Recompute.apply(fn, len(inputs), *inputs, *params)
