"""Sharded training through accelerate on CPU processes (gloo): FSDP2 and DeepSpeed ZeRO against one
process with the same global batch, a kill -9 of one process then ``--resume``, and the export.

The runs are offline DPO on the toy model ``toy-shapes-cn`` on a fixed set of pairs: a step's pairs
and its noise / time draws are those of the global batch (each process takes its share), so one
process with ``train_batch_size: 4`` and two processes with 2 each train on the same samples.  The
losses then agree to float rounding: the two halves of a step are summed in another order (and
reduced over gloo), and Adam turns the last bits of small gradients into small weight differences
after a few steps, hence ``rtol 1e-4`` on the losses and ``1e-3`` on the weights.  A resumed run
repeats the killed run's iterations after its checkpoint exactly (the same processes, the same
sums).

accelerate 1.15 enables FSDP on GPU-like devices only; on CPU the trainer makes the accelerator
FSDP with accelerate's own plugin (visalign.trainers.common.sharding).  The ZeRO runs need
DeepSpeed (``pip install --no-build-isolation deepspeed``; docs/scaling.md) and are skipped
without it.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from visalign.testing import accelerate_command

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"
ITERATIONS = 4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _accelerate() -> str:
    return accelerate_command() or pytest.skip("the accelerate command is not installed")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from test_dpo import pair_folder

    return pair_folder(tmp_path_factory.mktemp("pairs"), n=8, seed=1)


def _recipe(path: Path, pairs: Path, run_dir: Path, *, lora: bool, iterations: int = ITERATIONS,
            batch: int = 4) -> Path:
    path.write_text(
        "algorithm: dpo\n"
        "model: {name: toy-shapes-cn, dtype: float32, device: cpu}\n"
        "data: {train: null, eval: null}\n"
        "rewards: {}\n"
        + ("lora: {rank: 4, alpha: 8}\n" if lora else "lora: null\n")
        + f"dpo: {{mode: offline, pairs: {pairs}, beta: 100, sft_weight: 1.0, cache_dtype: float32, num_workers: 0, "
        f"train_batch_size: {batch}, learning_rate: 1.0e-3, ema_decay: 0.5, hflip: true, caption_dropout: 0.3, "
        "timesteps_per_pair: 2}\n"
        f"run: {{run_dir: {run_dir}, iterations: {iterations}, checkpoint_every: 2, keep_checkpoints: 3, "
        "eval_every: 0, progress: false, save_sample_grid: false}\n")
    return path


def _rows(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl (a last line still being written is left out)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows]


def _launch_cmd(config: str, recipe: Path, *args: str) -> list[str]:
    return [_accelerate(), "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2",
            "-m", "visalign", "train", str(recipe), *args, "--threads", "1"]


def _launch(config: str, recipe: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(_launch_cmd(config, recipe, *args), capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def one_process(pairs, tmp_path_factory):
    """The one-process runs (in this process) that the two-process runs must equal: ``{lora: run_dir}``."""
    from visalign.trainers.recipe import build_trainer, load_recipe

    done: dict[bool, Path] = {}

    def run(lora: bool) -> Path:
        if lora not in done:
            root = tmp_path_factory.mktemp("one_lora" if lora else "one_full")
            recipe = _recipe(root / "recipe.yaml", pairs, root / "run", lora=lora)
            torch.manual_seed(0)
            build_trainer(load_recipe(recipe)).train()
            done[lora] = root / "run"
        return done[lora]

    return run


def _load_final(final: Path):
    """A fresh toy-shapes-cn sampler with the run's final weights loaded the normal way."""
    import visalign.samplers as vs
    from visalign.samplers.lora import load_finetuned

    sampler = vs.load("toy-shapes-cn", dtype="float32", device="cpu")
    kind = load_finetuned(sampler, final)
    return sampler, kind


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    sa, ka = _load_final(a)
    sb, kb = _load_final(b)
    assert ka == kb
    da, db = sa.denoiser.state_dict(), sb.denoiser.state_dict()
    assert set(da) == set(db)
    worst = max(float((da[k].float() - db[k].float()).abs().max()) for k in da)
    assert worst < atol, worst


def test_accelerate_configs_are_launch_configs_not_recipes():
    import yaml

    from visalign.config import ConfigError
    from visalign.recipes import available
    from visalign.trainers.recipe import load_recipe

    listed = {r.name: r for r in available("accelerate")}
    assert set(listed) == {"accelerate/fsdp2", "accelerate/fsdp2_offload", "accelerate/zero2", "accelerate/zero3"}
    assert listed["accelerate/fsdp2"].command.startswith("accelerate launch --config_file ")
    for name in ("fsdp2", "fsdp2_offload"):
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
        assert cfg["fsdp_config"]["fsdp_offload_params"] is (name == "fsdp2_offload")
    for stage in (2, 3):
        cfg = yaml.safe_load((CONFIGS / f"zero{stage}.yaml").read_text())
        assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero_stage"] == stage
    with pytest.raises(ConfigError, match="accelerate launch config, not a training recipe"):
        load_recipe(CONFIGS / "fsdp2.yaml")


def test_launch_kind_follows_the_accelerate_launch_environment(monkeypatch):
    from visalign.trainers.common.sharding import launch_kind

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    assert launch_kind() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launch_kind() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launch_kind() == "deepspeed"


