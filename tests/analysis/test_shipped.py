"""The shipped models: every registered name loads, its evaluation file agrees with it, and
the background model does what it is shipped for on images it has never seen."""

import json

import pytest

from iodine_pyro.data import generate
from iodine_pyro.evaluate import evaluate
from iodine_pyro.run import PRETRAINED, PRETRAINED_DIR, Run


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_every_shipped_model_opens_at_the_step_its_evaluation_names(name):
    run = Run.open(f"pretrained:{name}")
    info = json.loads((PRETRAINED_DIR / f"{name}.json").read_text())
    assert (info["name"], info["step"], info["guide"]) == (name, run.step, run.cfg.guide.kind)
    assert run.cfg.dataset == info["dataset"] == "tetrominoes"


def test_every_evaluation_file_is_a_registered_model():
    assert {p.stem for p in PRETRAINED_DIR.glob("*.json")} == set(PRETRAINED)


def test_the_background_model_gives_the_background_to_one_slot_and_the_split_model_does_not(tmp_path):
    data = generate("tetrominoes", 32, tmp_path / "fresh", seed=77, workers=1, progress=False)
    bg = evaluate("pretrained:tetrominoes-bg", num_images=32, data=data, progress=False)
    split = evaluate("pretrained:tetrominoes", num_images=32, data=data, progress=False)
    # last refinement step; the split model shares the background over its 4 slots
    assert bg["bg_share"][-1] > 0.9 and bg["bg_slots"][-1] < 2 and bg["ari"][-1] > 0.7
    assert split["bg_share"][-1] < 0.6 and split["ari"][-1] < 0.3
    assert bg["fg_ari"][-1] > 0.7 and split["fg_ari"][-1] > 0.8
