"""The layers of docs/architecture.md, checked on the source: which package may import which, and no
import cycle between modules.

Every ``.py`` file of the installed packages (``[tool.setuptools] packages`` and ``package-dir`` in
pyproject.toml: ``rewards/`` is ``visalign.rewards``, ``trainers/`` is ``visalign.trainers``) is
parsed, never imported.  Each import is resolved to the module it loads, relative imports and
imports inside functions included; imports under ``if TYPE_CHECKING:`` are only for type checkers
and are skipped.  ``from package import name`` counts as importing ``package.name`` when that is a
module, else ``package``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Reading the imports
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str  #: the importing module
    target: str  #: the imported module (one of the package's)
    line: int
    deferred: bool  #: inside a function: runs on call, not on import

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}{', in a function' if self.deferred else ''})"


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{module name: file}`` for every module of the distribution, as setuptools maps them."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup.get("package-dir", {})
    modules = {}
    for package in setup["packages"]:
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):  # the longest package-dir entry that covers it
            base = ".".join(parts[:cut])
            if base in dirs:
                folder = root / dirs[base] / Path(*parts[cut:])
                break
        else:
            folder = root / Path(*parts)
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def module_imports(module: str, path: Path, known: set[str] | frozenset[str]) -> list[Import]:
    """The imports of one module that load modules in ``known``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.stem == "__init__"
    found: list[Import] = []

    def add(target: str, node: ast.AST, deferred: bool) -> None:
        if target in known and target != module:
            found.append(Import(module, target, node.lineno, deferred))

    def visit(node: ast.AST, deferred: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, deferred)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, deferred)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node, deferred)
        inner = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


@lru_cache(maxsize=1)
def all_imports() -> tuple[Import, ...]:
    modules = package_modules()
    known = frozenset(modules)
    found = (imp for name, path in modules.items() for imp in module_imports(name, path, known))
    return tuple(dict.fromkeys(found))  # ``from m import a, b`` is one import of m


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = dfs(start)
            if found:
                return found
    return None


# --------------------------------------------------------------------------------------------
# The rules (docs/architecture.md, "Layers and what each may import")
# --------------------------------------------------------------------------------------------

BOTTOM = ("visalign.samplers", "visalign.io", "visalign.config", "visalign.prompts", "visalign.pairs",
          "visalign.models", "visalign.registry", "visalign.errors", "visalign.recipes", "visalign.threads",
          "visalign.stats", "visalign.sample", "visalign.assets")
ALGORITHMS = ("visalign.trainers.grpo", "visalign.trainers.nft", "visalign.trainers.dpo",
              "visalign.trainers.backprop")
#: the command-line entry points: nothing imports them but the entry point above them
CLIS = ("visalign.cli", "visalign.__main__", "visalign.trainers.cli", "visalign.steering.cli",
        "visalign.gallery.cli", "visalign.toy.cli", "visalign.serve.cli")
ABOVE_REWARDS = ("visalign.trainers", "visalign.steering", "visalign.gallery", "visalign.serve", *CLIS)

#: (name, importers, never imported by them, why); an importer prefix covers its submodules
RULES: list[tuple[str, tuple[str, ...], tuple[str, ...], str]] = [
    ("bottom", BOTTOM, ("visalign.rewards", *ABOVE_REWARDS),
     "the bottom layer (samplers, io, config, prompts, threads, stats, sample, assets) imports nothing above it"),
    ("rewards", ("visalign.rewards",), ("visalign.samplers", *ABOVE_REWARDS),
     "a reward never knows which model made the images: no samplers, nothing above rewards"),
    ("gallery", ("visalign.gallery",), ("visalign.trainers", "visalign.steering"),
     "the gallery scores with rewards; it never needs trainers or steering"),
    ("serve", ("visalign.serve",), ("visalign.trainers", "visalign.steering", "visalign.samplers"),
     "the reward server serves rewards; it never needs a sampler, trainers or steering"),
    ("steering", ("visalign.steering",), ("visalign.trainers", "visalign.gallery"),
     "steering is a peer of the trainers, not a trainer: it stands on samplers and rewards"),
    ("trainers", ("visalign.trainers",), ("visalign.steering", "visalign.gallery"),
     "trainers stand on samplers and rewards; steering is their peer"),
    ("trainers.common", ("visalign.trainers.common",),
     ("visalign.trainers.base", "visalign.trainers.group", "visalign.trainers.recipe", "visalign.trainers.registry",
      *ALGORITHMS),
     "trainers/common is the floor's toolbox: the Trainer (base.py, group.py) and the algorithms stand on it"),
    ("trainer floor", ("visalign.trainers.base", "visalign.trainers.group"), ALGORITHMS,
     "the trainer floor never names an algorithm (the registry does)"),
    # an algorithm builds on the floor, never on another algorithm
    *[(a.rsplit(".", 1)[1], (a,), tuple(b for b in ALGORITHMS if b != a), "algorithms are independent of each other")
      for a in ALGORITHMS],
]

