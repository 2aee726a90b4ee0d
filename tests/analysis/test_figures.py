"""The `plot` figures and the input ablations: PNGs that show something, the data behind
them, determinism, and one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from iodine_pyro import figures
from iodine_pyro.ablate import ablate, plan
from iodine_pyro.checkpoint import load_checkpoint

from ..helpers import TINY_OVERRIDES, run_main, status_of, tiny_run

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run_cli(*args):
    """`python -m iodine_pyro ARGS` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "iodine_pyro", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600)


def assert_one_line_error(code, err, *needles):
    assert code == status_of(err), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def assert_picture(path, min_width=300, min_height=200):
    """A PNG of at least the given size that is not blank."""
    assert path.is_file() and path.stat().st_size > 5_000, path
    pixels = imread(path)                                            # [H, W, 4] floats in [0, 1]
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("figures"), steps=3)


def test_decomposition_final_step(run_dir, tmp_path):
    files = figures.decomposition(run_dir, tmp_path / "d.png", num_images=2)
    assert_picture(files.png, 600, 300)
    a = np.load(files.data)
    assert a["recon"].shape == (2, 1, 3, 35, 35) and a["means"].shape == (2, 1, 4, 3, 35, 35)
    assert a["step"].tolist() == [3]
    np.testing.assert_allclose(a["masks"].sum(2), 1, atol=1e-5)
    recon = (a["masks"][:, :, :, None] * a["means"]).sum(2)
    np.testing.assert_allclose(a["recon"], recon, atol=1e-5)


@pytest.mark.slow
def test_decomposition_every_step_through_the_cli(run_dir, tmp_path):
    out = tmp_path / "fig" / "steps.png"
    proc = run_cli("plot", "decomposition", run_dir, "--out", out, "--all-steps", "--num-images", 1)
    assert proc.returncode == 0, proc.stderr
    assert "steps.png" in proc.stdout
    assert_picture(out, 600, 400)
    a = np.load(out.with_suffix(".npz"))
    assert a["step"].tolist() == [1, 2, 3] and a["masks"].shape[:3] == (1, 3, 4)


def test_same_seed_same_png(run_dir, tmp_path):
    first = figures.decomposition(run_dir, tmp_path / "a.png", num_images=1, seed=3)
    second = figures.decomposition(run_dir, tmp_path / "b.png", num_images=1, seed=3)
    other = figures.decomposition(run_dir, tmp_path / "c.png", num_images=1, seed=4)
    assert first.png.read_bytes() == second.png.read_bytes()
    assert not np.array_equal(np.load(first.data)["means"], np.load(other.data)["means"])


def test_mask_logits(run_dir, tmp_path):
    files = figures.mask_logits(run_dir, tmp_path / "m.png", num_images=2)
    assert_picture(files.png, 600, 400)
    a = np.load(files.data)
    assert a["mask_logits"].shape == (2, 4, 35, 35) and a["true_masks"].shape == (2, 4, 35, 35)
    np.testing.assert_allclose(a["masks"], torch.softmax(torch.from_numpy(a["mask_logits"]), 1).numpy(),
                               atol=1e-5)


def test_traversal_sweeps_one_dimension_of_one_slot(run_dir, tmp_path):
    files = figures.traversal(run_dir, tmp_path / "t.png", seed=5, num_values=5)
    assert_picture(files.png, 400, 300)
    a = np.load(files.data)
    n_z, K = 4, 4
    assert a["renders"].shape == (n_z, 5, 3, 35, 35)
    assert sorted(a["dims"].tolist()) == list(range(n_z))
    assert np.all(np.diff(a["kl"][a["dims"]]) <= 0)                  # most informative first
    slot, mean = int(a["slot"]), a["posterior_mean"]
    assert 0 <= slot < K and 0 <= int(a["image_index"]) < 48
    np.testing.assert_allclose(a["offsets"], [-2, -1, 0, 1, 2], atol=1e-6)
    np.testing.assert_allclose(a["values"][:, 2], mean[slot, a["dims"]], atol=1e-6)
    for r in range(n_z):                                             # the middle column is the mean
        np.testing.assert_allclose(a["renders"][r, 2], a["recon"], atol=1e-5)
    again = figures.traversal(run_dir, tmp_path / "t2.png", seed=5, num_values=5)
    assert again.png.read_bytes() == files.png.read_bytes()


