"""Sequential IODINE (appendix A.1), tracking metrics, and recomputation (appendix A.2)."""

import gc
import json
import weakref

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from typer.testing import CliRunner

from iodine_pyro.cli import app
from iodine_pyro.models.generative import frame_weights
from iodine_pyro.data import Batches, DatasetError, generate, load_images, open_dataset
from iodine_pyro.data.dsprites import make_sequence_chunk, sprite_mask
from iodine_pyro.system import Iodine
from iodine_pyro.metrics import slot_stability

from ..helpers import TINY_TOML, tiny_config
from .test_model import hand_kl, hand_log_px

SEQUENCE_TOML = TINY_TOML + "lstm = 8\n"


def seq_config(preset="paper", **overrides):
    return tiny_config(preset, **{"guide.lstm": 8, **overrides})


def decoder_calls(system):
    calls = []
    system.model.decoder.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def test_moving_sprites_move_at_a_constant_velocity():
    d = make_sequence_chunk(np.random.default_rng(0), 6, frames=5)
    n, F, E = 6, 5, 6
    assert d["image"].shape == (n, F, 64, 64, 3) and d["mask"].shape == (n, F, E, 64, 64)
    assert (d["mask"].sum(2) == 1).all()                                  # one group per pixel
    moved = 0
    for i in range(n):
        for g in range(1, E):
            if not d["visibility"][i, g]:
                assert not d["mask"][i, :, g].any()
                continue
            vx, vy = d["velocity_x"][i, g], d["velocity_y"][i, g]
            moved += abs(vx) + abs(vy) > 0.01
            for f in range(F):
                drawn = sprite_mask(int(d["shape"][i, g]), d["scale"][i, g], d["orientation"][i, g],
                                    d["x"][i, g] + f * vx, d["y"][i, g] + f * vy)   # [64, 64]
                visible = d["mask"][i, f, g].astype(bool)
                assert not (visible & ~drawn).any()                       # only where the sprite is
                assert np.all(d["image"][i, f][visible] == np.round(255 * d["color"][i, g]))
                assert d["frame_visibility"][i, g, f] == visible.any()
    assert moved > 5


def test_sequences_are_stored_and_batched_with_a_frame_axis(tmp_path):
    out = generate("multi_dsprites_sequences", 6, tmp_path / "seq", seed=1, workers=1, progress=False,
                   chunk_size=4)
    ds = open_dataset(out)
    assert ds["image"].dims == ("image", "frame", "height", "width", "channel")
    assert ds.sizes["frame"] == 16 and ds["frame_visibility"].dims == ("image", "group", "frame")
    batch = next(iter(Batches(ds, 3, seed=0)))
    assert batch["image"].shape == (3, 16, 3, 64, 64) and batch["mask"].shape == (3, 16, 6, 64, 64)
    first = load_images(ds, 0, 2)
    np.testing.assert_array_equal(first["image"][1, 7].permute(1, 2, 0).numpy() * 255,
                                  ds["image"][1, 7].values)


# ---------------------------------------------------------------------------------------
# The sequence objective
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["paper", "deepmind"])
def test_sequence_loss_scores_each_frame_and_predicts_the_next(preset, one_thread):
    """float64: loss = sum_t w_t [-log p(x_t|z_t) - log p(x_{t+1}|z_t) + KL(q_t||p)], sites per frame."""
    cfg = seq_config(preset)
    torch.manual_seed(0)
    system = Iodine(cfg).double()
    x = torch.rand(2, 5, 3, *cfg.model.image_size, dtype=torch.float64)      # 5 frames, 3 used
    weights = system.weights(sequence=True)
    assert weights == pytest.approx(frame_weights(cfg.guide.loss_weights, 3))
    assert len(weights) == 3

    pyro.set_rng_seed(1)
    trace = poutine.trace(system.model).get_trace(x[:, :3], weights)
    sites = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n not in ("images", "slots")]
    assert sites == ["t0/z", "t0/x", "t0/x_next", "t1/z", "t1/x", "t1/x_next", "t2/z", "t2/x"]

    pyro.set_rng_seed(1)
    loss = system.loss(x)
    pyro.set_rng_seed(1)
    steps = system.guide(x[:, :3], weights)
    total = torch.zeros((), dtype=torch.float64)
    for t, (w, step) in enumerate(zip(weights, steps)):
        B, K, n_z = step.z.shape
        flat = step.z.reshape(B * K, n_z)
        if cfg.model.decoder_constant is not None:
            flat = torch.cat([flat, torch.full((B * K, 1), cfg.model.decoder_constant, dtype=flat.dtype)], 1)
        out = system.model.decoder(flat).view(B, K, 4, *cfg.model.image_size)
        nll = -hand_log_px(x[:, t], out[:, :, 1:], out[:, :, 0], cfg.model.pixel, cfg.model.pixel_scale)
        if t < 2:
            nll = nll - hand_log_px(x[:, t + 1], out[:, :, 1:], out[:, :, 0], cfg.model.pixel,
                                    cfg.model.pixel_scale)
        kl = hand_kl(step.lam, n_z, cfg.guide.posterior_scale, cfg.model.prior_var)
        total = total + w * (nll.mean() + kl.mean())
    assert torch.allclose(loss, total, rtol=1e-10, atol=1e-8), (float(loss), float(total))


