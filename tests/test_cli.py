"""The command-line contract: fit, resume, evaluate --json, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from .helpers import TINY_TOML

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "iodine_pyro", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip()
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = cli("fit", "--dataset", "tetrominoes", "--steps", 2, "--batch-size", 4, "--out", out,
               "--num-images", 32, "--log-every", 1, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "trained to step 2" in proc.stdout
    return out


def test_fit_writes_checkpoint_metrics_and_pictures(run_dir):
    for name in ["checkpoint.pt", "metrics.jsonl", "decomposition.png", "curves.png"]:
        assert (run_dir / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "mse", "kl", "fg_ari", "ari"} <= set(rows[0])


def test_fit_again_resumes_from_the_last_step(run_dir, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    proc = cli("fit", "--dataset", "tetrominoes", "--steps", 3, "--batch-size", 4, "--out", out,
               "--num-images", 32, "--log-every", 1, "--quiet")
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_fit_says_when_it_resumes_and_what_a_finished_run_reached(run_dir, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    proc = cli("fit", "--dataset", "tetrominoes", "--steps", 2, "--batch-size", 4, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming the run in {out} at step 2" in proc.stdout
    assert "trained to step 2: loss=" in proc.stdout                   # the logged metrics, not "none"


def test_fit_on_given_data_records_a_generated_held_out_set(tmp_path):
    from iodine_pyro.checkpoint import load_checkpoint
    from iodine_pyro.data import generate

    data = generate("tetrominoes", 24, tmp_path / "mine", seed=3, workers=1, progress=False)
    out = tmp_path / "run"
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    proc = cli("fit", "--data", data, "--steps", 1, "--out", out, "--quiet", "--config", tmp_path / "tiny.toml")
    assert proc.returncode == 0, proc.stderr
    recorded = load_checkpoint(out)["data"]
    assert recorded["eval"] == "data/test" and recorded["train"] == str(data.resolve())
    proc = cli("evaluate", out, "--num-images", 4)
    assert proc.returncode == 0, proc.stderr
    assert f"4 images of {out.resolve() / 'data' / 'test'}" in proc.stdout   # says which set it scored


def test_help_is_plain_and_whole():
    proc = cli("fit", "--help")
    assert proc.returncode == 0
    assert "[model], [guide] and [train]" in proc.stdout             # no markup eaten
    assert "--checkpoint-every" in proc.stdout and "--time-limit" in proc.stdout   # names not cut
    assert "fast" in proc.stdout and "tetrominoes, multi_dsprites" in proc.stdout  # choices listed


def test_evaluate_json(run_dir):
    proc = cli("evaluate", run_dir, "--num-images", 8, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ["fg_ari", "ari", "mse", "kl"]:
        assert isinstance(result[key], list) and len(result[key]) == 5, key
        assert all(isinstance(v, float) for v in result[key])
    assert all(0 <= v <= 1 for v in result["mse"])
    assert result["num_images"] == 8


def test_evaluate_beyond_trained_t_and_other_k(run_dir):
    proc = cli("evaluate", run_dir, "--num-images", 4, "--num-iters", 7, "--num-slots", 6, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["fg_ari"]) == 7 and result["num_slots"] == 6


def test_evaluate_missing_run(tmp_path):
    assert_one_line_error(cli("evaluate", tmp_path / "nope", "--json"), "no checkpoint")


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, "truncate"])
def test_evaluate_corrupt_checkpoint(run_dir, tmp_path, content):
    bad = tmp_path / "bad"
    bad.mkdir()
    if content == "truncate":
        data = (run_dir / "checkpoint.pt").read_bytes()
        content = data[: len(data) // 2]
    (bad / "checkpoint.pt").write_bytes(content)
    assert_one_line_error(cli("evaluate", bad, "--json"), "checkpoint", str(bad))


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps"),
    (["--dataset", "nope"], "--dataset"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--preset", "other"], "--preset"),
    (["--ablate", "nope"], "nope"),
])
def test_fit_bad_arguments(tmp_path, args, needle):
    proc = cli("fit", "--out", tmp_path / "r", "--num-images", 8, "--quiet", *args)
    assert_one_line_error(proc, needle)


def test_fit_refuses_data_of_another_shape(run_dir, tmp_path):
    proc = cli("fit", "--dataset", "multi_dsprites", "--data", run_dir / "data" / "train",
               "--out", tmp_path / "r", "--steps", 1, "--quiet")
    assert_one_line_error(proc, "35x35", "64x64")


def test_fit_refuses_a_run_of_another_preset(run_dir):
    proc = cli("fit", "--preset", "deepmind", "--out", run_dir, "--steps", 3, "--quiet")
    assert_one_line_error(proc, "tetrominoes/paper")


def test_fit_with_a_time_limit_and_no_steps_trains_until_the_limit(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    out = tmp_path / "run"
    proc = cli("fit", "--time-limit", "3s", "--out", out, "--num-images", 16, "--batch-size", 2,
               "--config", tmp_path / "tiny.toml", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "training until the time limit" not in proc.stdout            # a new run says nothing of resuming
    assert "reached the time limit at step" in proc.stdout
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step > 2                                                       # not stopped at a fixed count
    proc = cli("fit", "--time-limit", "1s", "--out", out, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming the run in {out} at step {step}, training until the time limit" in proc.stdout


def test_fit_resume_takes_a_new_learning_rate_and_refuses_any_other_change(run_dir, tmp_path):
    import shutil

    from iodine_pyro.checkpoint import load_checkpoint
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    proc = cli("fit", "--out", out, "--resume", "--steps", 3, "--lr", 1e-5, "--log-every", 1, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming the run in {out} at step 2 with train.lr 0.0003 -> 1e-05" in proc.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 3 and ckpt["config"].train.lr == 1e-5
    assert all(g["lr"] == pytest.approx(1e-5) for g in ckpt["optimizer"]["param_groups"])
    proc = cli("fit", "--out", out, "--resume", "--steps", 4, "--batch-size", 8, "--quiet")
    assert_one_line_error(proc, "train.batch_size 4 -> 8", "may change only train.lr")
    assert load_checkpoint(out)["step"] == 3                          # refused before any step