def test_fsdp2_full_fine_tuning_equals_one_process_and_exports_loadable_weights(pairs, one_process, tmp_path):
    one = one_process(False)
    recipe = _recipe(tmp_path / "recipe.yaml", pairs, tmp_path / "run", lora=False, batch=2)
    out = _launch("fsdp2.yaml", recipe)
    assert "processes: 2" in out.stdout
    rows, ref = _rows(tmp_path / "run"), _rows(one)
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert _losses(rows) == pytest.approx(_losses(ref), rel=1e-4, abs=1e-6)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4)
    ckpt = tmp_path / "run" / "checkpoints" / f"iter_{ITERATIONS:06d}"
    assert (ckpt / "accelerate" / "pytorch_model_fsdp_0").is_dir()  # sharded model state (DCP)
    assert sorted(p.name for p in ckpt.glob("trainer_rank*.pt")) == ["trainer_rank0.pt", "trainer_rank1.pt"]
    # the gathered final weights load back strictly (every key of the denoiser) and equal one process's
    _assert_same_weights(tmp_path / "run" / "final", one / "final", atol=1e-3)


def _rank_pids(launcher: int) -> dict[int, int]:
    import psutil

    found = {}
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            rank = child.environ().get("LOCAL_RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "visalign" in " ".join(child.cmdline()):
            found[int(rank)] = child.pid
    return found


def _complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("iter_*") if p.is_dir())


@pytest.mark.parametrize("config", ["fsdp2.yaml", "zero3.yaml"])
def test_lora_equals_one_process_and_resumes_exactly_after_kill_9(config, pairs, one_process, tmp_path):
    """A LoRA run under FSDP2 and ZeRO-3: one process is killed with SIGKILL after a checkpoint, while
    the run is past it; ``--resume`` with two processes continues: the iterations the killed run had
    already logged past its checkpoint come out bit for bit the same, and every loss equals the
    one-process run's."""
    if config.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    one = one_process(True)
    iterations = 6
    run_dir = tmp_path / "run"
    recipe = _recipe(tmp_path / "recipe.yaml", pairs, run_dir, lora=True, batch=2, iterations=iterations)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_launch_cmd(config, recipe), stdout=log, stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)
    killed_rows, ckpt = None, None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            done = _complete_checkpoints(run_dir) if (run_dir / "checkpoints").is_dir() else []
            n_rows = len(_rows(run_dir)) if (run_dir / "metrics.jsonl").is_file() else 0
            if not done or n_rows <= done[-1]:
                continue
            pids = _rank_pids(proc.pid)
            if len(pids) != 2:
                continue
            for pid in pids.values():  # freeze both, then look: a row past a complete checkpoint?
                os.kill(pid, signal.SIGSTOP)
            done, rows = _complete_checkpoints(run_dir), _rows(run_dir)
            if done and len(rows) > done[-1] and len(rows) < iterations:
                ckpt, killed_rows = done[-1], rows
                os.kill(pids[1], signal.SIGKILL)
                os.kill(pids[0], signal.SIGCONT)
                break
            for pid in pids.values():
                os.kill(pid, signal.SIGCONT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert killed_rows is not None, "the run ended before it could be killed past a checkpoint: " + \
        (tmp_path / "killed.log").read_text()[-3000:]
    assert proc.returncode != 0
    out = _launch(config, recipe, "--resume", str(run_dir))
    assert f"resumed {run_dir} at iteration {ckpt}" in out.stdout
    rows = _rows(run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, iterations + 1))  # no duplicated history
    overlap = [r["iteration"] for r in killed_rows if r["iteration"] > ckpt]
    assert overlap
    for it in overlap:  # the same iteration, computed again after the resume: exactly the same
        assert rows[it - 1]["loss"] == killed_rows[it - 1]["loss"], it
        assert rows[it - 1]["grad_norm"] == killed_rows[it - 1]["grad_norm"], it
    ref = _rows(one)
    assert _losses(rows[:ITERATIONS]) == pytest.approx(_losses(ref), rel=1e-4, abs=1e-6)
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    _assert_one_process_lora_prefix(run_dir, one)


def _assert_one_process_lora_prefix(run_dir: Path, one: Path) -> None:
    """The LoRA export loads back (the normal LoRA loader); its keys are the one-process run's."""
    from safetensors.torch import load_file

    a = load_file(str(run_dir / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(one / "final" / "pytorch_lora_weights.safetensors"))
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
    sampler, kind = _load_final(run_dir / "final")
    assert kind == "lora"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_equals_one_process(stage, pairs, one_process, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    one = one_process(False)
    recipe = _recipe(tmp_path / "recipe.yaml", pairs, tmp_path / "run", lora=False, batch=2)
    _launch(f"zero{stage}.yaml", recipe)
    rows, ref = _rows(tmp_path / "run"), _rows(one)
    assert _losses(rows) == pytest.approx(_losses(ref), rel=1e-4, abs=1e-6)
    assert (tmp_path / "run" / "checkpoints" / f"iter_{ITERATIONS:06d}" / "accelerate" / "pytorch_model").is_dir()
    _assert_same_weights(tmp_path / "run" / "final", one / "final", atol=1e-3)
