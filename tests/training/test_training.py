"""The pieces of the training package with behaviour of their own: the request and its
checks, the stopping rules, the fault counter both step paths share, the training state's
checkpoint."""

import math
import os
import signal
import time

import pyro
import pytest
import torch

from iodine_pyro.config import SEED_MAX
from iodine_pyro.data import generate, open_dataset
from iodine_pyro.fields import INT_MAX
from iodine_pyro.training import FitRequest, TrainingState, fit, make_optimizer
from iodine_pyro.training.ddp import Processes
from iodine_pyro.training.speed import Speed
from iodine_pyro.training.step import Faults, HostCheckedStep, SyncFreeStep, make_step
from iodine_pyro.training.stops import (
    FaultLimit,
    Signals,
    StepLimit,
    TimeLimit,
    TrainingError,
    first_due,
)

from ..helpers import TINY_OVERRIDES, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks: one thread is fastest


# -- the request ---------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"steps": None}, "`steps` may be left out only with a `time_limit`"),
    ({"steps": 0}, f"`steps` must be an integer from 1 to {2**62}, got 0"),
    ({"steps": 2.0}, f"`steps` must be an integer from 1 to {2**62}, got 2.0"),
    ({"num_images": True}, f"`num_images` must be an integer from 1 to {INT_MAX}, got True"),
    ({"log_every": 0}, f"`log_every` must be an integer from 1 to {INT_MAX}, got 0"),
    ({"checkpoint_every": -1}, f"`checkpoint_every` must be an integer from 1 to {INT_MAX}, got -1"),
    ({"seed": SEED_MAX + 1}, f"`seed` must be an integer from 0 to {SEED_MAX}, got {SEED_MAX + 1}"),
    ({"time_limit": 0}, "`time_limit` must be a positive, finite number of seconds, got 0"),
    ({"time_limit": math.inf}, "`time_limit` must be a positive, finite number of seconds, got inf"),
    ({"time_limit": True}, "`time_limit` must be a positive, finite number of seconds, got True"),
    ({"time_clock": "gpu"}, "`time_clock` must be wall or cpu, got 'gpu'"),
    ({"device": "tpu:x"}, "'tpu:x' is not a device; use cpu, cuda or cuda:N"),
])
def test_a_request_is_checked_on_construction(tmp_path, change, message):
    args = {"out": tmp_path / "run", "steps": 3, **change}
    with pytest.raises(ValueError) as err:
        FitRequest(**args)
    assert str(err.value) == message
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        fit(**args)                                                  # the keywords build the same request
    assert not (tmp_path / "run").exists()                           # refused before anything is written


def test_a_request_without_steps_runs_to_its_time_limit(tmp_path):
    request = FitRequest(out=str(tmp_path / "run"), steps=None, time_limit=60)
    assert request.out == tmp_path / "run" and request.step_limit == math.inf
    assert FitRequest(out=tmp_path, steps=5).step_limit == 5
    with pytest.raises(TypeError):
        FitRequest(tmp_path, 5)                                      # keywords only, as fit's
    with pytest.raises(TypeError, match="not both"):
        fit(request, steps=3)


def test_fit_takes_a_request_object(tmp_path):
    data = generate("tetrominoes", 8, tmp_path / "data", seed=0, progress=False, workers=1)
    request = FitRequest(out=tmp_path / "run", steps=2, data=data, eval_data=data, overrides=TINY_OVERRIDES,
                         progress=False, log_every=1)
    result = fit(request)
    assert (result.step, result.stopped, result.skipped) == (2, "done", 0)
    assert result.last_metrics["step"] == 2


# -- stopping rules --------------------------------------------------------------------------


def test_the_step_limit_is_due_at_its_step():
    limit = StepLimit(3)
    assert [limit.due(s) for s in (0, 2, 3, 4)] == [False, False, True, True]
    assert not StepLimit(math.inf).due(10**9)


def test_a_time_limit_counts_from_its_start_on_its_clock():
    wall, cpu = TimeLimit(0.05), TimeLimit(3600, clock="cpu")
    assert not wall.due(0)
    time.sleep(0.06)
    assert wall.due(0) and not cpu.due(0)
    busy = TimeLimit(0.02, clock="cpu")
    start = time.process_time()
    while time.process_time() - start < 0.03:                        # CPU seconds pass only when busy
        pass
    assert busy.due(0)


