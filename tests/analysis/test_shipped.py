"""The shipped models: every registered name loads, its evaluation file agrees with it, and
the background model does what it is shipped for on images it has never seen."""

import json

import pytest

from iodine_pyro.data import generate
from iodine_pyro.evaluate import evaluate
from iodine_pyro.checkpoint import CheckpointError
from iodine_pyro.config import held_out
from iodine_pyro.run import PRETRAINED_DIR, Run, pretrained_models


@pytest.mark.parametrize("name", sorted(pretrained_models()))
def test_every_shipped_model_opens_at_the_step_its_evaluation_names(name):
    run = Run.open(f"pretrained:{name}")
    info = json.loads((PRETRAINED_DIR / f"{name}.json").read_text())
    assert (info["name"], info["step"], info["guide"]) == (name, run.step, run.cfg.guide.kind)
    assert run.cfg.dataset == info["dataset"]
    # judged on the held-out set its training generated beside its 20,000 images of seed 0
    assert pretrained_models()[name].held_out == held_out(20_000, 0) == tuple(info["held_out"]["generated"])


def test_every_shipped_file_has_its_pair():
    """Shipping is writing NAME.pt and NAME.json: neither is there without the other."""
    weights, evaluations = ({p.stem for p in PRETRAINED_DIR.glob(f"*.{ext}")} for ext in ("pt", "json"))
    assert weights == evaluations == set(pretrained_models()) >= {"multi_dsprites", "tetrominoes", "tetrominoes-bg"}


def test_an_unknown_shipped_name_is_refused_with_the_names_there_are():
    with pytest.raises(CheckpointError, match="no shipped model 'nope'; shipped: pretrained:multi_dsprites, pretrained:tetrominoes"):
        Run.open("pretrained:nope")


def test_the_background_model_gives_the_background_to_one_slot_and_the_split_model_does_not(tmp_path):
    data = generate("tetrominoes", 32, tmp_path / "fresh", seed=77, workers=1, progress=False)
    bg = evaluate("pretrained:tetrominoes-bg", num_images=32, data=data, progress=False)
    split = evaluate("pretrained:tetrominoes", num_images=32, data=data, progress=False)
    # last refinement step; the split model shares the background over its 4 slots
    assert bg["bg_share"][-1] > 0.9 and bg["bg_slots"][-1] < 2 and bg["ari"][-1] > 0.7
    assert split["bg_share"][-1] < 0.6 and split["ari"][-1] < 0.3
    assert bg["fg_ari"][-1] > 0.7 and split["fg_ari"][-1] > 0.8


def test_the_multi_dsprites_model_separates_sprites_it_has_never_seen(tmp_path):
    data = generate("multi_dsprites", 16, tmp_path / "fresh", seed=77, workers=1, progress=False)
    result = evaluate("pretrained:multi_dsprites", num_images=16, data=data, progress=False)
    assert result["num_slots"] == 6                                    # the paper's K
    # refinement separates the sprites (FG-ARI about 0.2 at the first step, 0.69 on 512 images at the last)
    assert result["fg_ari"][-1] > 0.5 and result["fg_ari"][-1] > result["fg_ari"][0] + 0.2
