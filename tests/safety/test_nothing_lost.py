"""Nothing lost, against a hostile user: what fit may touch, kills at every phase, damaged
data during training, a real guard against non-finite steps, full disks and read-only
targets. Each case is one of docs/robustness.md."""

import contextlib
import importlib
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

import iodine_pyro.data.batches as batches
import iodine_pyro.training.state as training_state
import iodine_pyro.training.step as training_step
from iodine_pyro.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from iodine_pyro.data import DatasetError, generate, is_store, open_dataset
from iodine_pyro.io import WriteError, pid_alive
from iodine_pyro.training import MANIFEST, TrainingError, fit

from ..helpers import TINY_OVERRIDES, TINY_TOML, assert_same_params, params, run_main, status_of

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


def assert_one_line(ran: tuple[int, str, str], *needles: str) -> None:
    """`run_main`'s (status, stdout, stderr) of a failure: one error line naming every needle."""
    code, _, err = ran
    assert code == status_of(err), err
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
        assert_one_line(run_main("fit", "--config", tiny_toml, "--data", data, "--out", out, "--steps", 1,
                                 "--quiet", *extra), "holds no run")
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


@pytest.mark.slow
def test_fit_killed_at_every_phase_continues_with_the_same_command(tmp_path, tiny_toml):
    out = tmp_path / "run"
    args = ["fit", "--preset", "paper", "--config", tiny_toml, "--num-images", 16, "--out", out, "--steps", 4,
            "--checkpoint-every", 2, "--log-every", 1, "--quiet", "--threads", 1]   # as the reference below:
    # fit()'s preset, and one thread (bit-identical parameters need the same thread count)
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
    code, _, err = run_main(*args)                                       # the same command, once more
    assert code == 0, err
    assert (out / "decomposition.png").is_file() and (out / "decomposition.npz").is_file()
    assert leftovers(out) == []
    reference = fit(out=tmp_path / "reference", steps=4, num_images=16, overrides=TINY_OVERRIDES,
                    progress=False, checkpoint_every=2, log_every=1)
    assert_same_params(params(out), params(reference.out))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_data_generate_killed_midway_leaves_no_workers_and_is_done_again(tmp_path):
    out = tmp_path / "store"
    args = ["data", "generate", "tetrominoes", "--num-images", 600, "--workers", 2, "--out", out, "--quiet"]
    pids = tmp_path / "pids"
    killed("generation", *args, pids=pids)
    assert_gone(pids)
    assert not is_store(out)                                          # no store until it is complete
    code, _, err = run_main(*args)
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

    real, calls, blank = training_step.train_step, {"n": 0}, []

    def step(system, optimizer, x, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:                            # read again at the start of the second epoch (step 12)
            damage()
        blank.append(bool((x.flatten(1) == 0).all(1).any()))          # an image of zarr's fill value
        return real(system, optimizer, x, *args, **kwargs)

    monkeypatch.setattr(training_step, "train_step", step)
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
        assert_one_line(run_main(*args), str(chunk))
    assert not (tmp_path / "grid.png").exists()


# -- 4. a real guard against non-finite steps -----------------------------------------------


@pytest.mark.parametrize("sync_free", [False, True])
def test_an_infinite_learning_rate_never_reaches_the_parameters(tmp_path, data, monkeypatch, sync_free):
    good = tiny_fit(tmp_path / "good", data, steps=2, sync_free=sync_free, log_every=1)
    real = training_state.learning_rate
    monkeypatch.setattr(training_state, "learning_rate", lambda cfg, step: real(cfg, step) if step < 2 else float("inf"))
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
    real, calls = batches._to_tensors, {"n": 0}

    def to_tensors(arrays):
        calls["n"] += 1
        batch = real(arrays)
        if calls["n"] in (2, 3):
            batch["image"][0, 0, 0, 0] = float("nan" if calls["n"] == 2 else "inf")
        return batch

    monkeypatch.setattr(batches, "_to_tensors", to_tensors)
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


@pytest.mark.slow
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
        assert_one_line(run_main("sample", tiny_runs["iterative"], "--num-images", 2, "--num-samples", 50,
                                  "--quiet", "--out", out / "post.nc"), f"cannot write {out / 'post.nc'}")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_read_only_targets_give_one_line(tmp_path, tiny_runs):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line(run_main("plot", "decomposition", tiny_runs["iterative"], "--out", blocker / "dec.png"),
                    f"cannot write {blocker / 'dec.npz'}")
    if os.geteuid() == 0:
        return                                                       # root writes into read-only folders
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_line(run_main("sample", tiny_runs["iterative"], "--num-images", 2, "--num-samples", 2,
                                  "--quiet", "--out", ro / "post.nc"), f"cannot write {ro / 'post.nc'}",
                        "Permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# -- 7. one writer, bounded reads, recorded paths, pairs: what a second round of breaking found --


@pytest.mark.slow
def test_a_run_directory_has_one_writer_at_a_time(tmp_path, data, tiny_toml):
    from iodine_pyro.io import lock_dir

    out = tmp_path / "run"
    args = ["fit", "--config", tiny_toml, "--data", data, "--out", out, "--steps", 2, "--log-every", 1, "--quiet"]
    assert run_main(*args)[0] == 0
    before = tree_state(out)
    with lock_dir(out):                                               # a fit that is running (another open file)
        for extra in ([], ["--resume", "--lr", "1e-5"], ["--overwrite"]):
            assert_one_line(run_main(*args, *extra), f"process {os.getpid()}", "is writing this run directory")
        assert tree_state(out) == before                              # metrics and checkpoint untouched
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, out], stdout=subprocess.PIPE, text=True, env=ENV)
    try:                                                              # another process, killed while it holds it
        assert holder.stdout.readline().strip() == "held"
        assert_one_line(run_main(*args, "--resume", "--lr", "1e-5"), f"process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    args[args.index("--steps") + 1] = 3
    assert run_main(*args)[0] == 0                                    # the lock ended with its holder: none stale
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


HOLDER = "import sys, time\nfrom iodine_pyro.io import lock_dir\nwith lock_dir(sys.argv[1]):\n" \
         "    print('held', flush=True)\n    time.sleep(600)\n"


def test_a_fit_that_fails_before_writing_leaves_no_directory(tmp_path, data):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="would need at least"):     # the networks' parameters alone
        tiny_fit(out, data, overrides={"guide.mlp": (100_000, 100_000)})
    with pytest.raises(ValueError, match="model.image_size"):         # found before generating anything
        fit(out=out, steps=1, num_images=8, overrides={**TINY_OVERRIDES, "model.image_size": (12, 12)},
            progress=False)
    assert not (tmp_path / "new").exists()
    fit(out=out, steps=1, num_images=8, overrides=TINY_OVERRIDES, progress=False)   # the corrected command
    assert load_checkpoint(out)["step"] == 1


