"""The package's layout: who imports whom, where names and files are handled, registries
that agree. Read from the source (ast), so a violation names its module and line."""

import ast
from pathlib import Path

import pytest

from iodine_pyro.config import ARCHITECTURES, PRESETS, make_config
from iodine_pyro.data import DATASETS
from iodine_pyro.data.convert import ALIASES, LAYOUTS
from iodine_pyro.guides import guide_kinds
from iodine_pyro.guides.inputs import INPUTS

PACKAGE = Path(__file__).resolve().parents[2] / "iodine_pyro"


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported package module or name, line) for the imports of module `name` at `path`:
    its top-level statements only, or at any depth (function-local imports too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    found = []
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in targets if t.startswith("iodine_pyro")]
    return found


def module_graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    mods = modules()
    return {name: {t for t, _ in imports_of(name, path, top_level_only) if t in mods and t != name}
            for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_command_line_has_no_import_cycle():
    graph = module_graph(top_level_only=False)
    line = ("iodine_pyro.cli", "iodine_pyro.commands")
    cli = {k: {t for t in v if t.startswith(line)} for k, v in graph.items() if k.startswith(line)}
    assert cycles(cli) == []


def test_the_package_has_no_import_cycle_at_module_level():
    # parents import their children's names (a package __init__ re-exports), which is not a cycle
    graph = module_graph(top_level_only=True)
    graph = {k: {t for t in v if not k.startswith(t + ".") and not t.startswith(k + ".")}
             for k, v in graph.items()}
    assert cycles(graph) == []


def test_only_training_imports_the_training_module():
    # ablate trains; the command line's error handler names the training error
    allowed = {"iodine_pyro.ablate", "iodine_pyro.commands.train", "iodine_pyro.cli"}
    offenders = [f"{name}:{line}" for name, path in modules().items()
                 if name not in allowed and not name.startswith("iodine_pyro.training")
                 for target, line in imports_of(name, path) if target == "iodine_pyro.training"
                 or target.startswith("iodine_pyro.training.")]
    assert offenders == []


def test_datasets_are_opened_only_in_the_data_package_the_run_and_the_data_commands():
    allowed = ("iodine_pyro.data", "iodine_pyro.run", "iodine_pyro.commands.data")
    offenders = [f"{name}:{i + 1}" for name, path in modules().items() if not name.startswith(allowed)
                 for i, line in enumerate(path.read_text().splitlines()) if "open_dataset(" in line]
    assert offenders == []


def test_guide_kinds_are_named_only_in_the_guides_package():
    kinds = [f'"{k}"' for k in guide_kinds()]
    offenders = [f"{name}:{i + 1}" for name, path in modules().items() if not name.startswith("iodine_pyro.guides")
                 for i, line in enumerate(path.read_text().splitlines()) if any(k in line for k in kinds)]
    assert offenders == []


def test_is_sequence_is_spelled_once():
    offenders = [f"{name}:{i + 1}" for name, path in modules().items() if name != "iodine_pyro.data.store"
                 for i, line in enumerate(path.read_text().splitlines())
                 if '"frame" in' in line and "dims" in line]
    assert offenders == []


def test_the_model_package_names_no_guide():
    for name, path in modules().items():
        if name.startswith("iodine_pyro.models"):
            text = path.read_text()
            assert "iterative" not in text and "amortized" not in text, name


def test_every_generated_dataset_has_an_architecture_and_they_agree():
    assert set(DATASETS) == set(ARCHITECTURES)
    for name, spec in DATASETS.items():
        cfg = make_config(name)
        H, W, C = spec.image_shape
        assert (cfg.model.image_channels, *cfg.model.image_size) == (C, H, W), name
        assert spec.name == name
        assert (cfg.guide.recompute and cfg.guide.num_iters == spec.frames) or not spec.sequence, name


def test_official_layouts_agree_with_the_datasets_they_convert_to():
    for name, layout in LAYOUTS.items():
        spec = DATASETS.get(ALIASES.get(name, name))
        if spec is None:
            continue
        assert layout.background_groups == spec.background_groups, name
        if not layout.crop_clevr:                       # CLEVR is cropped and resized to 128
            assert tuple(layout.image[-3:]) == spec.image_shape, name
        assert layout.num_groups >= spec.num_groups or name.startswith("clevr"), name


def test_presets_name_inputs_of_the_table():
    for preset in PRESETS:
        for dataset in ARCHITECTURES:
            cfg = make_config(dataset, preset)
            assert set(cfg.guide.inputs) <= set(INPUTS) and set(cfg.guide.stop_gradient) <= set(INPUTS)


@pytest.mark.parametrize("module", ["iodine_pyro.plotting", "iodine_pyro.cli_data", "iodine_pyro.cli_figures",
                                    "iodine_pyro.cli_posterior"])
def test_old_modules_are_gone(module):
    assert module not in modules()


def written_layout() -> list[list[str]]:
    """The layout block of docs/design.md, top to bottom: per line, the paths it names
    (``config.py``, ``models/``, ``guides/__init__.py``; continuation lines name none)."""
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    block = text.split("## The layout: who owns what", 1)[1].split("```", 2)[1]
    layers = []
    for line in block.splitlines():
        head = line.split("  ", 1)[0].strip()
        if line[:1].strip() and head:
            layers.append([p.strip() for p in head.split(",")])
    return layers


def layer_of(name: str, path: Path, layers: list[list[str]]) -> int | None:
    """The line of the layout that owns a module: its file named exactly, else its folder."""
    rel = path.relative_to(PACKAGE).as_posix()
    for i, paths in enumerate(layers):
        if rel in paths:
            return i
    for i, paths in enumerate(layers):
        if any(p.endswith("/") and rel.startswith(p) for p in paths):
            return i
    return None


def test_the_written_layout_is_the_import_order():
    """docs/design.md lists every module, and a module imports (at its top) only modules of
    its own line or of lines above it."""
    layers, mods = written_layout(), modules()
    rank = {name: layer_of(name, path, layers) for name, path in mods.items()}
    unlisted = sorted(name for name, r in rank.items() if r is None and name != "iodine_pyro")
    assert unlisted == [], "modules the layout in docs/design.md does not list"
    upward = [f"{name}:{line} imports {target} (listed below it)"
              for name, path in mods.items() if name != "iodine_pyro"
              for target, line in imports_of(name, path, top_level_only=True)
              if target in rank and target != "iodine_pyro" and rank[target] > rank[name]]
    assert upward == []
