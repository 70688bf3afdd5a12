"""The trainer floor as docs/architecture.md describes it: the page's 30-line algorithm runs as
written (registered by name, trained, checkpointed, resumed), and the layering rules hold."""

import ast
import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _doc_example() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("### A new algorithm in 30 lines"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def best_of():
    code = _doc_example()
    assert len(code.strip().splitlines()) <= 40  # "30 lines" of algorithm (plus imports and blank lines)
    module = types.ModuleType("visalign_doc_example")
    sys.modules[module.__name__] = module
    exec(compile(code, "docs/architecture.md", "exec"), module.__dict__)
    yield module
    sys.modules.pop(module.__name__, None)


def test_the_documented_algorithm_trains_checkpoints_and_resumes(best_of, make_trainer):
    from visalign.trainers import registry

    assert registry.get("best_of").trainer_class is best_of.BestOfTrainer
    tr = make_trainer(algorithm="best_of", run_dir="a")
    before = torch.cat([p.detach().flatten().clone() for p in tr.params])
    row = tr.step()
    assert row["iteration"] == 1 and row["loss"] > 0 and row["grad_norm"] > 0 and "reward/mean" in row
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in tr.params]))
    second = tr.step()
    tr.save_checkpoint()
    again = make_trainer(algorithm="best_of", run_dir="a")
    assert again.resume() and again.iteration == 2
    ref = make_trainer(algorithm="best_of", run_dir="b")
    ref.step(), ref.step()
    a, b = again.step(), ref.step()  # the third iteration equals an uninterrupted run's
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and second["iteration"] == 2


def test_registry_errors_and_recipe_sections(tmp_path):
    from visalign.config import ConfigError
    from visalign.trainers import load_recipe, registry

    with pytest.raises(ValueError, match="Did you mean 'grpo'"):
        registry.get("gpro")
    assert {a.name for a in registry.available()} >= {"grpo", "nft"}
    cfg = tmp_path / "r.yaml"
    cfg.write_text("algorithm: nft\nnft: {group_size: 4, beta: 0.5}\n")
    recipe = load_recipe(cfg)
    assert type(recipe.config).__name__ == "NFTConfig" and recipe.config.beta == 0.5
    cfg.write_text("algorithm: nft\ngrpo: {group_size: 4}\n")
    with pytest.raises(ConfigError, match="section 'grpo' belongs to algorithm 'grpo'"):
        load_recipe(cfg)
    cfg.write_text("algorithm: nft\nnft: {betta: 0.5}\n")
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        load_recipe(cfg)
    cfg.write_text("algorithm: dpoo\n")
    with pytest.raises(ConfigError, match="unknown algorithm 'dpoo'"):
        load_recipe(cfg)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


# the toy world's reward adapters and its plug-in sit at the rewards layer; the rest of it below
TOY_REWARD_LAYER = ("plugin.py", "shapes_reward.py", "proxy_reward.py", "artifact_reward.py")


@pytest.mark.parametrize("folder,forbidden,exempt", [
    ("visalign/samplers", ("visalign.rewards", "visalign.toy", "visalign.trainers", "visalign.gallery"), ()),
    ("visalign/toy", ("visalign.trainers",), ()),
    ("visalign/toy", ("visalign.rewards",), TOY_REWARD_LAYER),
    ("visalign/toy", ("visalign.steering", "visalign.gallery"), ("steer_eval.py",)),
    ("rewards", ("visalign.trainers", "visalign.samplers", "visalign.serve"), ()),
    ("visalign/gallery", ("visalign.trainers",), ()),
    ("visalign/serve", ("visalign.trainers", "visalign.samplers"), ()),
])
def test_layers_import_downward_only(folder, forbidden, exempt):
    """docs/architecture.md's table: the toy world never imports trainers (nor rewards, but for
    its reward adapters and plug-in), rewards never import the sampler loader, the samplers import
    nothing above them."""
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.name in exempt:
            continue
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_no_docstring_or_doc_points_outside_the_repository():
    """Users of the package never have the project's steering files: facts live in docs/."""
    hits = []
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *(ROOT / "visalign").rglob("*.py"),
                 *(ROOT / "rewards").rglob("*.py"), *(ROOT / "trainers").rglob("*.py"), *(ROOT / "configs").rglob("*.yaml")]:
        text = path.read_text(encoding="utf-8")
        for bad in ("shared/", "REFERENCE.md", "DESIGN.md", "STYLE.md"):
            if bad in text:
                hits.append(f"{path.relative_to(ROOT)}: {bad}")
    assert not hits, hits
