"""Imports in core/ run downhill: a module imports only from its own layer or the layers below it, so each
layer can be read and tested without the ones above. `python tests/test_layers.py` prints the layers, their
modules and what each imports from the project. Read from the source (ast), so nothing is imported here."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "core"

# Bottom first. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("primitives: statistics, formatting, the run store, environment, roles",
     ("core", "core.formatting", "core.stats", "core.runs", "core.environment", "core.access")),
    ("data, the run config and the model registry", ("core.data", "core.config", "core.models")),
    ("a stored run loaded again", ("core.stored_run",)),
    ("the training engine",
     ("core.training", "core.training.callbacks", "core.training.precision", "core.training.distributed",
      "core.training.batches", "core.training.loop", "core.training.estimates", "core.training.study_storage")),
    ("class activation maps", ("core.cams",)),
    ("figures", ("core.figures",)),
    ("evaluation", ("core.evaluation",)),
    ("the explanation audit", ("core.audit",)),
    ("the quiz", ("core.quiz",)),
    ("studies, the job queue, the HTML report and the CLI",
     ("core.training.tuning", "core.training.ablation", "core.training.shared_ablation", "core.training.jobs",
      "core.report", "core.cli", "core.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(CORE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    return best


def project_imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every import of a core module in the file, at the top or inside a function;
    `from core import figures` counts as an import of core.figures."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "core"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "core":
            submodules = [f"{node.module}.{alias.name}" for alias in node.names
                          if f"{node.module}.{alias.name}" in modules]
            found += [(node.lineno, name) for name in submodules] or [(node.lineno, node.module)]
    return found


def upward_imports() -> list[str]:
    modules = core_modules()
    problems = []
    for name, path in modules.items():
        own = layer_of(name)
        for line, imported in project_imports(path, modules):
            target = layer_of(imported)
            if target is not None and own is not None and target > own:
                problems.append(f"{path.relative_to(CORE.parent)}:{line}: {name} ({LAYERS[own][0]}) imports "
                                f"{imported} ({LAYERS[target][0]}), a layer above it")
    return problems


def test_every_core_module_has_a_layer():
    assert [name for name in core_modules() if layer_of(name) is None] == []


def test_imports_run_only_downhill():
    assert upward_imports() == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check is not vacuous: a data module that imports the figures is reported, lazy import included."""
    fake = tmp_path / "core"
    (fake / "data").mkdir(parents=True)
    (fake / "figures.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "sneaky.py").write_text("def draw():\n    from core import figures\n    return figures\n")
    monkeypatch.setattr(sys.modules[__name__], "CORE", fake)
    assert upward_imports() == ["core/data/sneaky.py:2: core.data.sneaky (data, the run config and the model "
                                "registry) imports core.figures (figures), a layer above it"]


def print_layers() -> None:
    modules = core_modules()
    for index, (title, _) in reversed(list(enumerate(LAYERS))):
        print(f"{index}. {title}")
        for name, path in modules.items():
            if layer_of(name) == index:
                imported = sorted({target for _, target in project_imports(path, modules) if target != name})
                print(f"     {name}" + (f" -> {', '.join(imported)}" if imported else ""))
    problems = upward_imports()
    print("\n".join(problems) if problems else "\nno upward imports")


if __name__ == "__main__":
    print_layers()
