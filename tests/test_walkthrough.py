"""docs/walkthrough.md runs as it is: its Python blocks, in order, in one namespace."""

import re
from pathlib import Path

import pytest

WALKTHROUGH = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", WALKTHROUGH.read_text(), flags=re.S)


def test_the_walkthrough_runs(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IODINE_PYRO_CACHE", str(tmp_path / "cache"))
    code = blocks()
    assert len(code) >= 5
    namespace: dict = {}
    for i, block in enumerate(code):
        try:
            exec(compile(block, f"{WALKTHROUGH.name} block {i + 1}", "exec"), namespace)
        except Exception as e:                      # name the block that broke
            pytest.fail(f"block {i + 1} of {WALKTHROUGH.name} failed: {type(e).__name__}: {e}")
    assert (tmp_path / "walkthrough" / "decomposition.png").stat().st_size > 0
    assert (tmp_path / "walkthrough" / "posterior.nc").stat().st_size > 0
    assert set(namespace["report"]["runs"]) == {"pretrained-tetrominoes", "amortized"}
