"""Nothing lost: crashes, signals, numerical faults, bad input, determinism."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import xarray as xr
import zarr

from iodine_pyro.checkpoint import CheckpointError, load_checkpoint
from iodine_pyro.data import generate, open_dataset
from iodine_pyro.system import Iodine
from iodine_pyro.training import TrainingError, fit

from ..helpers import (
    TINY_OVERRIDES,
    TINY_TOML,
    assert_one_line_error,
    assert_same_params,
    cli,
    params,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return generate("tetrominoes", 48, root / "tet", seed=0, progress=False, workers=1)


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(TINY_TOML)
    return path



def fit_args(out, data, tiny_toml, steps, *extra):
    return ["fit", "--config", tiny_toml, "--data", data, "--out", out, "--steps", steps,
            "--checkpoint-every", 3, "--log-every", 1, "--quiet", *extra]


def start_fit(out, data, tiny_toml, steps):
    args = [sys.executable, "-m", "iodine_pyro", *map(str, fit_args(out, data, tiny_toml, steps))]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out, at_least, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"fit ended early: {proc.stderr.read()}")
        try:
            if load_checkpoint(out)["step"] >= at_least:
                return
        except CheckpointError:
            pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data, tiny_toml):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = cli(*fit_args(out, data, tiny_toml, 24))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_sigkill_loses_at_most_the_steps_since_the_checkpoint(tmp_path, data, tiny_toml, uninterrupted):
    out = tmp_path / "run"
    proc = start_fit(out, data, tiny_toml, 24)
    rng = random.Random(0)
    wait_for_checkpoint(out, rng.choice([3, 6, 9, 12]), proc)
    time.sleep(rng.uniform(0.0, 0.1))                               # a random point after it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(out)["step"]                           # the latest file is whole
    assert 3 <= saved < 24
    proc = cli(*fit_args(out, data, tiny_toml, 24))
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # leftovers of the kill are gone
    assert load_checkpoint(out)["step"] == 24
    assert_same_params(params(out), params(uninterrupted))
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))                              # no gaps, no repeats


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_signals_checkpoint_and_stop(tmp_path, data, tiny_toml, uninterrupted, sig):
    out = tmp_path / "run"
    proc = start_fit(out, data, tiny_toml, 24)
    wait_for_checkpoint(out, 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    stopped_at = load_checkpoint(out)["step"]
    assert 3 <= stopped_at <= 24
    proc = cli(*fit_args(out, data, tiny_toml, 24))
    assert proc.returncode == 0, proc.stderr
    assert_same_params(params(out), params(uninterrupted))


def test_same_seed_gives_bit_identical_parameters(tmp_path, data):
    a = fit(out=tmp_path / "a", data=data, steps=4, overrides=TINY_OVERRIDES, progress=False)
    b = fit(out=tmp_path / "b", data=data, steps=4, overrides=TINY_OVERRIDES, progress=False)
    c = fit(out=tmp_path / "c", data=data, steps=4, overrides=TINY_OVERRIDES, progress=False, seed=1)
    assert_same_params(params(a.out), params(b.out))
    assert not torch.equal(params(a.out)["guide.lambda0"], params(c.out)["guide.lambda0"])


def _faulty_loss(monkeypatch, bad_calls, kind):
    """Make the training objective produce a NaN loss or a NaN gradient on the given (1-based) calls."""
    real = Iodine.objective
    calls = {"n": 0}

    def objective(self, x, *args, **kwargs):
        calls["n"] += 1
        value, mse = real(self, x, *args, **kwargs)
        if calls["n"] in bad_calls:
            if kind == "loss":
                return value * float("nan"), mse
            p = self.guide.lambda0

            def hook(g):                                            # once: a NaN gradient
                handle.remove()
                return torch.full_like(g, float("nan"))

            handle = p.register_hook(hook)
        return value, mse

    monkeypatch.setattr(Iodine, "objective", objective)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_steps_are_skipped_and_counted(tmp_path, data, monkeypatch, kind):
    _faulty_loss(monkeypatch, {2, 3}, kind)
    result = fit(out=tmp_path / "run", data=data, steps=4, overrides=TINY_OVERRIDES, progress=False,
                 log_every=100)
    assert result.step == 4 and result.skipped == 2
    state = params(result.out)
    assert all(torch.isfinite(v).all() for v in state.values())
    rows = (result.out / "metrics.jsonl").read_text()
    assert '"skipped": 2' in rows


def test_repeated_faults_stop_with_the_last_good_state(tmp_path, data, monkeypatch):
    good = fit(out=tmp_path / "good", data=data, steps=2, overrides=TINY_OVERRIDES, progress=False)
    _faulty_loss(monkeypatch, set(range(3, 100)), "loss")
    with pytest.raises(TrainingError, match="3 non-finite steps in a row.*last good state"):
        fit(out=tmp_path / "run", data=data, steps=10, progress=False,
            overrides={**TINY_OVERRIDES, "train.max_bad_steps": 3})
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    assert_same_params(params(tmp_path / "run"), params(good.out))


@pytest.mark.slow
def test_faults_through_the_cli_stop_with_one_line(tmp_path, data, tiny_toml):
    # a learning rate so large that the parameters overflow within a few steps
    proc = cli(*fit_args(tmp_path / "r", data, tiny_toml, 50, "--lr", "1e30", "--max-bad-steps", "2"))
    if proc.returncode == 0:
        pytest.skip("this machine's arithmetic did not overflow")
    assert_one_line_error(proc, "non-finite steps in a row")


# -- bad input, each through the CLI ---------------------------------------------------


def _copy_store(src, dst, **changes):
    """A copy of a stored dataset with some variables changed (`name=function of the array`)."""
    ds = open_dataset(src)
    variables = {k: (v.dims, changes[k](v.values) if k in changes else v.values) for k, v in ds.data_vars.items()}
    new = xr.Dataset(variables, attrs=dict(ds.attrs))
    new = new.reset_coords("image") if "image" in new.coords else new
    new.to_zarr(dst, mode="w", consolidated=False)
    return dst


@pytest.mark.slow
def test_float_images_are_refused(tmp_path, data, tiny_toml):
    bad = _copy_store(data, tmp_path / "float", image=lambda v: v.astype("float32") / 255)
    assert_one_line_error(cli(*fit_args(tmp_path / "r", bad, tiny_toml, 1)), str(bad), "uint8")


@pytest.mark.slow
def test_masks_that_are_not_one_hot_are_refused(tmp_path, data, tiny_toml):
    bad = tmp_path / "masks"
    import shutil
    shutil.copytree(data, bad)
    g = zarr.open_group(bad, mode="r+")
    m = g["mask"][:]
    m[5, 1] = 1                                                     # group 1 everywhere on image 5: overlaps
    g["mask"][:] = m
    assert_one_line_error(cli(*fit_args(tmp_path / "r", bad, tiny_toml, 2)), "not one-hot", str(bad))
    assert_one_line_error(cli("evaluate", tmp_path / "r", "--data", bad, "--json"), "not one-hot")


@pytest.mark.slow
def test_truncated_and_missing_data_are_refused(tmp_path, data, tiny_toml):
    import shutil
    bad = tmp_path / "truncated"
    shutil.copytree(data, bad)
    chunk = next(p for p in (bad / "image").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    assert_one_line_error(cli(*fit_args(tmp_path / "r", bad, tiny_toml, 1)), "truncated", str(bad))
    assert_one_line_error(cli(*fit_args(tmp_path / "r2", tmp_path / "nothing", tiny_toml, 1)), "no dataset")


def test_nan_or_out_of_range_pixels_are_refused_by_the_api():
    from ..helpers import tiny_config
    system = Iodine(tiny_config())
    x = torch.rand(2, 3, 12, 12)
    for bad, needle in [(x * 2, "[0, 1]"), (x.masked_fill(x > 0.5, float("nan")), "NaN"),
                        (torch.rand(2, 1, 12, 12), "shape"), ((x * 255).to(torch.uint8), "float")]:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            system.loss(bad)
        with pytest.raises(ValueError):
            system.infer(bad)


@pytest.mark.slow
def test_a_run_of_another_k_is_refused_unless_resumed_and_kept(tmp_path, data, tiny_toml):
    out = tmp_path / "run"
    assert cli(*fit_args(out, data, tiny_toml, 2)).returncode == 0
    before = (out / "checkpoint.pt").read_bytes()
    proc = cli(*fit_args(out, data, tiny_toml, 4, "--num-slots", "5"))
    assert_one_line_error(proc, "holds another run", "num_slots")
    assert (out / "checkpoint.pt").read_bytes() == before           # nothing written over it
    # --resume continues the stored run with its own settings and refuses what would change
    # its parameters or guide ...
    proc = cli(*fit_args(out, data, tiny_toml, 4, "--decoder", "deconv", "--resume"))
    assert_one_line_error(proc, "model.decoder 'broadcast' -> 'deconv'", "a resumed run may change only")
    assert (out / "checkpoint.pt").read_bytes() == before
    # ... but not K: no parameter of the iterative guide has a slot dimension, so the run
    # trains on with 5 slots from its step, and each metrics row says with how many
    proc = cli(*fit_args(out, data, tiny_toml, 4, "--num-slots", "5", "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert f"resuming the run in {out} at step 2 with model.num_slots 4 -> 5" in proc.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 4 and ckpt["config"].model.num_slots == 5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["num_slots"]) for r in rows] == [(1, 4), (2, 4), (3, 5), (4, 5)]
    # --overwrite replaces it
    proc = cli(*fit_args(out, data, tiny_toml, 2, "--num-slots", "5", "--overwrite"))
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["config"].model.num_slots == 5


@pytest.mark.slow
def test_a_directory_with_other_content_is_refused(tmp_path, data, tiny_toml):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert_one_line_error(cli(*fit_args(out, data, tiny_toml, 1)), "not empty", "--overwrite")
    assert (out / "notes.txt").read_text() == "precious"
    assert_one_line_error(cli(*fit_args(tmp_path / "none", data, tiny_toml, 1, "--resume")), "no run to resume")


@pytest.mark.slow
def test_a_foreign_checkpoint_is_refused(tmp_path, data, tiny_toml):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"weights": torch.zeros(3)}, out / "checkpoint.pt")
    assert_one_line_error(cli(*fit_args(out, data, tiny_toml, 1)), "not an iodine-pyro checkpoint",
                          str(out / "checkpoint.pt"))
    with pytest.raises(CheckpointError):
        load_checkpoint(out)
