"""Data-parallel training: 2 CPU processes against one process over the same global batch."""

import json
import os
import socket
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing as mp

from iodine_pyro.checkpoint import load_checkpoint
from iodine_pyro.config import make_config
from iodine_pyro.data import Batches, generate, open_dataset
from iodine_pyro.system import Iodine
from iodine_pyro.training import ddp, make_optimizer

from ..helpers import FAILURE, TINY_OVERRIDES, TINY_TOML, assert_same_params

WORLD, STEPS, SEED = 2, 3, 0
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is fastest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate("tetrominoes", 48, tmp_path_factory.mktemp("data") / "tet", seed=0, progress=False,
                    workers=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, data, steps, dump):
    """One process of a torchrun-like launch: `fit`, then save this process's parameters."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import iodine_pyro.training as training
    import iodine_pyro.training.state as training_state

    made = []

    class Recorded(Iodine):
        def __init__(self, cfg):
            super().__init__(cfg)
            made.append(self)

    training_state.Iodine = Recorded
    # float32 (amp=False): compared below with a float32 reference at float32 tolerances
    result = training.fit(out=out, data=data, steps=steps, overrides=TINY_OVERRIDES, seed=SEED,
                          log_every=1, checkpoint_every=steps, progress=False, amp=False)
    assert result.rank == rank and result.step == steps
    torch.save(made[0].state_dict(), Path(dump) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data):
    """A 3-step run on 2 processes started like torchrun does (env://)."""
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(root / "run"), str(data), STEPS, str(root)),
             nprocs=WORLD)
    return root


def one_process_reference(data, steps: int, world: int) -> dict[str, torch.Tensor]:
    """What the 2-process run must compute: one process, the same global batches, the loss as
    the per-image mean over the global batch, whose posterior noise is drawn in `world`
    contiguous shares with the processes' seeds."""
    cfg = make_config("tetrominoes", "paper", TINY_OVERRIDES)
    torch.manual_seed(SEED)
    pyro.set_rng_seed(SEED)
    system = Iodine(cfg)
    opt = make_optimizer(system, cfg)
    batches = iter(Batches(open_dataset(data), cfg.train.batch_size, seed=SEED))
    b = cfg.train.batch_size // world
    with pyro.validation_enabled(False):
        for step in range(steps):
            x = next(batches)["image"]                                # [B, C, H, W] global batch
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for r in range(world):
                torch.manual_seed(ddp.step_seed(SEED, step, r))
                loss = loss + system.loss(x[r * b:(r + 1) * b]) / world
            loss.backward()
            torch.nn.utils.clip_grad_norm_(system.parameters(), cfg.train.clip_norm)
            opt.step()
    return system.state_dict()


@pytest.mark.slow
def test_processes_end_identical_and_equal_to_one_process_over_the_global_batch(two_process_run, data):
    ranks = [torch.load(two_process_run / f"rank{r}.pt") for r in range(WORLD)]
    assert_same_params(ranks[0], ranks[1])                            # bit for bit
    saved = load_checkpoint(two_process_run / "run")
    assert saved["step"] == STEPS
    assert_same_params(saved["system"], ranks[0])                     # rank 0 wrote its parameters
    ref = one_process_reference(data, STEPS, WORLD)
    torch.manual_seed(SEED)
    initial = Iodine(make_config("tetrominoes", "paper", TINY_OVERRIDES)).state_dict()
    # The mask logits' bias (channel 0 of the decoder's last layer) shifts every slot's
    # logit alike, which the softmax over slots ignores: its gradient is 0 up to rounding,
    # and Adam turns rounding into steps of up to lr. It is compared at that scale.
    mask_bias = "model.decoder.net.4.bias"
    lr = make_config("tetrominoes", "paper", TINY_OVERRIDES).train.lr
    assert (ranks[0][mask_bias][0] - ref[mask_bias][0]).abs() <= 2 * STEPS * lr
    ranks[0][mask_bias][0] = ref[mask_bias][0]
    moved = 0
    for k, v in ref.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, initial[k]))
    assert moved == len(ref)                                          # the check is not vacuous


@pytest.mark.slow
def test_nproc_launch_writes_on_rank_0_only_and_resumes_exactly(two_process_run, data, tmp_path):
    import subprocess

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY_TOML)
    out = tmp_path / "run"

    def fit(steps):
        args = ["fit", "--preset", "paper", "--config", toml, "--data", data, "--out", out, "--steps", steps,
                "--log-every", 1, "--checkpoint-every", 1, "--quiet", "--nproc", WORLD, "--no-amp"]   # as the fixture
        return subprocess.run([sys.executable, "-m", "iodine_pyro", *map(str, args)], capture_output=True,
                              text=True, env=ENV, timeout=300)

    first = fit(STEPS - 1)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("trained to step") == 1                 # rank 0 reports
    second = fit(STEPS)                                               # continues the run
    assert second.returncode == 0, second.stderr
    assert_same_params(load_checkpoint(out)["system"], load_checkpoint(two_process_run / "run")["system"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))     # one writer, no repeats
    assert (out / "decomposition.png").exists()


@pytest.mark.slow
def test_nproc_errors_are_one_line(data, tmp_path):
    import subprocess

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY_TOML)
    args = ["fit", "--config", toml, "--data", data, "--out", tmp_path / "r", "--steps", 1, "--quiet",
            "--nproc", WORLD, "--batch-size", 5]
    proc = subprocess.run([sys.executable, "-m", "iodine_pyro", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == FAILURE
    assert proc.stderr.strip().splitlines() == [
        "error: --batch-size 5 does not split evenly over 2 processes; choose a multiple of 2"]


# -- pieces --------------------------------------------------------------------------------


def test_shards_are_disjoint_contiguous_and_cover_the_batch():
    batch = {"image": torch.arange(8.0).view(8, 1, 1, 1), "mask": torch.arange(8.0).view(8, 1, 1, 1)}
    parts = [ddp.Processes(rank=r, world=4).shard(batch)["image"].flatten().tolist() for r in range(4)]
    assert parts == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        ddp.Processes(rank=0, world=3).check_batch_size(32)


def test_step_seeds_differ_across_steps_and_ranks():
    seeds = {ddp.step_seed(0, s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert ddp.step_seed(0, 3, 1) == ddp.step_seed(0, 3, 1)


def test_launcher_drops_only_nproc():
    argv = ["fit", "--nproc", "4", "--steps", "3", "--nproc=2", "--out", "r"]
    assert ddp.strip_option(argv) == ["fit", "--steps", "3", "--out", "r"]


def test_a_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    p = ddp.setup("cpu")
    assert (p.rank, p.world, p.distributed, p.is_main) == (0, 1, False, True)
    assert p.main_first(lambda a: a + 1, 1) == 2 and p.any(True) and not p.any(False)


def test_a_failed_process_is_reported_with_its_signal():
    assert ddp.exit_in_words(-6) == "was killed by SIGABRT"
    assert ddp.exit_in_words(3) == "exited with status 3"


def test_launched_processes_print_their_stacks_when_killed(monkeypatch):
    """A process that aborts (as gloo's threads can at exit) says where it stood."""
    from torch.distributed import run as torchrun

    seen = {}
    for name in ("PYTHONFAULTHANDLER", "OMP_NUM_THREADS"):     # restored after the test, set or not
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(torchrun, "run", lambda args: seen.update(env=os.environ.get("PYTHONFAULTHANDLER"),
                                                                   nproc=args.nproc_per_node))
    assert ddp.launch(2, ["fit", "--steps", "1"]) == 0
    assert seen == {"env": "1", "nproc": "2"}
