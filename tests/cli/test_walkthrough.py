"""docs/walkthrough.md runs as it is: its Python blocks, in order, in one namespace, and
pasted into a file run with ``python`` (no ``if __name__ == "__main__":`` guard)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

WALKTHROUGH = Path(__file__).resolve().parents[2] / "docs" / "walkthrough.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", WALKTHROUGH.read_text(), flags=re.S)


@pytest.mark.slow
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


@pytest.mark.timeout(1800)          # the page's two minutes, plus generating the data in one process
@pytest.mark.slow
def test_the_walkthrough_runs_as_a_plain_script(tmp_path):
    """As a user writes it: the blocks in one file, run with python, without a main guard.
    Worker processes import the main script again; data generation must not break on it."""
    script = tmp_path / "walkthrough.py"
    script.write_text("\n".join(blocks()))
    env = {**os.environ, "IODINE_PYRO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "pretrained-tetrominoes: ELBO" in proc.stdout and "amortized: ELBO" in proc.stdout, proc.stdout
    assert (tmp_path / "walkthrough" / "decomposition.png").stat().st_size > 0
    assert (tmp_path / "walkthrough" / "posterior.nc").stat().st_size > 0