@pytest.mark.slow
def test_traversal_shows_the_dimensions_with_most_kl(run_dir, tmp_path):
    every = np.load(figures.traversal(run_dir, tmp_path / "all.png", seed=5, num_values=3).data)
    files = figures.traversal(run_dir, tmp_path / "t.png", seed=5, num_values=3, num_dims=2)
    a = np.load(files.data)
    assert a["renders"].shape[:2] == (2, 3) and a["values"].shape == (2, 3)
    assert a["dims"].tolist() == every["dims"][:2].tolist()          # the two with most KL
    assert a["kl"][a["dims"]].min() >= np.delete(a["kl"], a["dims"]).max()
    proc = run_cli("plot", "traversal", run_dir, "--out", tmp_path / "c.png", "--dims", 1, "--seed", 5)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "c.npz")["dims"].tolist() == every["dims"][:1].tolist()


def test_traversal_chosen_image_and_slot(run_dir, tmp_path):
    files = figures.traversal(run_dir, tmp_path / "t.png", image=7, slot=0, value_range=(-1, 3),
                              num_values=3)
    a = np.load(files.data)
    assert (int(a["image_index"]), int(a["slot"])) == (7, 0)
    np.testing.assert_allclose(a["offsets"], [-1, 1, 3])


@pytest.mark.slow
def test_projection(run_dir, tmp_path):
    files = figures.projection(run_dir, tmp_path / "p.png", num_images=12, seed=1)
    assert_picture(files.png, 1000, 500)
    a = np.load(files.data)
    M = len(a["latent"])
    assert M == 36                                                   # 3 pieces in each of 12 images
    assert a["latent"].shape == (M, 4) and a["pca"].shape == (M, 2) and a["tsne"].shape == (M, 2)
    assert set(zip(a["image_index"].tolist(), a["group"].tolist())) == {
        (i, g) for i in range(12) for g in (1, 2, 3)}
    for i in range(12):                                              # one slot per object
        slots = a["slot"][a["image_index"] == i]
        assert len(set(slots.tolist())) == len(slots)
    assert np.all((a["iou"] >= 0) & (a["iou"] <= 1))
    assert a["factor_color"].shape == (M, 3) and a["factor_shape"].shape == (M,)
    assert a["factor_shape"].min() >= 1                              # no background group
    again = np.load(figures.projection(run_dir, tmp_path / "q.png", num_images=12, seed=1).data)
    np.testing.assert_array_equal(a["tsne"], again["tsne"])


def test_curves_of_several_runs(run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", other / "metrics.jsonl")
    out = tmp_path / "c.png"
    code, stdout, err = run_main("plot", "curves", run_dir, other, "--out", out)
    assert code == 0, err
    assert_picture(out, 600, 400)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in data["runs"]] == [run_dir.name, "other"]
    assert data["keys"] == ["loss", "mse", "kl", "fg_ari"]
    assert data["runs"][0]["step"] == [1, 2, 3] and len(data["runs"][1]["loss"]) == 3