def test_generation_workers_are_capped(monkeypatch):
    gen = importlib.import_module("iodine_pyro.data.generate")       # the module, not its function

    assert gen.worker_count(1000, 10) <= min(os.cpu_count() or 1, 10)
    monkeypatch.setattr(gen, "_memory_available", lambda: 3 * gen.WORKER_BYTES)
    assert gen.worker_count(1000, 1000) <= 3


@pytest.mark.slow
def test_ctrl_c_during_generation_prints_one_line_and_leaves_no_process(tmp_path):
    for attempt, delay in enumerate((0.1, 1.5)):                     # the fork server importing; workers sending
        out = tmp_path / f"store{attempt}"
        # Multi-dSprites: 10,000 images take about 25 s on 2 idle cores (Tetrominoes' 20,000 took 3 s,
        # over before the signal on an idle machine)
        proc = subprocess.Popen([sys.executable, "-m", "iodine_pyro", "data", "generate", "multi_dsprites",
                                 "--num-images", "10000", "--workers", "2", "--out", str(out), "--quiet"],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV,
                                start_new_session=True)
        started = time.time()
        while not list(tmp_path.glob(f".store{attempt}.*.partial")) and time.time() < started + 120:
            time.sleep(0.05)
        time.sleep(delay)
        ignored = []                                                  # what the child ignores, should it fail
        with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/status") as f:
            ignored = [line.split()[1] for line in f if line.startswith("SigIgn")]
        waited = time.time() - started
        os.killpg(proc.pid, signal.SIGINT)                            # Ctrl-C: the terminal's whole group
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("Ctrl-C during generation hung")
        assert proc.returncode == 130 and err.strip() == "interrupted", (
            f"exit {proc.returncode}, stderr {err!r}, Ctrl-C sent {waited:.1f} s after the start, "
            f"child's SigIgn {ignored}, ours {signal.getsignal(signal.SIGINT)}")
        assert not is_store(out) and leftovers(tmp_path) == []
        with contextlib.suppress(ProcessLookupError):                 # no worker or fork server left
            deadline = time.time() + 20
            while time.time() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
            raise AssertionError("processes of the interrupted generation still run")


