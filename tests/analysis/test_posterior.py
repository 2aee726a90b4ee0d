"""Posterior samples: the in-memory API, the netCDF file, ArviZ, multi-stability, `sample` CLI."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import xarray as xr

from iodine_pyro.posterior import plot_multistability, sample_posterior, write_samples
from iodine_pyro.run import Run

from ..helpers import FAILURE, run_main, status_of

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(runs):
    return Run.open(runs["iterative"]).images(0, 5)[0]


@pytest.fixture(scope="module")
def tree(runs, batch):
    system = Run.open(runs["iterative"]).system
    return sample_posterior(system, batch["image"], 7, predictive=True, true_masks=batch["mask"],
                            image_index=np.arange(10, 15), batch_size=3, attrs={"checkpoint": "ckpt"})


GROUPS = {"posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data",
          "constant_data"}


def test_groups_dims_and_coordinates(tree):
    assert set(tree.children) == GROUPS
    post, pp, obs = tree["posterior"].ds, tree["posterior_predictive"].ds, tree["observed_data"].ds
    ll, stats, const = tree["log_likelihood"].ds, tree["sample_stats"].ds, tree["constant_data"].ds
    assert set(post.data_vars) == {"z", "masks", "reconstruction"}
    assert post["z"].dims == ("chain", "draw", "image", "slot", "latent")
    assert post["z"].shape == (1, 7, 5, 4, 4)                  # tiny Tetrominoes: K = 4, n_z = 4
    assert list(post["image"].values) == [10, 11, 12, 13, 14]
    assert post["masks"].dims == ("chain", "draw", "image", "slot", "height", "width")
    np.testing.assert_allclose(post["masks"].sum("slot").values, 1.0, atol=1e-5)
    assert post["reconstruction"].dims == ("chain", "draw", "image", "channel", "height", "width")
    assert post["reconstruction"].shape == (1, 7, 5, 3, 35, 35)
    assert set(pp.data_vars) == {"x"}
    assert pp["x"].dims == ("chain", "draw", "image", "channel", "height", "width")
    assert pp["x"].shape == (1, 7, 5, 3, 35, 35)
    assert set(ll.data_vars) == {"x"} and ll["x"].dims == ("chain", "draw", "image")
    assert ll["x"].shape == (1, 7, 5) and ll["x"].dtype == np.float64
    assert set(stats.data_vars) == {"log_joint", "log_weight", "loc", "scale"}
    for name in ("log_joint", "log_weight"):
        assert stats[name].dims == ("chain", "draw", "image") and stats[name].dtype == np.float64
    for name in ("loc", "scale"):
        assert stats[name].dims == post["z"].dims and stats[name].shape == post["z"].shape
    assert set(obs.data_vars) == {"x"} and obs["x"].dims == ("image", "channel", "height", "width")
    assert set(const.data_vars) == {"true_masks"}
    assert const["true_masks"].dims == ("image", "group", "height", "width")
    assert list(const["group"].values) == [0, 1, 2, 3]
    for ds in (post, pp, ll, stats, obs, const):
        for name, var in ds.data_vars.items():
            assert np.isfinite(var.values).all(), name
            assert var.attrs["description"], name
        assert set(ds.dims) <= set(ds.coords), set(ds.dims) - set(ds.coords)   # every dim has values
        assert set(ds.coords) <= set(ds.dims), set(ds.coords) - set(ds.dims)   # and no stray ones
        assert ds.attrs["guide"] == "iterative"                                 # provenance on every group
    attrs = tree["posterior"].attrs
    assert attrs["guide"] == "iterative" and attrs["dataset"] == "tetrominoes" and attrs["preset"] == "paper"
    assert attrs["num_iters"] == 3 and attrs["num_slots"] == 4 and attrs["site"] == "t2/z"
    assert attrs["checkpoint"] == "ckpt" and attrs["created_by"].startswith("iodine-pyro")


def test_log_densities_of_the_draws(runs, tree, batch):
    """log_likelihood is the model's likelihood of each image given the draw; log_joint adds the
    prior; log_weight subtracts the draw's own q = Normal(loc, scale)."""
    from torch.distributions import Normal

    system = Run.open(runs["iterative"]).system
    post, stats = tree["posterior"].ds, tree["sample_stats"].ds
    log_lik = tree["log_likelihood"]["x"].values                               # [1, S, N]
    z, loc, scale = (torch.as_tensor(v.values, dtype=torch.float64)
                     for v in (post["z"], stats["loc"], stats["scale"]))       # [1, S, N, K, n_z]
    log_q = Normal(loc, scale).log_prob(z).sum((-2, -1)).numpy()
    np.testing.assert_allclose(stats["log_weight"].values, stats["log_joint"].values - log_q, rtol=1e-9, atol=1e-6)
    log_prior = Normal(0.0, system.cfg.model.prior_var ** 0.5).log_prob(z).sum((-2, -1)).numpy()
    np.testing.assert_allclose(stats["log_joint"].values, log_lik + log_prior, rtol=1e-9, atol=1e-6)
    draw = 4                                                                    # one draw, all images
    with torch.no_grad():
        zd = torch.as_tensor(post["z"].isel(chain=0, draw=draw).values)       # [N, K, n_z]
        expected = system.model.likelihood(system.model.decode(zd)).log_prob(batch["image"])   # [N]
    np.testing.assert_allclose(log_lik[0, draw], expected.numpy(), rtol=1e-4)
    assert (log_lik != log_lik[:, :1]).any()                                   # each draw its own


