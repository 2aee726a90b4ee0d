"""Every `iodine-pyro` command shown in the README and docs names a real command and real options."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from iodine_pyro.cli import app

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) for each `iodine-pyro ...` line of a bash block."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                for part in re.split(r"&&|;", line.split("#")[0]):
                    part = part.strip()
                    if part.startswith("iodine-pyro "):
                        found.append((page.name, part))
    return found


ROOT_COMMAND = typer.main.get_command(app)


def leaf(words: list[str]):
    """The command the words name, and the words after its name."""
    cmd = ROOT_COMMAND
    while hasattr(cmd, "commands") and words and words[0] in cmd.commands:
        cmd, words = cmd.commands[words[0]], words[1:]
    return cmd, words


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_a_shown_command_exists_with_its_options(page, line):
    words = shlex.split(line)[1:]
    cmd, rest = leaf(words)
    assert not hasattr(cmd, "commands"), f"{page}: {line!r} names no command"
    names = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    for word in rest:
        if word.startswith("--"):
            assert word.split("=")[0] in names, f"{page}: {line!r}: {word} is not an option of {cmd.name}"


@pytest.mark.slow
def test_the_readmes_python_runs_as_written(one_thread):
    """The README's first two Python blocks (the system, then the Pyro program: parallel
    Predictive, vectorised particles, SVI) run as a user pastes them."""
    import torch

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile("\n".join(blocks[:2]), "README.md", "exec"), scope)
    assert scope["draws"]["t4/z"].shape == (10, 8, 4, 32)