def test_step_t_reads_frame_t_and_the_lstm_state_carries_over(one_thread):
    cfg = seq_config()
    torch.manual_seed(0)
    system = Iodine(cfg).double()
    states = []
    original = system.guide.net.forward
    system.guide.net.forward = lambda s, v, state: (states.append(state), original(s, v, state))[1]
    x = torch.rand(2, 3, 3, *cfg.model.image_size, dtype=torch.float64)

    def lams(frames):
        torch.manual_seed(3)
        return [s.lam for s in system.infer(frames)]

    base = lams(x)
    assert states[0] is None and all(s is not None for s in states[1:])    # state from frame to frame
    for k in range(3):
        y = x.clone()
        y[:, k] = torch.rand_like(y[:, k])
        changed = [not torch.equal(a, b) for a, b in zip(base, lams(y))]
        assert changed == [t > k for t in range(3)], k                    # frame k enters at step k+1


def test_sequences_need_enough_frames_and_the_iterative_guide():
    system = Iodine(seq_config())
    with pytest.raises(ValueError, match="3 frames needed"):
        system.loss(torch.rand(2, 2, 3, 12, 12))
    with pytest.raises(ValueError, match="iterative guide"):
        Iodine(seq_config(**{"guide.kind": "amortized"})).loss(torch.rand(2, 3, 3, 12, 12))


# ---------------------------------------------------------------------------------------
# Recomputation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["paper", "deepmind"])
@pytest.mark.parametrize("frames", [0, 4])
def test_recompute_gives_the_same_loss_and_gradients(preset, frames, one_thread):
    """float64, with an LSTM: recomputation changes neither the loss nor any gradient; the
    forward pass decodes each sample once, the backward pass once more."""
    shape = (3, frames) if frames else (3,)
    x = torch.rand(*shape, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        system = Iodine(seq_config(preset, **{"guide.recompute": recompute})).double()
        calls = decoder_calls(system)
        pyro.set_rng_seed(1)
        loss = system.loss(x)
        forward = len(calls)
        params = list(system.parameters())
        grads = torch.autograd.grad(loss, params)
        results[recompute] = (loss.detach(), grads, forward, len(calls))
    (l0, g0, f0, c0), (l1, g1, f1, c1) = results[False], results[True]
    passes = len(Iodine(seq_config(preset)).weights(sequence=bool(frames)))
    assert (f0, c0) == (passes, passes)
    assert (f1, c1) == (passes, 2 * passes)                               # the backward's pass is the exception
    assert torch.allclose(l0, l1, rtol=1e-13, atol=0)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(a.abs().max()) + 1e-12)


def live_saved_bytes(system, x, **kwargs):
    """Bytes of the tensors autograd keeps for the backward pass once the forward is done
    (parameters and the input excluded); 0 under no_grad."""
    refs = []

    def pack(t):                                  # an alias without grad_fn: no reference cycle
        alias = t.detach()
        refs.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = system.loss(x) if torch.is_grad_enabled() else system.infer(x, **kwargs)
    gc.collect()
    skip = {p.untyped_storage().data_ptr() for p in system.parameters()} | {x.untyped_storage().data_ptr()}
    alive = {}
    for r in refs:
        t = r()
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    return sum(alive.values())


@pytest.mark.parametrize("frames", [False, True])
@pytest.mark.slow
def test_recompute_keeps_training_memory_flat_in_T(frames, one_thread):
    """What the backward pass keeps per extra step, with and without recomputation."""
    growth = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        sizes = []
        for T in (2, 6):
            system = Iodine(seq_config(**{"guide.recompute": recompute, "guide.num_iters": T}))
            x = torch.rand(4, T, 3, 12, 12) if frames else torch.rand(4, 3, 12, 12)
            sizes.append(live_saved_bytes(system, x))
        growth[recompute] = (sizes[1] - sizes[0]) / 4                    # bytes per extra step
    assert 0 < growth[True] < 0.15 * growth[False], growth


def test_inference_keeps_no_activations(one_thread):
    system = Iodine(seq_config(**{"guide.num_iters": 6}))
    with torch.no_grad():
        assert live_saved_bytes(system, torch.rand(2, 6, 3, 12, 12)) == 0
        assert live_saved_bytes(system, torch.rand(2, 3, 12, 12), num_iters=6) == 0
        steps = system.infer(torch.rand(2, 6, 3, 12, 12))
    assert all(not t.requires_grad for s in steps for t in s)


# ---------------------------------------------------------------------------------------
# Tracking metrics
# ---------------------------------------------------------------------------------------


