"""The package is a stair: every module imports only modules below it, function-level imports included.

`LAYERS` lists mm_lens's modules from the bottom up; a module may import the modules listed before it, never one
listed after it (an upward import), and the import graph has no cycle. Imports under ``if TYPE_CHECKING:`` are
annotations only and do not count. A new module goes into `LAYERS` where its imports put it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mm_lens"

#: mm_lens's modules, bottom first. Each line is one step of the stair.
LAYERS = [
    "errors", "hook_points", "names", "types", "compat",
    "routes",  # knockout routes into attention TL does not compute itself (HF's AttentionInterface)
    "protocol",  # the choices, as data
    "families.base",  # what mm-lens must know of a family, as one record
    "families.llava", "families.onevision", "families.gemma3", "families.idefics3", "families.mistral3",
    "families.internvl", "families.qwen_vl", "families.glm4v",
    "families",  # the registry
    "regions",  # region records; where each image token sits
    "knockout",  # the knockout hook, and the proof at load that it is live
    "model",  # loading; what a family's files say (image token, study family, which protocol auto means)
    "patches",  # both patch rules (exact geometry, the study's red mask)
    "encoders",  # both input pipelines (the study's, the checkpoint's)
    "inputs",  # prepare() and MultimodalInput
    "data.gqa", "data", "expectations",
    "engines",  # how a sweep computes knockouts
    "selfcheck",
    "analyses",  # one record per analysis kind, the per-sample loop
    "sweep", "lens", "attention", "heads", "patching", "image_lens", "maps",
    "plots", "map_plots", "run_dir", "report", "shards", "runs", "study",
    "toy", "toy.world", "toy.train", "demo",
    "cli", "__init__",
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, own: set[str]) -> list[tuple[str, int, bool]]:
    """(imported mm_lens module, line, inside a function) for every import of `path` outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mm_lens."):
                    found.append((alias.name.removeprefix("mm_lens."), node.lineno, in_function))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mm_lens":
                for alias in node.names:  # from mm_lens import errors -> a submodule, or a name of __init__
                    found.append((alias.name if alias.name in own else "__init__", node.lineno, in_function))
            elif node.module.startswith("mm_lens."):
                found.append((node.module.removeprefix("mm_lens."), node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    own = {_module_name(p) for p in paths}
    return {_module_name(p): [(m, line, f) for m, line, f in _imports(p, own) if m != _module_name(p)]
            for p in paths}


def test_every_module_has_a_step():
    assert sorted(set(_graph()) - set(LAYERS)) == [], "add new modules to LAYERS where their imports put them"
    assert len(LAYERS) == len(set(LAYERS))


def test_imports_only_point_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"mm_lens/{mod.replace('.', '/')}.py:{line} imports mm_lens.{dep} (listed above it)"
              for mod, deps in _graph().items() for dep, line, _ in deps
              if dep in rank and mod in rank and rank[dep] > rank[mod]]
    assert upward == []


def test_no_import_cycle():
    graph = {mod: sorted({dep for dep, _, _ in deps}) for mod, deps in _graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                walk(dep, path + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            walk(node, [node])
    assert cycles == []


@pytest.mark.parametrize("module", ["cli"])
def test_function_level_imports_have_a_reason(module):
    """The CLI imports its commands lazily (``mm-lens --help`` may not load torch); that is the reason there."""
    lazy = [dep for dep, _, in_function in _graph()[module] if in_function]
    assert lazy, "the CLI's commands are imported when they run"