# ---- the toy world's rules (visalign/toy and the toy family adapter) go here ------------------
#: the toy world's modules that sit above its core: the reward adapters and the plug-in (at the
#: rewards layer) and the judge of steering recipes (beside steering's command line)
TOY_ADAPTERS = ("visalign.toy.plugin", "visalign.toy.shapes_reward", "visalign.toy.proxy_reward",
                "visalign.toy.artifact_reward", "visalign.toy.steer_eval", "visalign.toy.cli")
TOY_CORE = tuple(f"visalign.toy.{p.stem}" for p in sorted((ROOT / "visalign" / "toy").glob("*.py"))
                 if p.stem != "__init__" and f"visalign.toy.{p.stem}" not in TOY_ADAPTERS)
TOY_RULES: list[tuple[str, tuple[str, ...], tuple[str, ...], str]] = [
    ("toy core", TOY_CORE, ("visalign.rewards", *ABOVE_REWARDS),
     "the toy world's model, prompts, renderer and verifier stand on the bottom layer only"),
    ("toy adapters", TOY_ADAPTERS, ("visalign.trainers", "visalign.gallery"),
     "the toy world plugs into rewards and steering, never into the trainers or the gallery"),
]

#: entries of CLIS that may import others: the top-level dispatcher and ``python -m visalign``
CLI_DISPATCH = ("visalign.cli", "visalign.__main__")


def violations(imports, rules) -> list[str]:
    bad = []
    for imp in imports:
        for _name, importers, forbidden, why in rules:
            if any(_within(imp.source, p) for p in importers) and any(_within(imp.target, f) for f in forbidden):
                bad.append(f"{imp}: {why}")
    return bad


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_every_module_is_found():
    modules = package_modules()
    for name in ("visalign.samplers.types", "visalign.samplers.kernels", "visalign.steering.fk",
                 "visalign.rewards.base", "visalign.trainers.base", "visalign.trainers.group",
                 "visalign.trainers.common.seeds"):
        assert name in modules, name
    assert modules["visalign.rewards"] == ROOT / "rewards" / "__init__.py"
    assert not any(_within(m, "visalign.trainers.steering") for m in modules)


@pytest.mark.parametrize("rule", RULES + TOY_RULES, ids=lambda rule: rule[0])
def test_layer_rule(rule):
    bad = violations(all_imports(), [rule])
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_nothing_imports_a_command_line_entry_point():
    bad = [str(imp) for imp in all_imports()
           if any(_within(imp.target, c) for c in CLIS) and not any(_within(imp.source, c) for c in CLI_DISPATCH)]
    assert not bad, "only visalign/cli.py dispatches to the command-line modules:\n" + "\n".join(bad)


def test_the_kernels_stand_on_the_plain_types_only():
    """contract.py imports kernels.py; kernels.py reads the types, never the contract."""
    targets = {imp.target for imp in all_imports() if imp.source == "visalign.samplers.kernels"}
    assert targets <= {"visalign.samplers.types"}, targets


@pytest.mark.parametrize("deferred", [False, True], ids=["on-import", "with-imports-in-functions"])
def test_no_import_cycle_between_modules(deferred):
    """The modules' imports form no cycle: neither those that run on import nor, with the imports
    inside functions added, any (a cycle broken only by deferring an import is still a cycle)."""
    edges: dict[str, set[str]] = {}
    for imp in all_imports():
        if deferred or not imp.deferred:
            edges.setdefault(imp.source, set()).add(imp.target)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_find_what_they_look_for(tmp_path):
    """The cycle finder and the import reader on small synthetic cases, so a green run means
    something."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
                              "def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("import pkg.a\nfrom . import a as _a\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    imps = {name: module_imports(name, pkg / file, known)
            for name, file in (("pkg", "__init__.py"), ("pkg.a", "a.py"), ("pkg.b", "b.py"))}
    assert [(i.target, i.deferred) for i in imps["pkg"]] == [("pkg.a", False)]
    assert [(i.target, i.deferred) for i in imps["pkg.a"]] == [("pkg.b", True)]  # TYPE_CHECKING skipped
    assert [(i.target, i.deferred) for i in imps["pkg.b"]] == [("pkg.a", False), ("pkg.a", False)]
    rule = [("b", ("pkg.b",), ("pkg.a",), "b sits below a")]
    assert len(violations([i for v in imps.values() for i in v], rule)) == 2
