"""The online trainers sharded: Flow-GRPO, DiffusionNFT, reward back-propagation and online DPO under
FSDP2 / DeepSpeed ZeRO train exactly as plain data parallelism does with the same two processes.

Online runs roll out with a generator per process, so one process and two differ by construction;
two processes with and without sharding draw the same rollouts, and sharding must change nothing
else: the per-iteration losses, gradient norms, KL and rewards agree to float rounding (the sharded
engines sum the reduced gradients in another order) and the exported weights agree to 1e-4.  The
cases cover the paths the sharded engines meet: a frozen reference copy (GRPO and NFT full
fine-tuning, with KL), NFT's old policy swapped in for rollouts and ``v_old`` (ZeRO-3 keeps small
weights gathered between steps, so swapped weights must be re-gathered), an EMA swapped in for the
export, reward gradients through the sampler (back-propagation), online DPO's pairs, and the
adaptive reference (a frozen adapter, or the reference copy, sharded like the trained weights or
whole on each process) refreshed before the second iteration.  Two iterations each: the second one
samples with the weights the first one's step wrote.
"""

import os
import subprocess
from pathlib import Path

import pytest
from test_sharded import CONFIGS, _accelerate, _assert_same_weights, _rows

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

#: the adaptive reference, refreshed before the second iteration
REFRESH = "guards: {reference_refresh_every: 1}\n"
HEAD = ("model: {name: toy-shapes-cn, dtype: float32, device: cpu}\n"
        "data: {train: 'toy:train', eval: null}\n")
ALGORITHMS = {
    "grpo": "algorithm: grpo\nrewards: {shapes: 1.0}\nlora: null\n"
            "grpo: {group_size: 4, prompts_per_iteration: 2, num_steps: 4, guidance_scale: 3.0, kernel: flow_sde, "
            "noise_level: 0.7, sde_window_size: 2, kl_beta: 0.04, learning_rate: 1.0e-4, train_batch_size: 2, "
            "gradient_accumulation: 2, max_grad_norm: 1.0, ema_decay: 0.9}\n" + REFRESH,
    "nft": "algorithm: nft\nrewards: {shapes: 1.0}\nlora: null\n"
           "nft: {group_size: 4, prompts_per_iteration: 2, num_steps: 4, guidance_scale: 1.0, timesteps: 2, "
           "kl_beta: 0.1, learning_rate: 1.0e-4, train_batch_size: 2, gradient_accumulation: 1, max_grad_norm: 1.0, "
           "ema_decay: 0.9}\n" + REFRESH,
    "backprop": "algorithm: backprop\nrewards: {shapes-proxy: 1.0}\nlora: {rank: 4, alpha: 8}\n"
                "backprop: {method: draft, grad_steps: 1, num_steps: 4, guidance_scale: 3.0, batch_size: 2, "
                "checkpoint: true, kl_beta: 0.1, learning_rate: 1.0e-3, max_grad_norm: 1.0, ema_decay: 0.9}\n" + REFRESH,
    "dpo_online": "algorithm: dpo\nrewards: {shapes: 1.0}\nlora: {rank: 4, alpha: 8}\n"
                  "dpo: {mode: online, group_size: 4, prompts_per_iteration: 2, num_steps: 4, guidance_scale: 3.0, "
                  "rollout_kernel: ode, pairing: best_worst, beta: 100, train_batch_size: 1, learning_rate: 1.0e-3, "
                  "ema_decay: 0.9, ref_refresh_every: 1}\n",
}
KEYS = ("loss", "grad_norm", "kl", "reward/mean", "optimizer_steps")


def _run(algorithm: str, engine: str, root: Path) -> Path:
    """Two processes for two iterations, plainly data-parallel (``engine="ddp"``) or sharded."""
    run_dir = root / engine
    recipe = root / f"{engine}.yaml"
    recipe.write_text(HEAD + ALGORITHMS[algorithm] +
                      f"run: {{run_dir: {run_dir}, seed: 0, iterations: 2, eval_every: 0, checkpoint_every: 2, "
                      "progress: false, save_sample_grid: false}\n")
    if engine == "ddp":  # two gloo workers without a sharding config (tests/trainers/test_multiprocess.py)
        launch = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        launch = ["--config_file", str(CONFIGS / f"{engine}.yaml")]
    cmd = [_accelerate(), "launch", *launch, "--num_processes", "2", "-m", "visalign", "train", str(recipe),
           "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return run_dir


@pytest.mark.parametrize("algorithm,engine", [("grpo", "zero2"), ("nft", "zero3"), ("nft", "fsdp2"),
                                              ("backprop", "zero3"), ("dpo_online", "fsdp2")])
def test_sharded_online_training_equals_data_parallel(algorithm, engine, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    plain, sharded = _run(algorithm, "ddp", tmp_path), _run(algorithm, engine, tmp_path)
    ref, rows = _rows(plain), _rows(sharded)
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in ref] == [1, 2]
    assert all(r["optimizer_steps"] >= 1 for r in ref), ref  # both iterations trained: the test is not vacuous
    assert [r["reference/refreshes"] for r in rows] == [r["reference/refreshes"] for r in ref] == [0, 1]
    for key in KEYS:
        a, b = [r.get(key) for r in ref], [r.get(key) for r in rows]
        if all(v is None for v in a):
            assert all(v is None for v in b), key
            continue
        assert b == pytest.approx(a, rel=1e-4, abs=1e-7), key
    checkpoint = sharded / "checkpoints" / "iter_000002"
    assert checkpoint.is_dir() and (checkpoint / "accelerate").is_dir()
    _assert_same_weights(sharded / "final", plain / "final", atol=1e-4)
