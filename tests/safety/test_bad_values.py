"""Every value a user can give is checked before any work starts: generated bad values on
the command line, in TOML files, inside checkpoints and in stores, fed to fit, evaluate and
the data commands. Each must end with exit status 2, one line on stderr that names the
option or field, no traceback, and no file changed."""

import math
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iodine_pyro.checkpoint import load_checkpoint
from iodine_pyro.training import fit

from ..helpers import TINY_OVERRIDES, TINY_TOML, USAGE, run_main, status_of

SETTINGS = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- bad values, by kind -------------------------------------------------------------------

INT_1 = [0, -1, True, 1.5, '"4"', [4], 2**40]                # fields and options that count from 1
BAD_FIELDS = {                                            # TOML literal -> why it is bad, per field
    "model.num_slots": INT_1, "model.latent_dim": INT_1, "model.image_channels": INT_1 + [65],
    "model.image_size": [[35], [35, 0], [35, 35, 35], '"35"', [35.5, 35]],
    "model.pixel": ['"nope"', 1, True], "model.pixel_scale": [0, -0.1, '"x"', True, "inf", "nan", 1e39],
    "model.prior_var": [0, -1, "nan"], "model.decoder": ['"nope"', 0],
    "model.decoder_channels": [[0], '"8"', [1.5], 3, [-1]], "model.decoder_kernel": [0, 2, -3, True, 3.0],
    "model.decoder_constant": ['"x"', True, "inf"], "model.deconv_mlp": [[0], '"x"'],
    "model.deconv_start": [[8, 8], [8, 0, 8]],
    "guide.kind": ['"nope"', 1], "guide.num_iters": INT_1, "guide.loss_weights": ['"nope"'],
    "guide.posterior_scale": ['"nope"'], "guide.mask_posterior": [2], "guide.conv_channels": [[], [0], '"8"', 3],
    "guide.conv_kernel": [0, -1, True], "guide.conv_stride": [0, -2, 1.5], "guide.mlp": [[0], '"16"'],
    "guide.mlp_linear_last": [1, '"yes"'], "guide.lstm": [0, -1, '"x"', 1.5],
    "guide.inputs": ['"image"', [1], ['"nope"']], "guide.stop_gradient": [['"nope"'], '"x"'],
    "guide.disabled_inputs": [['"nope"'], '"image"'], "guide.grad_reduction": ['"nope"'], "guide.recompute": [1],
    "train.lr": [0, -1e-3, "inf", "nan", '"x"', 1e39], "train.beta1": [1.0, -0.1, "nan"], "train.beta2": [1, 2.0],
    "train.batch_size": INT_1, "train.clip_norm": [0, "-inf"], "train.lr_decay": [0, 1.5, "nan"],
    "train.lr_decay_steps": [0, -5, 2.5], "train.max_bad_steps": [0, True], "train.warmup_steps": [-1, True, 0.5],
    "train.init": ['"nope"'], "train.geco_goal": [0, -1, '"x"'], "train.geco_rate": [0, "inf"],
    "train.geco_ema": [1, -0.5],
}
TOO_BIG = {"model.num_slots": 100_000, "guide.num_iters": 1_000_000, "train.batch_size": 10**9}   # memory


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return str(value)


def toml_with(key: str, value) -> str:
    """TINY_TOML with `key` set to `value` (added to, or replacing, its table's entry)."""
    section, name = key.split(".")
    lines = [line for line in TINY_TOML.splitlines() if not line.startswith(f"{name} =")]
    at = lines.index(f"[{section}]") + 1
    return "\n".join(lines[:at] + [f"{name} = {toml_literal(value)}"] + lines[at:]) + "\n"


FIT_OPTIONS = {  # option -> bad values (as typed)
    "--steps": ["0", "-1", "x", "1.5", ""], "--batch-size": ["0", "-4", "two"], "--num-slots": ["0", "-1", "1e3"],
    "--num-iters": ["0", "x"], "--lr": ["0", "-1e-3", "inf", "nan", "x"], "--seed": ["-1", str(2**40), "s"],
    "--log-every": ["0"], "--checkpoint-every": ["0", "-3"], "--num-images": ["0", "-1"],
    "--max-bad-steps": ["0"], "--time-limit": ["0", "-5m", "abc", "inf", "1e400s"],
    "--device": ["cudaa", "tpu", "cuda:99", "", "cpu:x"] + ([] if torch.cuda.is_available() else ["cuda"]),
    "--guide": ["nope"], "--dataset": ["nope"], "--preset": ["nope"], "--decoder": ["nope"], "--nproc": ["0"],
    "--ablate": ["nope"],
}
EVAL_OPTIONS = {"--num-images": ["0", "-1", "x"], "--batch-size": ["0"], "--num-iters": ["0"], "--num-slots": ["0"],
                "--seed": ["-1", str(2**40)], "--device": ["cudaa", "tpu"]}