def test_signals_become_a_stop_request_while_entered():
    before = signal.getsignal(signal.SIGTERM)
    with Signals() as signals:
        assert not signals.due(0)
        os.kill(os.getpid(), signal.SIGTERM)                         # no exception: a request
        time.sleep(0.01)
        assert signals.due(0) and signals.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_first_due_rule_gives_the_reason():
    signals = Signals()
    rules = [StepLimit(5), signals, TimeLimit(3600)]
    one = Processes()
    assert first_due(rules, 0, one) is None
    signals.signal = signal.SIGINT
    assert first_due(rules, 0, one) == "signal"
    assert first_due(rules, 5, one) == "done"                        # in the order given


def test_the_fault_limit_names_the_run_and_where_it_is_saved(tmp_path):
    limit = FaultLimit(3)
    assert not limit.exceeded(2) and limit.exceeded(3)
    err = limit.error(3, "after step 7", tmp_path / "checkpoint.pt")
    assert isinstance(err, TrainingError)
    assert str(err) == (f"3 non-finite steps in a row after step 7; the last good state is saved in "
                        f"{tmp_path / 'checkpoint.pt'} (lower the learning rate or check the data)")


# -- one fault counter for both step paths ------------------------------------------------------


def test_the_fault_counter_counts_runs_of_skipped_steps():
    faults = Faults()
    for applied in (True, False, False, True, False):
        faults.add(applied)
    assert faults.settle() == (3, 2)                                 # 3 skipped, the longest run 2
    faults.add(torch.tensor(False))                                  # a device bool, as the sync-free step adds
    assert faults.settle() == (4, 2)                                 # the run goes on: 1 before, 2 now
    faults.add(True)
    assert faults.settle() == (4, 2)                                 # the longest since the last settle
    assert faults.settle() == (4, 0)


@pyro.validation_enabled(False)                                       # as in fit: NaN reaches the step
@pytest.mark.parametrize("sync_free", [False, True])
def test_both_step_paths_count_in_the_same_counter(sync_free):
    torch.manual_seed(0)
    from iodine_pyro.system import Iodine

    system = Iodine(tiny_config())
    step = make_step(system, make_optimizer(system, system.cfg, fused=sync_free), 5.0, Processes(),
                     sync_free=sync_free)
    assert type(step) is (SyncFreeStep if sync_free else HostCheckedStep)
    assert type(step.faults) is Faults and step.host_checked is not sync_free
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in system.state_dict().items()}
    outcome = step(bad, 0)
    assert outcome.applied is (None if sync_free else False)
    assert all(torch.equal(before[k], v) for k, v in system.state_dict().items())   # nothing applied
    step(bad, 1)
    step(x, 2)
    loss, norm, skipped, longest = step.settle()
    assert (skipped, longest) == (2, 2) and math.isfinite(loss) and math.isfinite(norm)
    assert bool(step.last_applied)


# -- the training state -------------------------------------------------------------------------


def test_a_saved_state_restores_to_the_same_numbers(tmp_path):
    data = open_dataset(generate("tetrominoes", 8, tmp_path / "data", seed=0, progress=False, workers=1))
    cfg = tiny_config(dataset="tetrominoes", **{"model.image_size": (35, 35), "train.geco_goal": 0.01})
    record = {"train": "data", "eval": None, "generated": None}

    def new():
        return TrainingState.start(cfg, data, seed=3, device=torch.device("cpu"), speed=Speed(), data=record)

    state = new()
    step = make_step(state.system, state.optimizer, cfg.train.clip_norm, Processes(), sync_free=False)
    batches = iter(state.batches)
    for _ in range(2):
        outcome = step(next(batches)["image"], state.step, state.schedule())
        state.observe(outcome.mse, step.last_applied)
        state.step += 1
    state.save(tmp_path / "checkpoint.pt")
    from iodine_pyro.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(ckpt) == {"format", "format_version", "config", "system", "optimizer", "step", "rng",
                         "data_state", "data", "extra"}                # the checkpoint format, unchanged
    assert set(ckpt["extra"]) == {"seed", "spent", "geco"} and ckpt["data"] == record
    expected = torch.rand(3)                                         # what the run draws next
    restored = new()
    restored.restore(ckpt, tmp_path / "checkpoint.pt")
    assert restored.step == 2 and restored.geco.state_dict() == state.geco.state_dict()
    assert restored.batches.state_dict() == state.batches.state_dict()
    assert all(torch.equal(v, state.system.state_dict()[k]) for k, v in restored.system.state_dict().items())
    assert torch.equal(torch.rand(3), expected)                      # the generators put back
    assert restored.clock()["time"] >= ckpt["extra"]["spent"]["time"]
