"""Nothing lost, against a hostile user: what fit may touch, kills at every phase, damaged
data during training, a real guard against non-finite steps, full disks and read-only
targets. Each case is one of docs/robustness.md."""

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import iodine_pyro.data.store as store
import iodine_pyro.train as train
from iodine_pyro.checkpoint import load_checkpoint, save_checkpoint
from iodine_pyro.cli import main
from iodine_pyro.data import DatasetError, generate, is_store, open_dataset
from iodine_pyro.io import WriteError, pid_alive
from iodine_pyro.train import MANIFEST, TrainingError, fit

from .helpers import TINY_OVERRIDES, TINY_TOML, assert_same_params, params

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}   # as the tests in this process


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks: one thread is fastest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 images in chunks of 16: three chunk files per variable, each read on its own."""
    return generate("tetrominoes", 48, tmp_path_factory.mktemp("data") / "tet", seed=0, progress=False,
                    workers=1, chunk_size=16)


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def run_main(*args) -> tuple[int, str]:
    """The command line in this process: (exit status, what it printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
    return exit_.value.code, err.getvalue()


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under `root` with what it is: a link's target, a file's bytes."""
    state = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_file():
            state[rel] = ("file", path.read_bytes())
        else:
            state[rel] = ("dir",)
    return state


def tiny_fit(out, data, steps=2, **kw):
    return fit(out=out, data=data, steps=steps, overrides={**TINY_OVERRIDES, **kw.pop("overrides", {})},
               progress=False, **kw)



# -- 1. fit touches only what it made -----------------------------------------------------


def test_overwrite_keeps_the_dataset_it_is_given_and_never_follows_a_data_link(tmp_path):
    out = tmp_path / "run"
    fit(out=out, steps=1, num_images=8, overrides=TINY_OVERRIDES, progress=False)   # generates OUT/data
    train_store = out / "data" / "train"
    before = tree_state(train_store)
    fit(out=out, data=train_store, steps=1, overrides=TINY_OVERRIDES, progress=False, overwrite=True)
    assert tree_state(train_store) == before                         # the --data store under OUT/data stays
    assert "data/train" not in json.loads((out / MANIFEST).read_text())["stores"]

    elsewhere = tmp_path / "mine"                                    # OUT/data a link to the user's data
    shutil.copytree(train_store, elsewhere / "train")
    linked = tmp_path / "linked"
    tiny_fit(linked, train_store, steps=1, eval_data=train_store)
    (linked / "data").symlink_to(elsewhere)
    mine = tree_state(elsewhere)
    for extra in ({"overwrite": True}, {}):
        with pytest.raises(ValueError, match="data is a symbolic link"):
            tiny_fit(linked, train_store, steps=2, **extra)
    assert tree_state(elsewhere) == mine


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoint.pt", "decomposition.png", "curves.png"])
def test_run_files_are_never_written_through_links(tmp_path, data, name):
    out = tmp_path / "run"
    tiny_fit(out, data, steps=1)
    victim = tmp_path / "victim"
    victim.write_bytes(b"the user's file")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(victim)
    with pytest.raises(ValueError, match=f"{name} is a symbolic link"):
        tiny_fit(out, data, steps=2)
    assert victim.read_bytes() == b"the user's file"


def test_a_directory_of_the_users_files_is_not_a_run(tmp_path, data, tiny_toml):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "decomposition.png").write_bytes(b"my picture")
    before = tree_state(out)
    for extra in ([], ["--overwrite"]):
        code, err = run_main("fit", "--config", tiny_toml, "--data", data, "--out", out, "--steps", 1,
                             "--quiet", *extra)
        assert_one_line(code, err, "holds no run")
        assert tree_state(out) == before


def test_overwrite_removes_only_what_the_run_made(tmp_path, data):
    out = tmp_path / "run"
    tiny_fit(out, data, steps=2)
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    tiny_fit(out, data, steps=1, overwrite=True, overrides={"model.num_slots": 3})
    assert (out / "notes.txt").read_text() == "mine" and (out / "extra").is_dir()
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 1 and ckpt["config"].model.num_slots == 3


# -- 2. every interruption is recoverable by the same command -------------------------------

# Runs the command line and kills itself (SIGKILL: no handler, no cleanup) at one phase:
# after the first generated chunk arrives (recording the worker processes), or just before
# the nth rename of a file onto its name (the file written whole, not yet in place).
KILLER = r"""
import multiprocessing.forkserver, os, signal, sys
import iodine_pyro.data
from iodine_pyro.cli import main

generate = sys.modules["iodine_pyro.data.generate"]

phase, argv = sys.argv[1], sys.argv[2:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if phase == "generation":
    real = generate._ordered_results
    def results(executor, tasks, window):
        for i, chunk in enumerate(real(executor, tasks, window)):
            if i == 1 or len(tasks) == 1:
                pids = list(getattr(executor, "_processes", None) or {})
                pids.append(getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None) or 0)
                with open(os.environ["PIDS"], "w") as f:
                    f.write(" ".join(map(str, pids)))
                die()
            yield chunk
    generate._ordered_results = results
else:
    name, nth = phase.split(":")
    real_replace, seen = os.replace, [0]
    def replace(src, dst, *a, **k):
        if os.path.basename(dst) == name:
            seen[0] += 1
            if seen[0] == int(nth):
                die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
main(argv)
"""


def killed(phase: str, *args, pids: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", KILLER, phase, *map(str, args)], capture_output=True,
                          text=True, env={**ENV, "PIDS": str(pids or os.devnull)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


def assert_gone(pids_file: Path) -> None:
    """The worker processes (and their fork server) ended with the killed process."""
    pids = [int(p) for p in pids_file.read_text().split() if int(p) > 0]
    deadline = time.time() + 20
    while time.time() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)], pids


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in Path(root).rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))]


def test_fit_killed_at_every_phase_continues_with_the_same_command(tmp_path, tiny_toml):
    out = tmp_path / "run"
    args = ["fit", "--config", tiny_toml, "--num-images", 16, "--out", out, "--steps", 4,
            "--checkpoint-every", 2, "--log-every", 1, "--quiet"]
    pids = tmp_path / "pids"
    killed("generation", *args, pids=pids)                            # 1. generating its data
    assert_gone(pids)
    assert (out / MANIFEST).is_file() and not is_store(out / "data" / "train")
    killed("checkpoint.pt:1", *args)                                  # 2. writing the step-0 checkpoint
    assert not (out / "checkpoint.pt").exists()
    killed("checkpoint.pt:2", *args)                                  # 3. writing the step-2 checkpoint
    assert load_checkpoint(out)["step"] == 0
    killed("decomposition.png:1", *args)                              # 4. drawing its pictures
    assert load_checkpoint(out)["step"] == 4 and not (out / "decomposition.png").exists()
    code, err = run_main(*args)                                       # the same command, once more
    assert code == 0, err
    assert (out / "decomposition.png").is_file() and (out / "decomposition.npz").is_file()
    assert leftovers(out) == []
    reference = fit(out=tmp_path / "reference", steps=4, num_images=16, overrides=TINY_OVERRIDES,
                    progress=False, checkpoint_every=2, log_every=1)
    assert_same_params(params(out), params(reference.out))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_data_generate_killed_midway_leaves_no_workers_and_is_done_again(tmp_path):
    out = tmp_path / "store"
    args = ["data", "generate", "tetrominoes", "--num-images", 600, "--workers", 2, "--out", out, "--quiet"]
    pids = tmp_path / "pids"
    killed("generation", *args, pids=pids)
    assert_gone(pids)
    assert not is_store(out)                                          # no store until it is complete
    code, err = run_main(*args)
    assert code == 0, err
    assert leftovers(tmp_path) == []
    reference = generate("tetrominoes", 600, tmp_path / "reference", seed=0, progress=False, workers=1)
    a, b = open_dataset(out), open_dataset(reference)
    assert np.array_equal(a["image"].values, b["image"].values) and np.array_equal(a["mask"].values, b["mask"].values)


# -- 3. data checked as it is read ----------------------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "corrupt"])
def test_a_chunk_damaged_during_training_stops_with_the_last_good_step(tmp_path, data, monkeypatch, how):
    copy = shutil.copytree(data, tmp_path / "data")
    chunk = copy / "image" / "c.1.0.0.0"

    def damage():
        if how == "deleted":
            chunk.unlink()
        else:
            raw = bytearray(chunk.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            chunk.write_bytes(bytes(raw))

    real, calls, blank = train.train_step, {"n": 0}, []

    def step(system, optimizer, x, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:                            # read again at the start of the second epoch (step 12)
            damage()
        blank.append(bool((x.flatten(1) == 0).all(1).any()))          # an image of zarr's fill value
        return real(system, optimizer, x, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(DatasetError, match=r"c\.1\.0\.0\.0.*training stopped at step 12") as err:
        tiny_fit(tmp_path / "run", copy, steps=20, checkpoint_every=100)
    assert "\n" not in str(err.value) and str(chunk) in str(err.value)
    assert load_checkpoint(tmp_path / "run")["step"] == 12
    assert len(blank) == 12 and not any(blank)                        # no image of fill values was trained on


def test_data_show_and_info_name_a_damaged_chunk(tmp_path, data):
    copy = shutil.copytree(data, tmp_path / "data")
    chunk = copy / "mask" / "c.0.0.0.0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    for args in (["data", "show", copy, "--out", tmp_path / "grid.png"], ["data", "info", copy]):
        assert_one_line(*run_main(*args), str(chunk))
    assert not (tmp_path / "grid.png").exists()


# -- 4. a real guard against non-finite steps -----------------------------------------------


@pytest.mark.parametrize("sync_free", [False, True])
def test_an_infinite_learning_rate_never_reaches_the_parameters(tmp_path, data, monkeypatch, sync_free):
    good = tiny_fit(tmp_path / "good", data, steps=2, sync_free=sync_free, log_every=1)
    real = train.learning_rate
    monkeypatch.setattr(train, "learning_rate", lambda cfg, step: real(cfg, step) if step < 2 else float("inf"))
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        tiny_fit(tmp_path / "run", data, steps=10, sync_free=sync_free, log_every=1,
                 overrides={"train.max_bad_steps": 3})
    saved = params(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in saved.values())      # finite by construction
    assert_same_params(saved, params(good.out))                        # the state of the last good step
    state = load_checkpoint(tmp_path / "run")["optimizer"]["state"]
    assert all(torch.isfinite(v).all() for s in state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("sync_free", [False, True])
def test_batches_with_non_finite_pixels_are_skipped_and_counted(tmp_path, data, monkeypatch, sync_free):
    real, calls = store._to_tensors, {"n": 0}

    def to_tensors(arrays):
        calls["n"] += 1
        batch = real(arrays)
        if calls["n"] in (2, 3):
            batch["image"][0, 0, 0, 0] = float("nan" if calls["n"] == 2 else "inf")
        return batch

    monkeypatch.setattr(store, "_to_tensors", to_tensors)
    result = tiny_fit(tmp_path / "run", data, steps=4, sync_free=sync_free, log_every=100)
    assert result.step == 4 and result.skipped == 2
    assert all(torch.isfinite(v).all() for v in params(result.out).values())
    assert '"skipped": 2' in (result.out / "metrics.jsonl").read_text()


# -- 5. values from files: a checkpoint is input like any other -----------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path, tiny_runs):
    from iodine_pyro.checkpoint import CheckpointError

    ckpt = torch.load(tiny_runs["iterative"] / "checkpoint.pt", weights_only=True)
    ckpt["extra"]["payload"] = _Payload(tmp_path / "ran")
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert not (tmp_path / "ran").exists()
    assert "weights_only" not in str(err.value) and str(tmp_path / "checkpoint.pt") in str(err.value)


# -- 6. full disks and read-only targets ------------------------------------------------------


@contextlib.contextmanager
def disk_full(limit: int = 4096):
    """Files cannot grow past `limit` bytes in this process: writes fail as on a full disk."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_every_writer_fails_whole_on_a_full_disk(tmp_path, tiny_runs):
    from iodine_pyro.compare import compare, write_report
    from iodine_pyro.figures import decomposition
    from iodine_pyro.posterior import write_samples
    from iodine_pyro.run import Run

    run = Run.open(tiny_runs["iterative"])
    out = tmp_path / "out"
    out.mkdir()
    ckpt = load_checkpoint(tiny_runs["iterative"])
    save_checkpoint(out / "checkpoint.pt", cfg=ckpt["config"], system_state=ckpt["system"],
                    optimizer_state=ckpt["optimizer"], step=1, data_state=ckpt["data_state"], data=ckpt["data"])
    old = (out / "checkpoint.pt").read_bytes()
    tree = xr.DataTree.from_dict({"posterior": xr.Dataset({"z": (("chain", "draw"), np.random.rand(1, 4000))})})
    result = compare([run], num_images=2, iw_samples=2, gap_steps=1, batch_size=2, progress=False)
    writers = {
        "checkpoint.pt": lambda: save_checkpoint(out / "checkpoint.pt", cfg=ckpt["config"],
                                                 system_state=ckpt["system"], optimizer_state=ckpt["optimizer"],
                                                 step=2, data_state=ckpt["data_state"], data=ckpt["data"]),
        "post.nc": lambda: write_samples(tree, out / "samples" / "post.nc"),  # each in a folder it makes
        "dec.png": lambda: decomposition(run, out / "figures" / "dec.png", num_images=4),
        "store": lambda: generate("tetrominoes", 300, out / "data" / "store", progress=False, workers=1),
        "compare": lambda: write_report(result, out / "compare"),
    }
    for name, write in writers.items():
        with disk_full(), pytest.raises(WriteError, match=f"cannot write {out}/.*(File too large|No space)") as err:
            write()
        assert "\n" not in str(err.value), name
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"], name   # nothing partial, nothing temporary
    assert (out / "checkpoint.pt").read_bytes() == old                            # the old checkpoint intact
    with disk_full():                                                             # the command line: one line
        assert_one_line(*run_main("sample", tiny_runs["iterative"], "--num-images", 2, "--num-samples", 50,
                                  "--quiet", "--out", out / "post.nc"), f"cannot write {out / 'post.nc'}")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_read_only_targets_give_one_line(tmp_path, tiny_runs):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line(*run_main("plot", "decomposition", tiny_runs["iterative"], "--out", blocker / "dec.png"),
                    f"cannot write {blocker / 'dec.npz'}")
    if os.geteuid() == 0:
        return                                                       # root writes into read-only folders
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_line(*run_main("sample", tiny_runs["iterative"], "--num-images", 2, "--num-samples", 2,
                                  "--quiet", "--out", ro / "post.nc"), f"cannot write {ro / 'post.nc'}",
                        "Permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