@pytest.mark.slow
def test_ablation(tmp_path):
    seen = []
    out = tmp_path / "abl"
    kwargs = dict(overrides=TINY_OVERRIDES, num_images=8, log_every=1, progress=False)
    runs = ablate("tetrominoes", 2, out, ["grad_means", "leave_one_out"], report=seen.append, **kwargs)
    assert [r.name for r in runs] == ["full", "no-grad_means", "no-leave_one_out"]
    assert [(r.name, r.status) for r in seen] == [
        ("full", "start"), ("full", "trained"), ("no-grad_means", "start"), ("no-grad_means", "trained"),
        ("no-leave_one_out", "start"), ("no-leave_one_out", "trained")]
    cfg = load_checkpoint(out / "no-grad_means")["config"]
    assert cfg.guide.disabled_inputs == ("grad_means",) and cfg.model.latent_dim == 4
    assert load_checkpoint(out / "full")["config"].guide.disabled_inputs == ()
    again = ablate("tetrominoes", 2, out, ["grad_means", "leave_one_out"], **kwargs)
    assert [r.status for r in again] == ["skipped"] * 3              # finished runs are not retrained
    seen.clear()
    longer = ablate("tetrominoes", 3, out, ["grad_means"], report=seen.append, **kwargs)
    assert [(r.name, r.status, r.step) for r in seen] == [         # partial runs resume
        ("full", "start", 2), ("full", "trained", 3), ("no-grad_means", "start", 2),
        ("no-grad_means", "trained", 3)]
    assert [r.step for r in longer] == [3, 3]

    png = tmp_path / "ablation.png"
    code, stdout, err = run_main("plot", "ablation", out, "--out", png)
    assert code == 0, err
    assert_picture(png, 600, 400)
    data = json.loads(png.with_suffix(".json").read_text())
    assert [r["label"] for r in data["runs"]] == ["full", "no-grad_means", "no-leave_one_out"]
    assert [r["step"] for r in data["runs"]] == [[1, 2, 3], [1, 2, 3], [1, 2]]


def test_ablation_plan_names_every_input():
    names = [name for name, _ in plan("tetrominoes")]
    assert names[0] == "full" and "no-grad_posterior" in names and len(names) == 13
    with pytest.raises(ValueError, match="nope"):
        plan("tetrominoes", ["nope"])


@pytest.mark.slow
def test_unknown_kind_and_missing_run(tmp_path):
    proc = run_cli("plot", "nope", tmp_path, "--out", tmp_path / "x.png")
    assert_one_line_error(proc.returncode, proc.stderr, "nope")
    proc = run_cli("plot", "decomposition", tmp_path / "missing", "--out", tmp_path / "x.png")
    assert_one_line_error(proc.returncode, proc.stderr, "no checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["curves"], "Missing argument 'RUN...'"),
    (["traversal", "RUN", "--slot", "4"], "--slot 4 is out of range"),
    (["traversal", "RUN", "--image", "48"], "--image 48 is out of range"),
    (["traversal", "RUN", "--range", "1", "-1"], "--range"),
    (["decomposition", "RUN", "RUN"], "unexpected extra argument"),
    (["curves", "RUN", "--all-steps"], "No such option: --all-steps"),
    (["ablation", "NOWHERE"], "no ablation runs"),
    (["curves", "NOWHERE"], "no metrics.jsonl"),
    (["decomposition", "RUN", "--num-images", "0"], "'--num-images': Input should be greater than or equal to 1"),
])
def test_one_line_errors(run_dir, tmp_path, args, needle):
    args = [{"RUN": run_dir, "NOWHERE": tmp_path / "nowhere"}.get(a, a) for a in args]
    code, stdout, err = run_main("plot", *args, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, needle)
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_out_must_be_png(run_dir, tmp_path):
    with pytest.raises(ValueError, match=".png"):
        figures.decomposition(run_dir, tmp_path / "x.jpg")