def test_samples_are_draws_of_their_own_final_posterior(tree):
    z = tree["posterior"]["z"].values
    loc, scale = (tree["sample_stats"][k].values for k in ("loc", "scale"))
    assert (scale > 0).all()
    eps = (z - loc) / scale                                    # each z ~ N(loc, scale) of its own path
    assert abs(eps.mean()) < 0.25 and 0.75 < eps.std() < 1.25
    assert z.std(1).min() > 0                                  # samples vary across the draw dim
    assert loc.std(1).max() > 0                                # and so do the refinement paths


def test_same_seed_same_samples_other_seed_others(runs, batch):
    system = Run.open(runs["iterative"]).system
    x = batch["image"][:2]
    state = torch.get_rng_state()
    a = sample_posterior(system, x, 3, seed=1)["posterior"]["z"].values
    assert torch.equal(torch.get_rng_state(), state)           # the caller's RNG is left alone
    b = sample_posterior(system, x, 3, seed=1)["posterior"]["z"].values
    c = sample_posterior(system, x, 3, seed=2)["posterior"]["z"].values
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_amortized_guide_has_one_posterior_per_image(runs, batch):
    system = Run.open(runs["amortized"]).system
    tree = sample_posterior(system, batch["image"][:3], 200)
    assert set(tree.children) == {"posterior", "log_likelihood", "sample_stats", "observed_data"}
    assert set(tree["posterior"].data_vars) == {"z"}                 # masks etc. only with predictive
    post, stats = tree["posterior"].ds, tree["sample_stats"].ds
    assert post.attrs["guide"] == "amortized" and post.attrs["site"] == "t0/z"
    np.testing.assert_allclose(stats["loc"].std("draw").values, 0, atol=1e-6)   # no refinement path
    se = stats["scale"].isel(chain=0, draw=0).values / np.sqrt(200)
    assert np.all(np.abs(post["z"].mean(("chain", "draw")).values - stats["loc"].isel(chain=0, draw=0).values) < 5 * se)


def test_another_number_of_slots_and_steps(runs, batch):
    system = Run.open(runs["iterative"]).system
    tree = sample_posterior(system, batch["image"][:2], 2, num_slots=6, num_iters=5, predictive=True)
    assert tree["posterior"].sizes["slot"] == 6 and tree["sample_stats"].sizes["slot"] == 6
    assert tree["posterior"]["masks"].sizes["slot"] == 6
    assert tree.attrs["site"] == "t4/z" and tree.attrs["num_iters"] == 5
    amortized = Run.open(runs["amortized"]).system
    with pytest.raises(ValueError, match="K=4"):
        sample_posterior(amortized, batch["image"][:2], 2, num_slots=6)
    with pytest.raises(ValueError, match="at least 1"):
        sample_posterior(system, batch["image"][:2], 0)


def test_predictive_replay_in_chunks_gives_the_same_masks(runs, batch, monkeypatch):
    import iodine_pyro.posterior as posterior

    system = Run.open(runs["iterative"]).system
    torch.manual_seed(0)
    whole = posterior.draw_samples(system, batch["image"][:2], 3, predictive=True)
    monkeypatch.setattr(posterior, "TRACE_BUDGET", 1)              # one sample per Predictive call
    torch.manual_seed(0)
    chunked = posterior.draw_samples(system, batch["image"][:2], 3, predictive=True)
    assert torch.equal(whole["z"], chunked["z"])
    assert whole["x"].shape == (3, 2, 3, 35, 35) and chunked["x"].shape == whole["x"].shape
    assert whole["log_likelihood"].shape == (3, 2) and whole["log_likelihood"].dtype == torch.float64
    torch.testing.assert_close(whole["log_weight"], chunked["log_weight"])
    torch.testing.assert_close(whole["masks"], chunked["masks"])
    torch.testing.assert_close(whole["reconstruction"], chunked["reconstruction"])


def test_deepmind_preset_samples_its_last_pass():
    """The `deepmind` preset scores T + 1 decoder passes: the posterior is site t{T}/z."""
    from iodine_pyro.system import Iodine
    from tests.helpers import tiny_config

    system = Iodine(tiny_config("deepmind")).eval()
    tree = sample_posterior(system, torch.rand(2, 3, 12, 12), 2, predictive=True)
    assert tree.attrs["site"] == "t3/z" and tree.attrs["num_iters"] == 3
    assert tree["posterior"]["z"].shape == (1, 2, 2, 3, 4)
    assert tree["posterior_predictive"]["x"].shape == (1, 2, 2, 3, 12, 12)
    assert tree["log_likelihood"]["x"].shape == (1, 2, 2)


