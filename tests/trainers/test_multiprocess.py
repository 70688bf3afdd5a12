"""Two CPU processes under accelerate: each holds whole groups, gradients are averaged, one set of
outputs is written.

accelerate 1.15's `launch --cpu --num_processes 2` starts ONE process unless an MPI hostfile is
given (its multi-CPU path is mpirun); `launch --multi_gpu --num_processes 2` on a machine without
GPUs starts two torchrun workers that accelerate runs as MULTI_CPU over gloo, which is what a CPU
test of the distributed path needs (docs/grpo.md, "Several processes")."""

import json
import os
import subprocess

import pytest

from visalign.testing import accelerate_command


def test_two_process_cpu_training(tiny_model_dir, tmp_path):
    accelerate = accelerate_command() or pytest.skip("the accelerate command is not installed")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na cat\na dog\n")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        f"model: {{name: {tiny_model_dir('sd3')}, options: {{max_sequence_length: 8}}, height: 32, width: 32}}\n"
        f"data: {{train: {prompts}, eval: null}}\n"
        "rewards: {jpeg_incompressibility: 1.0}\n"
        "lora: {rank: 4, alpha: 4}\n"
        "grpo: {group_size: 2, prompts_per_iteration: 2, num_steps: 3, train_batch_size: 2, guidance_scale: 2.0}\n"
        f"run: {{run_dir: {tmp_path / 'run'}, iterations: 2, checkpoint_every: 1, progress: false}}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "visalign", "train", str(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]  # written once, by the main process
    assert all(r["optimizer_steps"] >= 1 or r["groups/kept_fraction"] == 0 for r in rows)
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "processes: 2" in out.stdout
    # two processes of one group each: geometry that does not split is refused with advice
    bad = subprocess.run(cmd + ["grpo.prompts_per_iteration=3"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "multiple of the number of processes" in (bad.stdout + bad.stderr), bad.stdout[-2000:] + bad.stderr[-2000:]