def test_slot_stability():
    B, F, G, K, H, W = 2, 4, 3, 3, 2, 4
    true = torch.zeros(B, F, G, H, W)
    true[:, :, 0, 0] = 1                                                  # background: top row
    true[:, :, 1, 1, :2] = 1                                              # object 1
    true[:, :, 2, 1, 2:] = 1                                              # object 2
    true[1, 1:, 2] = 0                                                    # seq 1: object 2 only in frame 0
    true[1, 1:, 0, 1, 2:] = 1
    pred = torch.zeros(B, F, K, H, W)
    pred[:, :, 0, 0] = 1
    pred[:, :, 1, 1, :2] = 1
    pred[:, :, 2, 1, 2:] = 1
    pred[1, 3, 1, 1, :2], pred[1, 3, 0, 1, :2] = 0, 1                     # seq 1: object 1 switches at f=3
    s = slot_stability(true, pred)
    assert s.tolist() == [1.0, 0.75]
    assert torch.isnan(slot_stability(true, pred, background=3)).all()   # no objects left


# ---------------------------------------------------------------------------------------
# Command line: fit, evaluate, plot sequence
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    (root / "tiny.toml").write_text(SEQUENCE_TOML)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    res = CliRunner().invoke(app, ["fit", "--dataset", "multi_dsprites_sequences", "--num-images", "8",
                                   "--batch-size", "2", "--steps", "2", "--log-every", "1", "--seed", "0",
                                   "--config", str(root / "tiny.toml"), "--out", str(root / "run"), "--quiet"])
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output
    return root / "run"


@pytest.mark.slow
def test_fit_trains_a_sequence_run_with_recomputation(sequence_run):
    ckpt = torch.load(sequence_run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["guide"]["recompute"] is True                   # the sequence datasets' default
    rows = [json.loads(line) for line in (sequence_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_evaluate_reports_per_frame_ari_and_slot_stability(sequence_run, one_thread):
    res = CliRunner().invoke(app, ["evaluate", str(sequence_run), "--num-images", "4", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["sequence"] is True and r["num_iters"] == 3
    assert len(r["fg_ari"]) == len(r["ari"]) == len(r["mse"]) == 3 and len(r["pred_nll"]) == 2
    assert 0.0 < r["slot_stability"] <= 1.0
    text = CliRunner().invoke(app, ["evaluate", str(sequence_run), "--num-images", "4"])
    assert text.exit_code == 0 and "slot stability" in text.output and "next NLL" in text.output


def test_plot_sequence(sequence_run, tmp_path, one_thread):
    res = CliRunner().invoke(app, ["plot", "sequence", str(sequence_run), "--out", str(tmp_path / "seq.png"),
                                   "--image", "1"])
    assert res.exit_code == 0, res.output
    a = np.load(tmp_path / "seq.npz")
    assert a["image"].shape == a["recon"].shape == (3, 3, 64, 64)
    assert a["masks"].shape == (3, 6, 64, 64) and a["true_masks"].shape == (3, 6, 64, 64)
    np.testing.assert_allclose(a["masks"].sum(1), 1.0, atol=1e-5)
    assert (tmp_path / "seq.png").stat().st_size > 0


def test_decomposition_of_a_sequence_run_shows_the_final_frame(sequence_run, tmp_path):
    res = CliRunner().invoke(app, ["plot", "decomposition", str(sequence_run), "--out", str(tmp_path / "d.png"),
                                   "--num-images", "2"])
    assert res.exit_code == 0, res.output
    a = np.load(tmp_path / "d.npz")
    assert a["image"].shape == (2, 3, 64, 64) and a["step"].tolist() == [3]
    res = CliRunner().invoke(app, ["plot", "decomposition", str(sequence_run), "--out", str(tmp_path / "e.png"),
                                   "--all-steps"])
    assert isinstance(res.exception, ValueError) and "plot sequence" in str(res.exception)


@pytest.mark.parametrize("command, options", [
    (["plot", "mask-logits"], ["--out", "out.png"]),
    (["plot", "traversal"], ["--out", "out.png"]), (["plot", "projection"], ["--out", "out.png"]),
    (["sample"], ["--num-images", "2", "--num-samples", "2", "--out", "post.nc"]),
    (["compare"], ["--num-images", "2"]),
])
def test_single_image_commands_refuse_a_sequence_run(sequence_run, tmp_path, command, options):
    options = [str(tmp_path / o) if o.endswith((".png", ".nc")) else o for o in options]
    res = CliRunner().invoke(app, [*command, str(sequence_run), *options])
    assert isinstance(res.exception, DatasetError), res.output            # main(): one line, exit 2
    assert "holds sequences" in str(res.exception) and "\n" not in str(res.exception)
    assert not list(tmp_path.iterdir())                                   # nothing written


@pytest.mark.slow
def test_fit_objects_room_sequences_from_the_command_line(tmp_path, one_thread):
    (tmp_path / "tiny.toml").write_text(SEQUENCE_TOML)
    res = CliRunner().invoke(app, ["fit", "--dataset", "objects_room_sequences", "--num-images", "2",
                                   "--batch-size", "2", "--steps", "1", "--num-iters", "2", "--no-recompute",
                                   "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "run"),
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["guide"]["recompute"] is False and ckpt["config"]["guide"]["num_iters"] == 2
    assert open_dataset(tmp_path / "run" / "data" / "train").sizes["frame"] == 16
