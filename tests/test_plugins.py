"""Plug-ins: the toy world registers itself like any package would, nothing below it names it, an
out-of-package plug-in works through the public registries, and unknown names get "did you mean"."""

import ast
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: names only the toy world may give meaning to
TOY_NAMES = {"toy", "toy-strict", "toy-shapes", "toy-shapes-cn", "ToyShapesPipeline", "shapes", "shapes-proxy",
             "shapes-artifact"}
#: steering's toy-world evaluation (``visalign steer --toy-eval``) imports the toy world; it belongs
#: in visalign/toy once steering is a peer of the trainers (the only exception; keep it that way)
ALLOWED = ("steering/cli.py",)  # a command line: --toy-eval runs the toy world's judge of a recipe
#: the layers below the CLI (the CLI may name every command, ``visalign toy`` included)
SCANNED = [ROOT / "rewards", ROOT / "trainers", *[p for p in (ROOT / "visalign").iterdir() if p.name != "toy"]]


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("rewards", "trainers"):
        parts = ["visalign", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            return [node.module or ""]
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        full = ".".join(base + ([node.module] if node.module else []))
        return [full] + [f"{full}.{a.name}" for a in node.names] if not node.module else [full]
    return []


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def _toy_references(path: Path, module: str | None = None) -> list[str]:
    module, is_package = module or _module_of(path), path.name == "__init__.py"
    hits = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # a default value (``field(default_factory=lambda: {"name": 1.0})``) names a registered thing
    # as data, like a default string does; it is no special case
    defaults = {id(n.body) for n in ast.walk(tree) if isinstance(n, ast.Lambda)}
    for node in ast.walk(tree):
        for name in _imported(node, module, is_package):
            if name == "visalign.toy" or name.startswith("visalign.toy."):
                hits.append(f"line {node.lineno}: imports {name}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("visalign.toy"):
            hits.append(f"line {node.lineno}: names {node.value!r} (a lazy import of the toy world)")
        if isinstance(node, ast.Compare):  # x == "toy", family in ("toy", ...), ...
            names = {s for side in (node.left, *node.comparators) for s in _strings(side)} & TOY_NAMES
            if names:
                hits.append(f"line {node.lineno}: branches on {sorted(names)}")
        if isinstance(node, ast.Dict) and id(node) not in defaults:  # special-case tables keyed by toy names
            names = {s for k in node.keys if k is not None for s in _strings(k)} & TOY_NAMES
            if names:
                hits.append(f"line {node.lineno}: a table keyed by {sorted(names)}")
        if isinstance(node, ast.Call) and node.args and getattr(node.func, "id", getattr(node.func, "attr", "")).startswith("register"):
            names = set(_strings(node.args[0])) & TOY_NAMES
            if names:
                hits.append(f"line {node.lineno}: registers {sorted(names)} outside the toy plug-in")
    return hits


def test_nothing_below_the_cli_names_the_toy_world():
    bad = []
    for top in SCANNED:
        files = sorted(top.rglob("*.py")) if top.is_dir() else [top] if top.suffix == ".py" else []
        for path in files:
            rel = path.relative_to(ROOT).as_posix()
            if rel == "visalign/cli.py" or rel.endswith(ALLOWED):
                continue
            bad += [f"{rel} {hit}" for hit in _toy_references(path)]
    assert not bad, "\n".join(bad)


def test_the_scan_sees_what_it_forbids(tmp_path):
    probe = tmp_path / "probe.py"
    source = textwrap.dedent("""
        from .toy import prompts
        import visalign.toy.verify
        TABLE = {"toy": 1.0}
        def f(family):
            register_source("toy", "visalign.toy.prompts:records")
            return family == "toy"
    """)
    probe.write_text(source)
    hits = _toy_references(probe, "visalign.probe")
    text = "\n".join(hits)
    for expected in ("line 2: imports visalign.toy\n", "imports visalign.toy.verify", "a table keyed by ['toy']",
                     "branches on ['toy']", "registers ['toy']", "'visalign.toy.prompts:records'"):
        assert expected in text, text


def test_the_toy_world_is_a_declared_plugin_and_registers_everything():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    import visalign.rewards as vr
    import visalign.samplers as vs
    from visalign.pairs import pair_sources
    from visalign.prompts import sources
    from visalign.registry import load_plugins
    from visalign.rewards.head import TRAINABLE_BACKBONES
    from visalign.rewards.head_train import PROVIDERS
    from visalign.samplers.loading import BUILTIN_MODELS

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["visalign.plugins"]["toy"] == "visalign.toy.plugin:register"
    assert "visalign.toy.plugin:register" in load_plugins()  # found in the source tree too
    assert vs.FAMILIES["ToyShapesPipeline"].family == "toy"
    assert {"toy-shapes", "toy-shapes-cn"} <= set(BUILTIN_MODELS)
    assert "toy" in sources() and {"toy", "toy-strict"} <= set(pair_sources())
    assert {"shapes", "shapes-proxy", "shapes-artifact"} <= {i.name for i in vr.available()}
    assert "shapes-proxy" in TRAINABLE_BACKBONES and {"shapes-proxy", "shapes-artifact"} <= set(PROVIDERS)
    from visalign.toy.plugin import register

    register()  # idempotent: the same targets again are no conflict


# ---- an out-of-package plug-in ------------------------------------------------------------------
PLUGIN = '''
import torch

from visalign.rewards import Reward, RewardInfo, RewardOutput


class Brightness(Reward):
    info = RewardInfo("plugtest-brightness", description="mean pixel value")

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def score(self, images, prompts, references, metadata):
        return RewardOutput(self.scale * images.float().mean(dim=(1, 2, 3)))


def records(part):
    if part not in ("train", "eval"):
        raise ValueError(f"unknown split {part!r}")
    return [{"prompt": f"a {part} prompt {i}", "metadata": {"split": part}} for i in range(3)]


CALLS = []


def register():
    import visalign.rewards as vr
    from visalign.prompts import register_source

    CALLS.append(1)
    vr.register("plugtest-brightness", "plugtest_mod:Brightness", description="mean pixel value")
    register_source("plugtest", "plugtest_mod:records")
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "plugtest_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "plugtest_mod"
    import visalign.rewards.registry as rr
    from visalign.prompts import SOURCES

    rr._REGISTRY.unregister("plugtest-brightness")
    SOURCES.unregister("plugtest")
    sys.modules.pop("plugtest_mod", None)


def test_a_plugin_outside_the_package_registers_rewards_and_prompts(plugin_module):
    import visalign.rewards as vr
    from visalign.prompts import load_prompts, register_source

    vr.register("plugtest-brightness", "plugtest_mod:Brightness", inputs=("images",), description="mean pixel value")
    register_source("plugtest", "plugtest_mod:records")
    assert "plugtest_mod" not in sys.modules  # registering imports nothing
    assert vr.info("plugtest-brightness").description == "mean pixel value"
    images = torch.full((2, 3, 8, 8), 0.5)
    assert torch.allclose(vr.load("plugtest-brightness:scale=2")(images).scores, torch.ones(2))
    # a recipe's mapping: shared options go only to factories that take them
    both = vr.load({"plugtest-brightness": 1.0, "plugtest-brightness:scale=3": 0.5}, shared={"device": "cpu"})
    assert torch.allclose(both(images).scores, torch.full((2,), 0.5 + 0.75))
    recs = load_prompts("plugtest:eval")
    assert [r["prompt"] for r in recs] == [f"a eval prompt {i}" for i in range(3)] and recs[0]["metadata"]["split"] == "eval"
    with pytest.raises(ValueError, match="already registered"):
        vr.register("plugtest-brightness", "plugtest_mod:Other")
    assert vr.load("plugtest-brightness", shared={"device": "cpu", "not_an_option": 1}).scale == 1.0


def test_entry_point_plugins_load_once_and_a_broken_one_warns(plugin_module, monkeypatch):
    import visalign.registry as reg
    import visalign.rewards as vr

    monkeypatch.setattr(reg, "_state", "unloaded")
    monkeypatch.setattr(reg, "_loaded", [])
    monkeypatch.setattr(reg, "_entry_points", lambda: [("plugtest", "plugtest_mod:register"),
                                                       ("again", "plugtest_mod:register"),
                                                       ("broken", "plugtest_no_such_module:register")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = {i.name for i in vr.available()}  # the first lookup loads the plug-ins
    assert "plugtest-brightness" in names and "shapes" in names
    assert sys.modules["plugtest_mod"].CALLS == [1]  # deduplicated by target
    assert any("'broken'" in str(w.message) and "skipped" in str(w.message) for w in caught)
    assert reg.loaded_plugins()[:1] == ["visalign.toy.plugin:register"] and "plugtest_mod:register" in reg.loaded_plugins()
    vr.info("plugtest-brightness")
    assert sys.modules["plugtest_mod"].CALLS == [1]  # once


# ---- unknown names ------------------------------------------------------------------------------
def test_registry_helper_suggests_the_nearest_name_and_resolves_lazily():
    from visalign.registry import Registry, UnknownNameError

    r = Registry("widget", hint="(see docs/widgets.md)")
    r.register("sprocket", "math:sqrt", teeth=12)
    r.register("gear", len)
    r.register("ghost", "visalign_no_such_module:thing")
    assert r.available() == ["gear", "ghost", "sprocket"] and "gear" in r and len(r) == 3
    assert r.get("sprocket")(16.0) == 4.0 and r.get("gear") is len and r.entry("sprocket").teeth == 12
    with pytest.raises(UnknownNameError, match=r"unknown widget 'sprockt'\. Did you mean 'sprocket'\? "
                                               r"Known widgets: gear, ghost, sprocket \(see docs/widgets.md\)\.") as err:
        r.get("sprockt")
    assert err.value.registry == "widget" and err.value.suggestion == "sprocket"
    with pytest.raises(ModuleNotFoundError):
        r.get("ghost")  # imported only when used
    with pytest.raises(ValueError, match="expected 'package.module:attr'"):
        Registry("widget").register("x", "no-colon").load()


def test_every_registry_says_did_you_mean():
    import visalign.rewards as vr
    import visalign.samplers as vs
    from visalign.pairs import PAIR_SOURCES
    from visalign.prompts import load_prompts
    from visalign.rewards.head import BackboneConfig
    from visalign.trainers import registry

    with pytest.raises(ValueError, match=r"unknown reward 'shapez'\. Did you mean 'shapes'\?"):
        vr.load("shapez")
    with pytest.raises(ValueError, match=r"unknown algorithm 'gpro'\. Did you mean 'grpo'\?"):
        registry.get("gpro")
    with pytest.raises(FileNotFoundError, match="Did you mean toy:eval"):
        load_prompts("tyo:eval")
    with pytest.raises(ValueError, match=r"Did you mean 'toy-strict'\?"):
        PAIR_SOURCES.get("toy-stirct")
    with pytest.raises(ValueError, match=r"unknown model family 'FluxPipelin'\. Did you mean 'FluxPipeline'\?"):
        vs.FAMILIES.get("FluxPipelin")
    with pytest.raises(ValueError, match="choose one of"):
        BackboneConfig(kind="shapes-prox")