def test_ctrl_c_during_a_chunk_write_lets_the_write_finish_first(tmp_path, monkeypatch):
    """zarr writes on its own event-loop thread: a Ctrl-C raised in the main thread while it
    waited left the write's task pending, and asyncio printed "Task was destroyed but it is
    pending" at exit. The Ctrl-C now waits for the chunk's write, then interrupts."""
    written = []
    to_zarr = xr.Dataset.to_zarr

    def ctrl_c_then_write(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)                          # Ctrl-C as the write starts
        result = to_zarr(self, *args, **kwargs)
        written.append(self.sizes["image"])
        return result

    monkeypatch.setattr(xr.Dataset, "to_zarr", ctrl_c_then_write)
    with pytest.raises(KeyboardInterrupt):
        generate("tetrominoes", 32, tmp_path / "store", workers=1, progress=False, chunk_size=16)
    assert written == [16]                                            # the first write whole, no second
    assert not is_store(tmp_path / "store") and leftovers(tmp_path) == []


def test_stopping_workers_never_waits_on_a_message_cut_short():
    import struct
    import threading

    gen = importlib.import_module("iodine_pyro.data.generate")

    pool = gen._process_pool(1)
    pool.submit(gen._generate_chunk, "tetrominoes", np.random.SeedSequence(0), 1).result(timeout=120)
    pool._result_queue._writer._send(struct.pack("!i", 1 << 20) + b"cut")   # a worker killed mid-send
    time.sleep(0.5)                                                   # the pool's reader now waits for the rest
    manager = pool._executor_manager_thread
    gen._stop_workers(pool)
    manager.join(timeout=20)
    assert not manager.is_alive() and not [t for t in threading.enumerate() if t is manager]


def test_a_removal_cut_short_is_finished_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fit(out=out, steps=1, num_images=8, overrides=TINY_OVERRIDES, progress=False)
    real = shutil.rmtree

    def cut_short(path, *a, **k):                                     # Ctrl-C half-way through the deletion
        victims = sorted(Path(path).rglob("c.*"))
        for victim in victims[: len(victims) // 2]:
            victim.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        fit(out=out, steps=1, num_images=8, overrides={**TINY_OVERRIDES, "model.num_slots": 3}, progress=False,
            overwrite=True)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert not (out / "data" / "train").exists()                      # no half store under its name
    for extra in ({"overwrite": True}, {}):                           # and every later run works
        fit(out=out, steps=2, num_images=8, overrides={**TINY_OVERRIDES, "model.num_slots": 3}, progress=False,
            **extra)
    assert leftovers(out) == [] and load_checkpoint(out)["step"] == 2


def test_an_in_progress_store_of_another_host_is_never_taken_for_stale(tmp_path):
    import fcntl

    out = tmp_path / "store"
    theirs = tmp_path / ".store.999999999.abcd1234.partial"           # a pid that means nothing on this host
    theirs.mkdir()
    (theirs / "zarr.json").write_text("{}")
    fd = os.open(theirs, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)                                    # its writer holds it
    try:
        generate("tetrominoes", 16, out, progress=False, workers=1)
        assert (theirs / "zarr.json").is_file()
    finally:
        os.close(fd)
    generate("tetrominoes", 16, tmp_path / "store", progress=False, workers=1, overwrite=True)
    assert not theirs.exists()                                        # its writer gone: now it is stale


def test_reads_are_bounded_by_what_the_files_hold(tmp_path, data):
    import gzip
    import struct

    from iodine_pyro.data.store import _frame_size
    from iodine_pyro.data.tfrecord import masked_crc32c

    copy = shutil.copytree(data, tmp_path / "data")                   # a chunk declaring 4 GB
    chunk = copy / "mask" / "c.0.0.0.0"
    raw = bytearray(chunk.read_bytes())
    fhd = raw[4]
    at = 5 + (0 if fhd >> 5 & 1 else 1) + (0, 1, 2, 4)[fhd & 3]
    width = (fhd >> 5 & 1, 2, 4, 8)[fhd >> 6]
    assert width in (4, 8) and _frame_size(bytes(raw)) is not None
    raw[at:at + width] = (2**32 - 1).to_bytes(width, "little")
    chunk.write_bytes(bytes(raw))
    assert_one_line(run_main("data", "show", copy, "--out", tmp_path / "grid.png"), str(chunk), "declares")
    other = shutil.copytree(data, tmp_path / "gzip")                  # a compressor stores never use
    meta = json.loads((other / "mask" / "zarr.json").read_text())
    meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}},
                      {"name": "gzip", "configuration": {"level": 1}}]
    (other / "mask" / "zarr.json").write_text(json.dumps(meta))
    assert_one_line(run_main("data", "show", other, "--out", tmp_path / "grid.png"), "GzipCodec")

    for length in (2**64 - 1, 100 * 2**20):                           # a record's length field: huge, too large
        head = struct.pack("<Q", length)
        record = head + struct.pack("<I", masked_crc32c(head)) + b"\0" * 4096
        path = tmp_path / f"bad{length}.tfrecords"
        path.write_bytes(gzip.compress(record))
        assert_one_line(run_main("data", "convert", path, "--dataset", "tetrominoes", "--out",
                                  tmp_path / "conv", "--quiet"), str(path), "record 0")
        assert not (tmp_path / "conv").exists()