def test_netcdf_round_trip_and_arviz(tree, tmp_path):
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    path = write_samples(tree, tmp_path / "sub" / "post.nc")
    back = xr.open_datatree(path)
    assert set(back.children) == GROUPS
    np.testing.assert_array_equal(back["posterior"]["z"].values, tree["posterior"]["z"].values)
    assert back["posterior"].attrs["site"] == "t2/z" and back.attrs["guide"] == "iterative"
    # ArviZ reads the file as it is: statistics and plots, no project code in between
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_netcdf(path)
        assert set(idata.groups()) == GROUPS
        assert idata.posterior["z"].dims == ("chain", "draw", "image", "slot", "latent")
        stats = az.summary(idata, var_names=["z"], kind="stats")
        assert len(stats) == 5 * 4 * 4 and np.isfinite(stats["mean"]).all()
        one = {"image": 10, "slot": 0, "latent": [0, 1]}
        axes = az.plot_posterior(idata, var_names=["z"], coords=one)
        assert np.asarray(axes).size == 2
        axes = az.plot_trace(idata, var_names=["z"], coords=one)
        assert np.asarray(axes).shape == (1, 2)                 # z: its density and its trace
        small = az.from_netcdf(path).isel(image=[0], channel=[0], height=slice(0, 8), width=slice(0, 8))
        assert az.plot_ppc(small, var_names=["x"], num_pp_samples=5) is not None
        loo = az.loo(az.from_netcdf(path), pointwise=True)
        assert np.isfinite(loo.elpd_loo) and loo.n_data_points == 5 and loo.pareto_k.dims == ("image",)
        assert np.isfinite(az.waic(idata).elpd_waic)
        log_weight = idata.sample_stats["log_weight"].stack(__sample__=("chain", "draw"))
        _, khat = az.psislw(log_weight)                         # how far q is from the posterior
        assert khat.dims == ("image",) and not np.isnan(khat.values).any()   # inf: too few draws, or q far off
    import matplotlib.pyplot as plt
    plt.close("all")


def test_multistability_figure(runs, batch, tmp_path):
    system = Run.open(runs["iterative"]).system
    path = plot_multistability(system, batch["image"][0], tmp_path / "ms.png", 3)
    import matplotlib.image as mpimg

    picture = mpimg.imread(path)
    assert picture.shape[0] > 100 and picture.std() > 0.05


@pytest.mark.slow
def test_sample_command(runs, tmp_path):
    out = tmp_path / "post.nc"
    proc = subprocess.run([sys.executable, "-m", "iodine_pyro", "sample", str(runs["iterative"]),
                           "--num-images", "3", "--num-samples", "4", "--predictive", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    back = xr.open_datatree(out)
    assert back["posterior"]["z"].shape == (1, 4, 3, 4, 4)
    assert back["posterior_predictive"]["x"].shape == (1, 4, 3, 3, 35, 35)
    assert back["log_likelihood"]["x"].shape == (1, 4, 3)
    assert back["constant_data"]["true_masks"].shape == (3, 4, 35, 35)
    assert "true_masks" not in back["observed_data"].data_vars
    attrs = back["posterior"].attrs
    assert attrs["checkpoint"] == str(runs["iterative"].resolve()) and attrs["step"] == 3
    assert attrs["data"].endswith("data/test") and attrs["seed"] == 0   # the held-out set fit made


def test_multistability_command(runs, tmp_path):
    out = tmp_path / "fig.png"
    code, stdout, err = run_main("sample", runs["iterative"], "--multistability",
                                      "--image", 2, "--num-samples", 3, "--out", out)
    assert code == 0, err
    assert out.stat().st_size > 5000 and str(out) in stdout


@pytest.mark.parametrize("args, needle", [
    (["--num-samples", 0], "'--num-samples': Input should be greater than or equal to 1"),
    (["--num-images", 0], "'--num-images': Input should be greater than or equal to 1"),
    (["--multistability", "--image", 10_000], "outside"),
    (["--multistability", "--out", "fig.nc"], "picture"),
])
def test_sample_bad_arguments(runs, args, needle):
    code, _, err = run_main("sample", runs["iterative"], *args)
    assert code == status_of(err) and needle in err and len(err.strip().splitlines()) == 1, err


def test_sample_errors_name_the_problem(runs, tmp_path):
    code, _, err = run_main("sample", tmp_path / "nope")
    assert code == FAILURE and "no checkpoint" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main("sample", runs["amortized"], "--num-slots", 6,
                                 "--num-samples", 2, "--out", tmp_path / "p.nc")
    assert code == FAILURE and "K=4" in err and len(err.strip().splitlines()) == 1
