"""YAML recipes -> typed dataclasses: unknown keys, type conversion, overrides."""

from dataclasses import dataclass, field

import pytest

from visalign.config import ConfigError, apply_overrides, load_config, save_config


@dataclass
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Recipe:
    model: str = "toy-shapes"
    group_size: int = 8
    sde_steps: list[int] | None = None
    use_ema: bool = True
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2 for group-relative advantages, got {self.group_size}")


def test_load_and_convert(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: sd3\ngroup_size: 4\nsde_steps: [0, 1]\noptim:\n  lr: 1e-4\n  betas: [0.8, 0.9]\n")
    cfg = load_config(path, Recipe)
    assert cfg.model == "sd3" and cfg.group_size == 4 and cfg.sde_steps == [0, 1]
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9)


def test_misspelt_key_names_key_and_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("grop_size: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'grop_size'.*Did you mean 'group_size'"):
        load_config(path, Recipe)
    path.write_text("optim:\n  learning_rat: 1\n")
    with pytest.raises(ConfigError, match=r"'optim.learning_rat'"):
        load_config(path, Recipe)


def test_overrides_and_types(tmp_path):
    cfg = load_config(None, Recipe, ["optim.lr=0.01", "sde_steps=[2,3]", "use_ema=false", "model=null_model"])
    assert cfg.optim.lr == 0.01 and cfg.sde_steps == [2, 3] and cfg.use_ema is False
    with pytest.raises(ConfigError, match="group_size: expected an integer"):
        load_config(None, Recipe, ["group_size=many"])
    with pytest.raises(ConfigError, match="use_ema: expected true or false"):
        load_config(None, Recipe, ["use_ema=yes please"])
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["lr"])


def test_post_init_errors_teach():
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        load_config(None, Recipe, ["group_size=1"])


def test_save_round_trip(tmp_path):
    cfg = load_config(None, Recipe, ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", Recipe) == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", Recipe)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, Recipe)