GEN_OPTIONS = {"NAME": ["nope", ""], "--num-images": ["0", "-5", "x"], "--workers": ["0", "-1"],
               "--seed": ["-1", str(2**40)]}
CKPT_DAMAGE = ["step=-1", "step=1.5", "step=True", "drop=config", "drop=system", "drop=step", "drop=optimizer",
               "drop=rng", "drop=data_state", "drop=data", "data_state=-1", "system=x", "format_version=2",
               "extra=x", "config=x", "config.dataset=nope", "config.train.extra_field=1", "rng=x", "seed=-1"]
RESUME_ONLY = {"drop=optimizer", "drop=rng", "drop=data_state", "drop=data", "data_state=-1", "rng=x", "seed=-1"}
STORE_DAMAGE = ["num_images=x", "background_groups=-1", "background_groups=9", "format_version=2", "seed=x",
                "dataset=5", "missing_chunk", "corrupt_chunk", "mask_values", "no_format"]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained tiny run (its own data inside) and a small store, made once."""
    root = tmp_path_factory.mktemp("bad-values")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fit(out=root / "run", steps=1, num_images=8, overrides=TINY_OVERRIDES, progress=False, log_every=1)
    torch.set_num_threads(threads)
    shutil.copytree(root / "run" / "data" / "train", root / "store")
    return root


def tree_state(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(Path(root).rglob("*")) if not p.is_symlink()}


def assert_refused(scratch: Path, args: list, *needles: str) -> None:
    """The command ends with status 2 and one line naming what was bad; nothing under the
    scratch folder (its inputs and the run) changed."""
    before = tree_state(scratch)
    code, _, err = run_main(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and code == status_of(lines[0]), (args, err)
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (args, lines[0])
    assert tree_state(scratch) == before, args


def damaged_checkpoint(src: Path, dst: Path, damage: str) -> None:
    ckpt = torch.load(src, weights_only=True)
    what, _, value = damage.partition("=")
    if what == "drop":
        del ckpt[value]
    elif what.startswith("config."):
        keys = what.split(".")[1:]
        target = ckpt["config"]
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    elif what == "data_state":
        ckpt["data_state"]["position"] = int(value)
    elif what == "seed":
        ckpt["extra"]["seed"] = int(value)
    else:
        ckpt[what] = {"-1": -1, "1.5": 1.5, "True": True, "2": 2}.get(value, value)
    torch.save(ckpt, dst)


def damaged_store(src: Path, dst: Path, damage: str) -> None:
    shutil.copytree(src, dst)
    what, _, value = damage.partition("=")
    if what == "missing_chunk":
        next((dst / "image").glob("c*")).unlink()
    elif what == "corrupt_chunk":
        chunk = next((dst / "mask").glob("c*"))
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        chunk.write_bytes(bytes(raw))
    elif what == "mask_values":
        g = zarr.open_group(dst, mode="r+")
        m = g["mask"][:]
        m[0, 0, 0, 0] = 7
        g["mask"][:] = m
    elif what == "no_format":
        del zarr.open_group(dst, mode="r+").attrs["format"]
    else:
        zarr.open_group(dst, mode="r+").attrs[what] = int(value) if value.lstrip("-").isdigit() else value


# -- the property ----------------------------------------------------------------------------

case = st.one_of(
    st.tuples(st.just("toml"), st.sampled_from(sorted(BAD_FIELDS)), st.integers(0, 10)),
    st.tuples(st.just("too_big"), st.sampled_from(sorted(TOO_BIG)), st.just(0)),
    st.tuples(st.just("fit_option"), st.sampled_from(sorted(FIT_OPTIONS)), st.integers(0, 10)),
    st.tuples(st.just("eval_option"), st.sampled_from(sorted(EVAL_OPTIONS)), st.integers(0, 10)),
    st.tuples(st.just("checkpoint"), st.sampled_from(CKPT_DAMAGE), st.sampled_from(["evaluate", "fit"])),
    st.tuples(st.just("generate"), st.sampled_from(sorted(GEN_OPTIONS)), st.integers(0, 10)),
    st.tuples(st.just("store"), st.sampled_from(STORE_DAMAGE), st.sampled_from(["info", "show", "fit"])),
)


@SETTINGS
@given(case=case)
@pytest.mark.slow
def test_bad_values_stop_with_one_line_and_change_nothing(base, tmp_path_factory, case):
    kind, what, pick = case
    scratch = tmp_path_factory.mktemp("case")
    run = scratch / "run"
    if kind in ("toml", "too_big"):
        values = BAD_FIELDS[what] if kind == "toml" else [TOO_BIG[what]]
        (scratch / "bad.toml").write_text(toml_with(what, values[pick % len(values)]))
        needle = what if kind == "toml" else "would need at least"
        assert_refused(scratch, ["fit", "--config", scratch / "bad.toml", "--out", run, "--num-images", 8,
                                 "--steps", 1, "--quiet"], needle)
    elif kind == "fit_option":
        values = FIT_OPTIONS[what]
        (scratch / "tiny.toml").write_text(TINY_TOML)
        assert_refused(scratch, ["fit", "--config", scratch / "tiny.toml", "--out", run, "--num-images", 8,
                                 "--steps", 1, "--quiet", what, values[pick % len(values)]])
    elif kind == "eval_option":
        values = EVAL_OPTIONS[what]
        shutil.copytree(base / "run", run, ignore=shutil.ignore_patterns("data"))
        assert_refused(scratch, ["evaluate", run, "--data", base / "store", what, values[pick % len(values)]],
                       what)
    elif kind == "checkpoint":
        run.mkdir()
        damaged_checkpoint(base / "run" / "checkpoint.pt", run / "checkpoint.pt", what)
        args = (["evaluate", run, "--data", base / "store", "--num-images", 4]
                if pick == "evaluate" and what not in RESUME_ONLY else
                ["fit", "--resume", "--out", run, "--data", base / "store", "--steps", 2, "--quiet"])
        assert_refused(scratch, args, str(run / "checkpoint.pt"))
    elif kind == "generate":
        values = GEN_OPTIONS[what]
        value = values[pick % len(values)]
        name = value if what == "NAME" else "tetrominoes"
        options = [] if what == "NAME" else [what, value]
        assert_refused(scratch, ["data", "generate", name, "--num-images", 8, "--out", scratch / "store",
                                 *options], what)
    else:
        if pick == "fit" and what in ("corrupt_chunk", "mask_values"):
            pick = "info"       # found when read: fit stops with a checkpoint (test_nothing_lost)
        damaged_store(base / "store", scratch / "store", what)
        args = {"info": ["data", "info", scratch / "store"],
                "show": ["data", "show", scratch / "store", "--out", scratch / "grid.png"],
                "fit": ["fit", "--data", scratch / "store", "--out", run, "--steps", 1, "--batch-size", 4,
                        "--quiet"]}[pick]
        assert_refused(scratch, args, str(scratch / "store"))


def test_a_guide_chosen_in_toml_is_not_overridden(base, tmp_path):
    (tmp_path / "vae.toml").write_text(toml_with("guide.kind", '"amortized"'))
    code, _, err = run_main(*["fit", "--config", tmp_path / "vae.toml", "--data", base / "store", "--out",
                          tmp_path / "run", "--steps", 1, "--quiet"])
    assert code == 0, err
    assert load_checkpoint(tmp_path / "run")["config"].guide.kind == "amortized"


def test_usage_errors_are_one_line(base):
    for args in (["fit", "--no-such-option"], ["evaluate", "--json"], ["data", "generate", "tetrominoes"],
                 ["fit", "--steps"], ["plot", "nope", base / "run", "--out", "x.png"]):
        code, _, err = run_main(*args)
        assert code == USAGE and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)


def test_every_preset_passes_and_round_trips_through_a_checkpoint():
    from iodine_pyro.config import ARCHITECTURES, PRESETS, Config, make_config

    for dataset in ARCHITECTURES:
        for preset in PRESETS:
            cfg = make_config(dataset, preset)
            assert Config.from_dict(cfg.to_dict()) == cfg and math.isfinite(cfg.train.lr)
