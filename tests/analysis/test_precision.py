"""Inference precision: runs open channels-last in float32, or in bf16 with --amp, and every
output says which."""

import json

import pytest
import torch
import xarray as xr

from iodine_pyro.checkpoint import load_checkpoint
from iodine_pyro.evaluate import evaluate, inferred_batches
from iodine_pyro.metrics import mse
from iodine_pyro.run import Run
from iodine_pyro.system import Iodine

from ..helpers import run_main

pytestmark = pytest.mark.usefixtures("one_thread")


def _nchw(path) -> Iodine:
    """The run's system as loaded before inference went channels-last: NCHW, float32."""
    ckpt = load_checkpoint(path / "checkpoint.pt")
    system = Iodine(ckpt["config"])
    system.load_state_dict(ckpt["system"])
    return system.eval()


def _final(system, x, seed=3):
    torch.manual_seed(seed)
    return system.infer(x)[-1]


def test_a_run_opens_channels_last_in_float32_with_the_numbers_of_nchw(runs):
    run = Run.open(runs["iterative"])
    assert run.system.precision == "float32"
    convs = [m for m in run.system.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = run.images(0, 4)[0]["image"]
    new, old = _final(run.system, x), _final(_nchw(runs["iterative"]), x)
    for name in ("lam", "masks", "recon", "nll", "kl"):
        torch.testing.assert_close(getattr(new, name), getattr(old, name), rtol=1e-4, atol=1e-4, msg=name)


def test_amp_runs_the_networks_in_bf16_near_the_float32_numbers(runs):
    full = evaluate(runs["iterative"], num_images=8, progress=False)
    half = evaluate(runs["iterative"], num_images=8, amp=True, progress=False)
    assert (full["precision"], half["precision"]) == ("float32", "bfloat16")
    assert half["mse"] != full["mse"]                                  # it did run in bf16
    assert half["mse"] == pytest.approx(full["mse"], rel=0.05)
    assert half["kl"] == pytest.approx(full["kl"], rel=0.05)
    run = Run.open(runs["iterative"], amp=True)
    assert run.system.precision == "bfloat16"
    assert Run.of(run).system.precision == "bfloat16"                  # a Run is taken as it is
    assert Run.of(run, amp=False).system.precision == "float32"        # unless amp is given


def test_evaluate_draws_from_its_own_seeded_stream_and_leaves_the_callers(runs):
    torch.manual_seed(11)
    state = torch.get_rng_state()
    a = evaluate(runs["iterative"], num_images=4, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)                   # the caller's stream is as it was
    torch.manual_seed(12)                                              # and does not change the scores
    b = evaluate(runs["iterative"], num_images=4, batch_size=2, progress=False)
    c = evaluate(runs["iterative"], num_images=4, batch_size=2, seed=1, progress=False)
    assert a["kl"] == b["kl"] and a["mse"] == b["mse"]
    assert c["kl"] != a["kl"]                                          # the seed picks the draws


def test_inferred_batches_are_the_draws_evaluate_scores(runs):
    run = Run.open(runs["iterative"])
    ds, _ = run.dataset()
    torch.manual_seed(11)
    state = torch.get_rng_state()
    batches = list(inferred_batches(run, ds, num_images=5, batch_size=2))
    assert torch.equal(torch.get_rng_state(), state)                   # the caller's stream is as it was
    assert [b.x.shape[0] for b in batches] == [2, 2, 1] and all(b.true is not None for b in batches)
    assert {len(b.steps) for b in batches} == {run.cfg.guide.num_iters}
    per_image = torch.cat([mse(b.x, b.steps[-1].recon) for b in batches])
    scored = evaluate(run, num_images=5, batch_size=2, progress=False)
    assert float(per_image.mean()) == pytest.approx(scored["mse"][-1], rel=1e-9)
    again = list(inferred_batches(run, ds, num_images=5, batch_size=2))
    assert all(torch.equal(a.steps[-1].z, b.steps[-1].z) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="at least 1"):
        next(inferred_batches(run, ds, num_images=0, batch_size=2))


def test_the_commands_take_amp_and_record_it(runs, tmp_path):
    code, out, err = run_main("evaluate", runs["iterative"], "--num-images", 4, "--amp", "--json")
    assert code == 0, err
    assert json.loads(out)["precision"] == "bfloat16"
    code, out, err = run_main("evaluate", runs["iterative"], "--num-images", 4, "--amp")
    assert code == 0 and "networks in bfloat16" in out.splitlines()[1], out
    code, out, err = run_main("evaluate", runs["iterative"], "--num-images", 4)
    assert code == 0 and "networks in" not in out, out

    code, _, err = run_main("sample", runs["iterative"], "--num-images", 2, "--num-samples", 2, "--amp",
                            "--out", tmp_path / "post.nc", "--quiet")
    assert code == 0, err
    assert xr.open_datatree(tmp_path / "post.nc")["posterior"].attrs["precision"] == "bfloat16"

    code, out, err = run_main("compare", runs["iterative"], "--num-images", 2, "--iw-samples", 2,
                              "--gap-steps", 2, "--evidence-samples", 8, "--no-generalize", "--amp",
                              "--out", tmp_path / "cmp", "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["precision"] == "bfloat16"
    assert "Networks in bfloat16." in (tmp_path / "cmp" / "compare.md").read_text()