@pytest.mark.slow
def test_sampling_comparing_and_evaluating_load_no_matplotlib():
    code = "import sys, iodine_pyro.posterior, iodine_pyro.compare, iodine_pyro.evaluate; " \
           "assert 'matplotlib' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_a_figure_is_computed_without_matplotlib(run_dir):
    code = "import sys; sys.modules['matplotlib'] = None\n" \
           "from iodine_pyro import figures\n" \
           "a = figures.decomposition_arrays(sys.argv[1], num_images=1)\n" \
           "assert a['masks'].shape == (1, 1, 4, 35, 35), a['masks'].shape\n"
    proc = subprocess.run([sys.executable, "-c", code, run_dir], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_a_drawing_that_fails_leaves_neither_file(run_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "draw_decomposition", fail)          # called through the package
    with pytest.raises(RuntimeError, match="drawing failed"):
        figures.decomposition(run_dir, tmp_path / "d.png", num_images=1)
    assert list(tmp_path.iterdir()) == []                             # no data file without its PNG
    monkeypatch.undo()
    files = figures.decomposition(run_dir, tmp_path / "d.png", num_images=1)
    assert files.data == tmp_path / "d.npz" and files.data.is_file() and files.png.is_file()


def _row(arm, step, fg_ari, parent=None):
    return {"arm": arm, "step": step, "cpu_min": step / 30, "fg_ari": fg_ari, "ari": fg_ari / 2,
            "bg_share": 0.8, "mse": 0.01, **({"parent": parent} if parent else {})}


BRANCHED = [_row("base", 0, 0.1), _row("base", 100, 0.5), _row("base", 200, 0.6),
            _row("lever", 300, 0.9, {"arm": "base", "step": 100}), _row("lever", 200, 0.7, {"arm": "base", "step": 100}),
            _row("base", 300, 0.62)]


def test_a_branch_starts_where_it_left_its_parent():
    curves = figures.branch_curves(BRANCHED)
    assert list(curves) == ["base", "lever"]
    assert [p[0] for p in curves["base"]] == [0, 100, 200, 300]
    assert [(p[0], p[2]) for p in curves["lever"]] == [(100, 0.5), (200, 0.7), (300, 0.9)]
    assert curves["lever"][0] == curves["base"][1]                  # the parent's own point, every value


@pytest.mark.parametrize("rows, needle", [
    ([{**BRANCHED[0], "arm": ""}], "names no arm"),
    ([{k: v for k, v in BRANCHED[0].items() if k != "mse"}], "has no mse"),
    ([_row("lever", 200, 0.7, {"arm": "base", "step": 100})], "not another arm"),
    ([_row("lever", 200, 0.7, {"arm": "base"})], "is not"),
    ([_row("base", 0, 0.1), _row("lever", 200, 0.7, {"arm": "base", "step": 100})], "has no evaluation"),
    ([*BRANCHED, _row("lever", 400, 0.9, {"arm": "base", "step": 200})], "branches from both"),
])
def test_branch_curves_refuse_rows_that_do_not_form_branches(rows, needle):
    with pytest.raises(ValueError, match=needle):
        figures.branch_curves(rows)


def test_branch_curves_script_draws_the_picture_and_its_points(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps({**r, "variant": "v"}) + "\n" for r in BRANCHED)
                       + json.dumps({**_row("other", 0, 0.3), "variant": "w"}) + "\n")
    out = tmp_path / "branches.png"
    script = [sys.executable, str(ROOT / "benchmarks" / "branch_curves.py"), str(results), "--out", str(out)]
    proc = subprocess.run([*script, "--variant", "v"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_picture(out)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["columns"] == ["step", "cpu_min", "fg_ari", "ari", "bg_share", "mse"]
    assert data["curves"] == figures.branch_curves(BRANCHED)        # arm "other" is variant w's
    proc = subprocess.run([*script, "--variant", "nope"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "no rows" in proc.stderr and "Traceback" not in proc.stderr


def test_learning_speed_draws_kept_rows_without_training(tmp_path):
    rows = [{"variant": v, "seed": s, "cpu_min": m, "step": 100 * m, "fg_ari": f + m / 100, "ari": 0.5,
             "bg_slots": 1.0, "bg_share": 0.9, "mse": 0.01, "kl": 500.0}
            for v, f in (("fast", 0.2), ("a-continuation", 0.3)) for s in (0, 1) for m in (8, 16, 24)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = [sys.executable, str(ROOT / "benchmarks" / "learning_speed.py"), "--rows", str(results)]
    out = tmp_path / "drawn"
    proc = subprocess.run([*script, "--variants", "a-continuation", "fast", "--until", "16", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (out / "data").exists()                              # nothing generated, nothing trained
    assert_picture(out / "curves.png")
    curves = json.loads((out / "curves.json").read_text())["curves"]
    assert list(curves) == ["a-continuation", "fast"]               # the order asked for
    assert [p[0] for p in curves["fast"]["1"]] == [8, 16]            # cut at --until
    table = (out / "summary.md").read_text().splitlines()
    assert table[2].startswith("| a-continuation |  | 2 | 16 | 1600 | 0.460 |")
    assert table[3].startswith("| fast | the fast preset | 2 | 16 | 1600 | 0.360 |")
    proc = subprocess.run([*script, "--variants", "nope", "--out", str(out)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 2 and "no rows of nope" in proc.stderr and "Traceback" not in proc.stderr
