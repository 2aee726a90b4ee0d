"""The command-line contract: fit, resume, evaluate --json, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ..helpers import ENV, FAILURE, TINY_TOML, USAGE, assert_one_line_error, cli, run_main

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = cli("fit", "--dataset", "tetrominoes", "--steps", 2, "--batch-size", 4, "--out", out,
               "--num-images", 32, "--log-every", 1, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "trained to step 2" in proc.stdout
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.mark.slow
def test_fit_says_first_how_many_threads_and_last_what_was_measured(run_dir):
    lines = (run_dir / "stdout.txt").read_text().splitlines()
    assert lines[0].startswith("using ") and "--threads N to choose" in lines[0], lines[0]
    assert "OpenMP wait policy PASSIVE" in lines[0]                    # set before torch was loaded
    assert any(line.startswith("held-out, 32 images, final refinement step: FG-ARI ") and "slots own part of the background"
               in line for line in lines), lines
    assert any(line.startswith("what the pictures show: ") for line in lines), lines


@pytest.mark.slow
def test_the_default_preset_is_fast_and_paper_is_the_papers_recipe(tmp_path):
    from iodine_pyro.checkpoint import load_checkpoint

    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    proc = cli("fit", "--steps", 1, "--out", tmp_path / "r", "--num-images", 8, "--config", tmp_path / "tiny.toml",
               "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "r")["config"].preset == "fast"
    help_text = " ".join(cli("fit", "--help").stdout.split())
    assert "[default: fast]" in help_text and "paper (the paper's recipe" in help_text
    assert "default 4m when --steps is not given" in help_text


@pytest.mark.parametrize("value,needle", [("4", "'4' has no unit; write 4s, 4m or 4h"), ("soon", "90s, 45m or 2h"),
                                          ("0s", "positive")])
@pytest.mark.slow
def test_a_time_limit_needs_a_unit(tmp_path, value, needle):
    proc = cli("fit", "--time-limit", value, "--out", tmp_path / "r", "--quiet")
    assert_one_line_error(proc, "--time-limit", needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_metrics_and_the_final_line_belong_to_the_final_step(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    out = tmp_path / "r"
    proc = cli("fit", "--steps", 3, "--log-every", 2, "--out", out, "--num-images", 8, "--config",
               tmp_path / "tiny.toml", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    assert "trained to step 3: loss=" in proc.stdout


@pytest.mark.slow
def test_a_time_limited_bar_shows_the_time_left_and_the_step(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    out = tmp_path / "r"
    proc = cli("fit", "--time-limit", "3s", "--out", out, "--num-images", 8, "--config", tmp_path / "tiny.toml",
               "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert "of the time limit" in proc.stderr and "step=" in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith("using 1 CPU thread (--threads")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == torch.load(out / "checkpoint.pt", weights_only=True)["step"]


@pytest.mark.parametrize("args", [["evaluate", "RUN", "--num-images", 4, "--json"],
                                  ["sample", "RUN", "--num-images", 2, "--num-samples", 2, "--out", "OUT/p.nc", "-q"],
                                  ["plot", "decomposition", "RUN", "--out", "OUT/d.png"],
                                  ["compare", "RUN", "--num-images", 2, "--iw-samples", 2, "--gap-steps", 1,
                                   "--out", "OUT/c", "--json"]])
@pytest.mark.slow
def test_every_command_that_computes_takes_threads(run_dir, tmp_path, args):
    args = [str(a).replace("RUN", str(run_dir)).replace("OUT", str(tmp_path)) for a in args]
    proc = cli(*args, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    said = proc.stderr if "--json" in args else proc.stdout
    assert "using 1 CPU thread (--threads" in said, said
    if "--json" in args:
        json.loads(proc.stdout)                                     # stdout stays one JSON object


def test_threads_do_not_apply_to_curves(run_dir, tmp_path):
    assert_one_line_error(cli("plot", "curves", run_dir, "--out", tmp_path / "c.png", "--threads", 1),
                          "No such option: --threads")


def test_the_closing_judgement_comes_from_the_numbers():
    from iodine_pyro.commands.train import what_it_shows

    bands = {"fg_ari": 0.18, "bands_fg_ari": 0.21, "bg_slots": 3.6, "bg_share": 0.35, "num_slots": 4}
    said = what_it_shows(bands)
    assert "regions, not objects" in said and "split over 3.6 slots" in said and "35%" in said
    objects = {"fg_ari": 0.9, "bands_fg_ari": 0.21, "bg_slots": 1.1, "bg_share": 0.99, "num_slots": 4}
    said = what_it_shows(objects)
    assert "separate objects better than" in said and "the background is one slot's (99%" in said
    stray = {"fg_ari": 0.9, "bands_fg_ari": 0.21, "bg_slots": 1.9, "bg_share": 0.97, "num_slots": 4}
    assert "the background is one slot's" in what_it_shows(stray)      # stray pixels elsewhere do not split it


@pytest.mark.slow
def test_a_script_without_a_main_guard_can_generate_with_workers(tmp_path):
    script = tmp_path / "make.py"                                   # no `if __name__ == "__main__":`
    script.write_text("from iodine_pyro.data import generate\n"
                      "generate('tetrominoes', 600, 'store', workers=2, progress=False)\n"
                      "print('done')\n")
    proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]
    from iodine_pyro.data import open_dataset
    assert open_dataset(tmp_path / "store").sizes["image"] == 600


def test_fit_writes_checkpoint_metrics_and_pictures(run_dir):
    for name in ["checkpoint.pt", "metrics.jsonl", "decomposition.png", "curves.png"]:
        assert (run_dir / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "mse", "kl", "fg_ari", "ari"} <= set(rows[0])


@pytest.mark.slow
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


@pytest.mark.slow
def test_fit_says_when_it_resumes_and_what_a_finished_run_reached(run_dir, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    proc = cli("fit", "--dataset", "tetrominoes", "--steps", 2, "--batch-size", 4, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming the run in {out} at step 2" in proc.stdout
    assert "trained to step 2: loss=" in proc.stdout                   # the logged metrics, not "none"


@pytest.mark.slow
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
    assert "<paper|deepmind|fast>" in proc.stdout and "<tetrominoes|multi_dsprites|" in proc.stdout  # choices listed


@pytest.mark.slow
def test_evaluate_json(run_dir):
    proc = cli("evaluate", run_dir, "--num-images", 8, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ["fg_ari", "ari", "bg_slots", "bg_share", "mse", "kl"]:
        assert isinstance(result[key], list) and len(result[key]) == 5, key
        assert all(isinstance(v, float) for v in result[key])
    assert all(0 <= v <= 1 for v in result["mse"])
    K = result["num_slots"]
    # one slot holds at least 1/K of the background; when it is the only slot holding 1% of
    # it, the others hold under 1% each
    assert all(1 / K - 1e-9 <= v <= 1 for v in result["bg_share"])
    assert all(share >= 1 - (K - 1) * 0.01 for share, n in zip(result["bg_share"], result["bg_slots"]) if n == 1)
    assert result["num_images"] == 8


@pytest.mark.slow
def test_evaluate_beyond_trained_t_and_other_k(run_dir):
    proc = cli("evaluate", run_dir, "--num-images", 4, "--num-iters", 7, "--num-slots", 6, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["fg_ari"]) == 7 and result["num_slots"] == 6


@pytest.mark.slow
def test_evaluate_missing_run(tmp_path):
    assert_one_line_error(cli("evaluate", tmp_path / "nope", "--json"), "no checkpoint")


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, "truncate"])
@pytest.mark.slow
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
@pytest.mark.slow
def test_fit_bad_arguments(tmp_path, args, needle):
    proc = cli("fit", "--out", tmp_path / "r", "--num-images", 8, "--quiet", *args)
    assert_one_line_error(proc, needle)


@pytest.mark.slow
def test_fit_refuses_data_of_another_shape(run_dir, tmp_path):
    proc = cli("fit", "--dataset", "multi_dsprites", "--data", run_dir / "data" / "train",
               "--out", tmp_path / "r", "--steps", 1, "--quiet")
    assert_one_line_error(proc, "35x35", "64x64")


@pytest.mark.slow
def test_fit_refuses_a_run_of_another_preset(run_dir):
    proc = cli("fit", "--preset", "deepmind", "--out", run_dir, "--steps", 3, "--quiet")
    assert_one_line_error(proc, "tetrominoes/fast")                   # the default preset


@pytest.mark.slow
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


@pytest.mark.slow
def test_fit_resume_takes_a_new_learning_rate_and_batch_and_refuses_any_other_change(run_dir, tmp_path):
    import shutil

    from iodine_pyro.checkpoint import load_checkpoint
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    proc = cli("fit", "--out", out, "--resume", "--steps", 3, "--lr", 1e-5, "--log-every", 1, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming the run in {out} at step 2 with train.lr 0.001 -> 1e-05" in proc.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 3 and ckpt["config"].train.lr == 1e-5
    from iodine_pyro.training import learning_rate
    lr = learning_rate(ckpt["config"], 2)                              # the new rate, in the preset's warm-up
    assert all(g["lr"] == pytest.approx(lr) for g in ckpt["optimizer"]["param_groups"])
    proc = cli("fit", "--out", out, "--resume", "--steps", 4, "--decoder", "deconv", "--quiet")
    assert_one_line_error(proc, "model.decoder 'broadcast' -> 'deconv'", "may change only train.lr")
    assert load_checkpoint(out)["step"] == 3                          # refused before any step
    proc = cli("fit", "--out", out, "--resume", "--steps", 4, "--batch-size", 8, "--log-every", 1, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "with train.batch_size 4 -> 8" in proc.stdout              # the batch is the schedule's too
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["batch_size"]) for r in rows][-2:] == [(3, 4), (4, 8)]
    assert load_checkpoint(out)["config"].train.batch_size == 8


def test_the_default_thread_count_leaves_busy_cores_alone():
    code = ("import os; from iodine_pyro import threads; threads.prepare_environment(); "
            "n, why = threads.choose(None); print(n, why, os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    n, rest = proc.stdout.split(" ", 1)
    assert 1 <= int(n) <= (os.cpu_count() or 1) and "cores" in rest and rest.strip().endswith("PASSIVE"), proc.stdout


@pytest.mark.slow
def test_library_errors_name_parameters_and_the_command_line_shows_flags(tiny_runs, tmp_path):
    """The library names its parameters (`num_slots`); the command line shows the flag of
    the command that ran (--num-slots)."""
    from iodine_pyro.posterior import check_slots
    from iodine_pyro.run import Run

    with pytest.raises(ValueError, match="`num_slots` 5 needs"):
        check_slots(Run.open(tiny_runs["amortized"]).system, 5)
    proc = cli("sample", tiny_runs["amortized"], "--num-slots", 5, "--num-images", 2, "--num-samples", 2,
               "--out", tmp_path / "p.nc", "-q")
    assert_one_line_error(proc, "--num-slots 5 needs a guide that can change K")
    assert "`" not in proc.stderr


@pytest.mark.parametrize("args, status, needle", [
    (["fit", "--steps", "0"], USAGE, "'--steps'"),                          # out of range
    (["fit", "--preset", "nope"], USAGE, "'nope' is not one of"),           # not a choice
    (["fit", "--no-such-option"], USAGE, "No such option"),
    (["plot", "curves", "RUN", "--out", "x.png", "--threads", "1"], USAGE, "No such option: --threads"),
    (["plot", "decomposition", "--out", "x.png"], USAGE, "Missing argument"),
    (["evaluate", "NOWHERE"], FAILURE, "no checkpoint"),                     # a failure at run time
    (["fit", "--config", "NOWHERE/x.toml", "--steps", "1"], FAILURE, "no configuration file"),
])
def test_usage_errors_exit_2_and_failures_exit_1(tmp_path, args, status, needle):
    args = [str(a).replace("NOWHERE", str(tmp_path / "nowhere")).replace("RUN", str(tmp_path)) for a in args]
    code, _, err = run_main(*args)
    assert code == status and len(err.strip().splitlines()) == 1 and needle in err, (code, err)
    assert err.rstrip().endswith("--help") == (status == USAGE), err


def test_each_plot_subcommand_has_only_its_own_options():
    helps = {kind: run_main("plot", kind, "--help")[1] for kind in ("curves", "traversal", "decomposition")}
    assert "--threads" not in helps["curves"] and "--smooth" in helps["curves"]
    assert "--dims" in helps["traversal"] and "--dims" not in helps["decomposition"]
    assert "--all-steps" in helps["decomposition"] and "--all-steps" not in helps["traversal"]


@pytest.mark.slow
def test_shell_completion_completes_commands_and_choices():
    def complete(words: str, index: int) -> list[str]:
        env = {**ENV, "_IODINE_PYRO_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(index)}
        proc = subprocess.run([sys.executable, "-m", "iodine_pyro"], capture_output=True, text=True, env=env,
                              timeout=120)
        return proc.stdout.split()

    assert "--install-completion" in cli("--help").stdout
    assert complete("iodine-pyro plot tr", 2) == ["traversal"]
    assert complete("iodine-pyro fit --preset ", 3) == ["paper", "deepmind", "fast"]
