"""A non-editable install works: the wheel carries the shipped assets, and the installed copy finds them.

The wheel is built (offline, no build isolation) from a copy of what the build reads -- pyproject.toml,
the readme and the folders of ``[tool.setuptools] package-dir`` -- so nothing is written into the
repository.  It is installed with ``pip install --target`` into a temporary folder, which comes first
on ``PYTHONPATH``; the commands then run from another temporary folder, outside the repository.
About 15-20 s on 2 CPU cores (two wheel/pip steps and two short Python runs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _check_build_backend() -> None:
    """The test builds offline: setuptools>=68 (and ``wheel`` below setuptools 70.1) must be installed."""
    try:
        import setuptools
    except ImportError:
        setuptools = None
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit()) if setuptools else ()
    has_wheel = _importable("wheel")
    if not version or version < (68, 0) or (version < (70, 1) and not has_wheel):
        found = f"setuptools {setuptools.__version__}" if setuptools else "no setuptools"
        found += ", wheel" if has_wheel else ", no wheel"
        pytest.fail(f"building the wheel offline needs setuptools>=68 and wheel in {sys.executable}'s environment; "
                    f"found {found}. Install the test extra: pip install -e '.[test]'.")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _copy_build_inputs(dest: Path) -> Path:
    """Copy what the build reads (pyproject.toml, the readme, the package-dir folders) into ``dest``."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    readme = pyproject["project"].get("readme")
    folders = {Path(d).parts[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    dest.mkdir()
    shutil.copy2(REPO / "pyproject.toml", dest)
    if isinstance(readme, str):
        shutil.copy2(REPO / readme, dest)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for folder in sorted(folders):
        shutil.copytree(REPO / folder, dest / folder, ignore=skip)
    return dest


def _shipped_assets() -> list[str]:
    """Files under the repository's assets/ (data only: no Python caches)."""
    root = REPO / "assets"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel, install it with --target; return {"wheel", "site", "env", "cwd"}."""
    _check_build_backend()
    tmp = tmp_path_factory.mktemp("install")
    src = _copy_build_inputs(tmp / "src")
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist"), str(src)], env=pip_env)
    (wheel,) = (tmp / "dist").glob("visalign-*.whl")
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
         env=pip_env)
    env = {k: v for k, v in os.environ.items() if k != "VISALIGN_ASSETS"}  # the installed assets, not an override
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    cwd = tmp / "elsewhere"  # outside the repository: nothing there shadows the installed package
    cwd.mkdir()
    return {"wheel": wheel, "site": site, "env": env, "cwd": cwd}


def test_wheel_ships_the_assets_and_nothing_else(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    missing = [a for a in _shipped_assets() if f"visalign/assets/{a}" not in names]
    assert not missing, f"the wheel lacks these files of assets/: {missing}"
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"visalign", f"{installed['wheel'].name.split('-py')[0]}.dist-info"}, tops
    stray = [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not stray, stray


def test_installed_copy_finds_its_assets_from_another_folder(installed):
    site = installed["site"].resolve()
    code = (
        "import json, sys, visalign, visalign.rewards\n"
        "r = visalign.rewards.load('shapes-proxy')\n"
        "layering = sorted(m for m in sys.modules if m.startswith('visalign.samplers'))\n"
        "import visalign.assets, visalign.samplers.loading as L\n"
        "print(json.dumps({'layering': layering, 'paths': {'visalign': visalign.__file__,\n"
        "    'rewards': visalign.rewards.__file__, 'loading': L.__file__, 'assets': visalign.assets.__file__,\n"
        "    'proxy': r.path}}))\n"
    )
    out = _run([sys.executable, "-c", code], env=installed["env"], cwd=installed["cwd"])
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["layering"] == [], f"loading a reward imported the sampler layer: {report['layering']}"
    paths = report["paths"]
    for what, path in paths.items():
        assert Path(path).resolve().is_relative_to(site), f"{what} came from {path}, not from the installed copy {site}"
    assert Path(paths["proxy"]).resolve() == site / "visalign" / "assets" / "shapes-proxy"


def test_installed_toy_eval_runs_from_another_folder(installed):
    out = _run([sys.executable, "-m", "visalign", "toy", "eval", "--model", "toy-shapes", "--max-prompts", "2",
                "--samples-per-prompt", "1", "--steps", "2"], env=installed["env"], cwd=installed["cwd"])
    assert "toy eval: toy-shapes" in out.stdout
    assert "| category | strict accuracy |" in out.stdout
    assert "overall (GenEval mean of categories)" in out.stdout


def test_installed_recipes_list_and_train_by_name_from_another_folder(installed, tmp_path):
    shipped = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                     for p in (REPO / "configs").rglob("*.yaml"))
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    missing = [n for n in shipped if f"visalign/configs/{n}.yaml" not in names]
    assert not missing, f"the wheel lacks these recipes: {missing}"
    out = _run([sys.executable, "-m", "visalign", "recipes", "--json"], env=installed["env"], cwd=installed["cwd"])
    listed = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(shipped) <= set(listed) and {"shapes-proxy", "shapes-artifact"} <= set(listed)
    assert Path(listed["toy/nft_cn"]["path"]).resolve().is_relative_to(installed["site"].resolve())
    assert listed["steer/toy_fk"]["command"] == "visalign steer steer/toy_fk"
    # a toy recipe trains one iteration by name; the docs' form configs/toy/... finds the shipped copy too
    for name, run in (("toy/flow_grpo", "run_a"), ("configs/toy/flow_grpo.yaml", "run_b")):
        out = _run([sys.executable, "-m", "visalign", "train", name, "run.iterations=1", f"run.run_dir={run}",
                    "data.eval_max_prompts=2", "run.eval_num_steps=2", "run.progress=false",
                    "run.save_sample_grid=false", "--threads", "1"], env=installed["env"], cwd=installed["cwd"])
        assert "done: 1 iterations" in out.stdout
        assert (installed["cwd"] / run / "final" / "pytorch_lora_weights.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "visalign", "train", "toy/flow_grp"], capture_output=True, text=True,
                         env=installed["env"], cwd=installed["cwd"], timeout=120)
    assert bad.returncode == 2 and "Did you mean 'toy/flow_grpo'" in bad.stderr and "visalign recipes" in bad.stderr


def test_missing_asset_messages_say_how_to_get_them(monkeypatch, tmp_path):
    """In-process (no wheel): the errors name the folder looked in and the ways out, install-agnostic."""
    import visalign.assets as A
    import visalign.rewards as R
    import visalign.samplers as vs

    installed = Path(A.__file__).resolve().parent
    monkeypatch.setenv("VISALIGN_ASSETS", str(tmp_path))
    with pytest.raises(vs.ModelNotFoundError) as err:
        vs.load("toy-shapes")
    msg = str(err.value)
    assert str(tmp_path / "toy-shapes") in msg and "Unset VISALIGN_ASSETS" in msg
    assert str(installed / "toy-shapes") in msg  # where the installed copy is, wheel or checkout
    with pytest.raises(FileNotFoundError, match="'shapes-proxy' is missing from") as err:
        R.load("shapes-proxy")
    assert "visalign rewards train shapes-proxy --out DIR" in str(err.value)

    monkeypatch.delenv("VISALIGN_ASSETS")
    monkeypatch.setattr(A, "_installed_dir", lambda: tmp_path / "gone")
    with pytest.raises(vs.ModelNotFoundError, match="Reinstall visalign") as err:
        vs.load("toy-shapes")
    assert str(tmp_path / "gone" / "toy-shapes") in str(err.value) and "set VISALIGN_ASSETS" in str(err.value)