def test_data_paths_recorded_in_a_checkpoint_stay_inside_the_run(tmp_path):
    from iodine_pyro.checkpoint import CheckpointError
    from iodine_pyro.run import Run

    out = tmp_path / "theirs"
    fit(out=out, steps=1, num_images=8, overrides=TINY_OVERRIDES, progress=False)
    shutil.rmtree(out / "data")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["data"]["eval"] = "../elsewhere/test"
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="pass `data`"):
        Run.open(out).data_path()
    assert_one_line(run_main("evaluate", out, "--num-images", 4), "pass --data")
    # generated data recorded at an absolute path that is gone is made again inside the run
    ckpt["data"]["eval"] = str(tmp_path / "abs" / "test")
    torch.save(ckpt, out / "checkpoint.pt")
    assert Run.open(out).data_path() == str(out / "data" / "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]   # nothing written outside the run
    del ckpt["data"]["generated"]["eval"]                             # and nothing else is generated
    torch.save(ckpt, out / "checkpoint.pt")
    shutil.rmtree(out / "data")
    assert Run.open(out).data_path() == str(tmp_path / "abs" / "test")
    assert_one_line(run_main("evaluate", out, "--num-images", 4), "no dataset at")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]


def test_a_damaged_held_out_set_of_a_run_is_generated_again(tmp_path):
    from iodine_pyro.evaluate import evaluate

    out = tmp_path / "run"
    fit(out=out, steps=1, num_images=8, overrides=TINY_OVERRIDES, progress=False)
    before = evaluate(out, num_images=4, batch_size=4, progress=False)
    meta = out / "data" / "test" / "image" / "zarr.json"
    shape = json.loads(meta.read_text())
    shape["shape"][0] -= 1                                  # one array shorter than the others
    meta.write_text(json.dumps(shape))
    with pytest.raises(DatasetError):
        open_dataset(out / "data" / "test")
    assert evaluate(out, num_images=4, batch_size=4, progress=False)["fg_ari"] == before["fg_ari"]
    assert open_dataset(out / "data" / "test").sizes["image"] == json.loads(meta.read_text())["shape"][0]


def test_a_store_generated_beside_this_one_is_taken(tmp_path, monkeypatch):
    """Two commands ensuring the same store at once: the one landing second takes the
    first's (the same generation) instead of failing because the folder is no longer empty;
    other data landing there meanwhile is refused."""
    gen = importlib.import_module("iodine_pyro.data.generate")    # the module, not the function of that name
    real_write, real_generate = gen.write_chunks, gen.generate

    def landing(seed):
        def write_chunks(tmp, *args, **kw):
            n = real_write(tmp, *args, **kw)                       # this one's store is written, not yet in place
            monkeypatch.setattr(gen, "write_chunks", real_write)
            real_generate("tetrominoes", 8, Path(tmp).parent / "test", seed=seed, progress=False, workers=1)
            return n
        return write_chunks

    out = tmp_path / "a" / "test"
    monkeypatch.setattr(gen, "write_chunks", landing(3))
    assert gen.ensure("tetrominoes", 8, out, seed=3, progress=False, workers=1) == out
    assert open_dataset(out).attrs["seed"] == 3 and sorted(p.name for p in out.parent.iterdir()) == ["test"]
    out = tmp_path / "b" / "test"
    monkeypatch.setattr(gen, "write_chunks", landing(4))
    with pytest.raises(DatasetError, match="not 8 tetrominoes images of seed 3"):
        gen.ensure("tetrominoes", 8, out, seed=3, progress=False, workers=1)
    assert open_dataset(out).attrs["seed"] == 4                    # theirs, untouched


