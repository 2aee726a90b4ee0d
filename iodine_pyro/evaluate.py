"""Evaluation of a trained run: FG-ARI, ARI, MSE, KL and NLL at every refinement step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import metrics
from .checkpoint import load_checkpoint
from .data import DatasetError, load_images, open_dataset
from .iodine import Iodine
from .models.iodine import Decoded
from .train import check_images


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Iodine, dict[str, Any]]:
    """The trained system of a run directory (eval mode) and its checkpoint."""
    ckpt = load_checkpoint(Path(run_dir), map_location=device)
    system = Iodine(ckpt["config"]).to(device)
    try:
        system.load_state_dict(ckpt["system"])
    except RuntimeError as e:
        from .checkpoint import CheckpointError
        raise CheckpointError(f"checkpoint in {run_dir} does not fit its configuration: "
                              f"{str(e).splitlines()[0]}") from None
    system.eval()
    return system, ckpt


def default_data(ckpt: dict[str, Any]) -> str:
    d = ckpt.get("data") or {}
    path = d.get("eval") or d.get("train")
    if not path:
        raise DatasetError("the checkpoint names no dataset; pass --data")
    return path


def evaluate(run_dir: str | Path, *, num_images: int = 256, batch_size: int = 32,
             data: str | Path | None = None, num_iters: int | None = None,
             num_slots: int | None = None, seed: int = 0, device: str = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Metrics per refinement step over the first `num_images` images of `data`.

    Returns a dict with lists over refinement steps: ``fg_ari``, ``ari`` (nan-aware means
    over images), ``mse`` (reconstruction, [0, 1] scale), ``kl`` (nats per image, summed
    over slots and dims), ``nll`` (nats per image); plus the settings used.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError("--num-images and --batch-size must be at least 1")
    system, ckpt = load_run(run_dir, device)
    cfg = ckpt["config"]
    data = str(data) if data else default_data(ckpt)
    ds = open_dataset(data)
    check_images(ds, cfg, data)
    if "frame" in ds["image"].dims:
        return evaluate_sequences(system, ckpt, ds, data, num_images=num_images, batch_size=batch_size,
                                  num_iters=num_iters, num_slots=num_slots, seed=seed, device=device,
                                  progress=progress)
    n = min(num_images, ds.sizes["image"])
    torch.manual_seed(seed)
    sums: dict[str, list[list[torch.Tensor]]] = {k: [] for k in ("fg_ari", "ari", "mse", "kl", "nll")}
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="evaluate", unit="batch"):
        batch = load_images(ds, start, min(start + batch_size, n))
        x = batch["image"].to(device)
        true = batch["mask"].to(device)
        steps = system.infer(x, num_iters=num_iters, num_slots=num_slots)
        per = {"fg_ari": [metrics.ari(true, s.masks, foreground_only=True) for s in steps],
               "ari": [metrics.ari(true, s.masks) for s in steps],
               "mse": [metrics.mse(x, s.recon) for s in steps],
               "kl": [s.kl.double() for s in steps], "nll": [s.nll.double() for s in steps]}
        for k, v in per.items():
            sums[k].append(torch.stack(v).cpu())                        # [steps, b]
    result: dict[str, Any] = {k: [metrics.summarize(row) for row in torch.cat(v, 1)]
                              for k, v in sums.items()}                 # [steps]
    result.update(num_images=n, data=data, step=int(ckpt["step"]), dataset=cfg.dataset,
                  preset=cfg.preset, guide=cfg.guide.kind,
                  num_slots=num_slots or cfg.model.num_slots,
                  num_iters=len(result["fg_ari"]))
    return result


def evaluate_sequences(system: Iodine, ckpt: dict[str, Any], ds, data: str, *, num_images: int,
                       batch_size: int, num_iters: int | None, num_slots: int | None, seed: int,
                       device: str, progress: bool) -> dict[str, Any]:
    """Tracking metrics of a sequence run: one refinement step per frame.

    Returns lists over frames: ``fg_ari`` (the dataset's background groups dropped: 4 for
    Objects Room), ``ari``, ``mse``, ``kl``, ``nll`` (-log p(frame t | z_t)), ``pred_nll``
    (-log p(frame t+1 | z_t), one shorter); and ``slot_stability`` (`metrics.slot_stability`,
    a nan-aware mean over sequences), with the settings used.
    """
    from .data.convert import background_groups
    from .models.iodine import frame

    cfg = ckpt["config"]
    background = background_groups(cfg.dataset, ds.attrs)
    n = min(num_images, ds.sizes["image"])
    torch.manual_seed(seed)
    sums: dict[str, list[torch.Tensor]] = {k: [] for k in ("fg_ari", "ari", "mse", "kl", "nll", "pred_nll")}
    stability = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="evaluate", unit="batch"):
        batch = load_images(ds, start, min(start + batch_size, n))
        x = batch["image"].to(device)                                   # [b, F, C, H, W]
        true = batch["mask"].to(device)                                 # [b, F, G, H, W]
        steps = system.infer(x, num_iters=num_iters, num_slots=num_slots)   # one per frame
        frames = range(len(steps))
        per = {"fg_ari": [metrics.ari(frame(true, t), s.masks, foreground_only=background)
                          for t, s in zip(frames, steps)],
               "ari": [metrics.ari(frame(true, t), s.masks) for t, s in zip(frames, steps)],
               "mse": [metrics.mse(frame(x, t), s.recon) for t, s in zip(frames, steps)],
               "kl": [s.kl.double() for s in steps], "nll": [s.nll.double() for s in steps],
               "pred_nll": [system.model.likelihood(Decoded(s.means, s.mask_logits)).log_prob(x[:, t + 1])
                            .neg().double() for t, s in zip(frames, steps[:-1])]}
        for k, v in per.items():
            sums[k].append(torch.stack(v).cpu())                        # [frames, b]
        masks = torch.stack([s.masks for s in steps], 1)                # [b, frames, K, H, W]
        stability.append(metrics.slot_stability(true[:, :len(steps)], masks, background).cpu())
    result: dict[str, Any] = {k: [metrics.summarize(row) for row in torch.cat(v, 1)]
                              for k, v in sums.items()}                 # [frames]
    result.update(slot_stability=metrics.summarize(torch.cat(stability)), sequence=True,
                  background_groups=background, num_images=n, data=data, step=int(ckpt["step"]),
                  dataset=cfg.dataset, preset=cfg.preset, guide=cfg.guide.kind,
                  num_slots=num_slots or cfg.model.num_slots, num_iters=len(result["fg_ari"]))
    return result