def test_a_metrics_row_that_is_not_one_never_stops_a_run(tmp_path, data):
    from iodine_pyro.checkpoint import read_metrics

    out = tmp_path / "run"
    tiny_fit(out, data, steps=2, log_every=1)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": "x", "loss": 1}\n{"step": 1.5}\n{"step": 2, "loss": "abc"}\n[1, 2]\n')
    tiny_fit(out, data, steps=3, log_every=1)
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3]


def test_continuing_a_run_keeps_its_training_data(tmp_path, data):
    out = tmp_path / "run"
    tiny_fit(out, data, steps=1)
    other = shutil.copytree(data, tmp_path / "other")      # in chunks of 16: not regenerable, so not the same
    before = tree_state(out)
    for extra in ({}, {"resume": True}):
        with pytest.raises(CheckpointError, match="is trained on"):
            tiny_fit(out, other, steps=2, **extra)
    assert tree_state(out) == before
    tiny_fit(out, data, steps=2)


def test_a_run_continues_on_the_same_generated_data_in_another_store(tmp_path):
    mine = generate("tetrominoes", 48, tmp_path / "mine", seed=0, progress=False, workers=1)
    out = tmp_path / "run"
    tiny_fit(out, mine, steps=1)
    other = generate("tetrominoes", 48, tmp_path / "other", seed=1, progress=False, workers=1)
    with pytest.raises(CheckpointError, match="is trained on"):
        tiny_fit(out, other, steps=2)
    again = generate("tetrominoes", 48, tmp_path / "again", seed=0, progress=False, workers=1)
    tiny_fit(out, again, steps=2)                          # the same generation, made again: taken
    assert load_checkpoint(out / "checkpoint.pt")["data"]["train"] == str(again.resolve())


def test_a_run_moved_away_from_its_data_makes_it_again_and_continues_exactly(tmp_path):
    """A run trained on a generated store it was given (--data), copied elsewhere as its
    checkpoint and metrics alone, continues there: the store is generated again inside
    it from what the checkpoint records, and the steps are those of the run left behind."""
    data = generate("tetrominoes", 48, tmp_path / "data", seed=0, progress=False, workers=1)
    held = generate("tetrominoes", 16, tmp_path / "held", seed=7, progress=False, workers=1)
    first = tmp_path / "first"
    tiny_fit(first, data, steps=2, eval_data=held)
    record = load_checkpoint(first / "checkpoint.pt")["data"]
    assert record["generated"] == {"dataset": "tetrominoes", "train": [48, 0], "eval": [16, 7]}
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        shutil.copy(first / name, moved / name)
    data.rename(tmp_path / "gone")                                    # the store it was given has moved away
    held.rename(tmp_path / "held-gone")
    fit(out=moved, steps=4, resume=True, progress=False)
    ckpt = load_checkpoint(moved / "checkpoint.pt")
    assert (ckpt["data"]["train"], ckpt["data"]["eval"]) == ("data/train", "data/test")
    assert open_dataset(moved / "data" / "train").attrs["seed"] == 0
    (tmp_path / "gone").rename(data)
    tiny_fit(first, data, steps=4, eval_data=tmp_path / "held-gone")
    assert_same_params(params(first), params(moved))


PAIR_KILLER = r"""
import os, signal, sys
import iodine_pyro.io as io
folder, version, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, seen = os.replace, [0]
def replace(src, dst, *a, **k):
    if not str(dst).endswith(".pairs"):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
io.stage_text(os.path.join(folder, "fig.json"), version, companion=os.path.join(folder, "fig.png"))
io.stage_text(os.path.join(folder, "fig.md"), version, companion=os.path.join(folder, "fig.png"))
io.write_text(os.path.join(folder, "fig.png"), version)
io.commit(os.path.join(folder, "fig.png"))
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_files_written_together_are_never_left_from_two_writes(tmp_path, kill_at):
    from iodine_pyro.io import finish_pairs

    def write(version, kill=0):
        return subprocess.run([sys.executable, "-c", PAIR_KILLER, tmp_path, version, str(kill)], env=ENV,
                              capture_output=True, text=True, timeout=60)

    assert write("old").returncode == 0
    assert write("new", kill_at).returncode == -signal.SIGKILL         # killed before the nth rename
    finish_pairs(tmp_path)                                            # what the next write there does first
    contents = {(tmp_path / n).read_text() for n in ("fig.png", "fig.json", "fig.md")}
    assert contents == {"new"} and leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
