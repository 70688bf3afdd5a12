"""Sharded training through accelerate: FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3.

A run is sharded when it is launched with one of the accelerate configs of ``configs/accelerate/``
(``accelerate launch --config_file configs/accelerate/fsdp2.yaml -m visalign train RECIPE``):
accelerate's launcher passes the config to every process and :func:`make_accelerator` builds the
``Accelerator`` that uses it.  The trainer then prepares the denoiser and its optimizer with
``accelerator.prepare`` (FSDP2 shards the denoiser in place; DeepSpeed wraps it in its engine), lets
the sharded engine reduce the gradients, and saves checkpoints with ``accelerator.save_state``.

Two gaps of accelerate on a machine without GPUs are closed here, each the way accelerate does it on
GPUs:

- accelerate turns on FSDP only for GPU-like devices; on CPU processes (``gloo``) it silently runs
  plain data parallelism although the launch config asked for FSDP.  :func:`adopt_cpu_fsdp` makes the
  accelerator FSDP with the plugin that accelerate builds from the launch config, as accelerate's own
  state does on GPUs; from then on accelerate's FSDP2 code runs unchanged (``prepare``,
  ``clip_grad_norm_``, ``save_state`` / ``load_state``, ``get_state_dict``).
- accelerate runs DeepSpeed only when the accelerator is not forced onto the CPU and a backend is
  known: on CPU the accelerator is built with the ``gloo`` backend (DeepSpeed's CPU accelerator).
"""

from __future__ import annotations

import os

import torch

__all__ = ["launch_kind", "make_accelerator", "adopt_cpu_fsdp", "kind_of", "local", "prepare_deepspeed_config",
           "release_zero3_gathered", "shard_like"]

#: the kinds of sharded run: ``"fsdp"`` (FSDP2) or ``"deepspeed"`` (ZeRO)
KINDS = ("fsdp", "deepspeed")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launch_kind() -> str | None:
    """What the accelerate launch config asks for: ``"fsdp"``, ``"deepspeed"`` or ``None``."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def make_accelerator(*, device: torch.device, mixed_precision: str, log_with=None, project_dir=None):
    """The ``Accelerator`` of a training run on ``device`` (the launch config's sharding included)."""
    from accelerate import Accelerator

    kind = launch_kind()
    cpu = device.type == "cpu"
    kwargs: dict = {}
    if kind == "deepspeed" and cpu:  # accelerate runs DeepSpeed only when not forced onto the CPU
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        cpu = False
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir, **kwargs)
    adopt_cpu_fsdp(acc)
    return acc


def adopt_cpu_fsdp(acc) -> bool:
    """Make ``acc`` an FSDP accelerator when the launch config asked for FSDP and accelerate fell back
    to plain CPU processes (it enables FSDP on GPU-like devices only); True when it did.  The plugin
    is the one accelerate builds from the launch config; only FSDP2 (``fsdp_version: 2``) is taken."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if launch_kind() != "fsdp" or acc.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
    if plugin.fsdp_version != 2:
        raise ValueError("sharded training takes FSDP2: set fsdp_version: 2 in the accelerate config "
                         "(configs/accelerate/fsdp2.yaml)")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's state does on GPUs
    return True


def kind_of(acc) -> str | None:
    """``"fsdp"`` (FSDP2), ``"deepspeed"`` or ``None`` (one process, or data parallelism)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        if not acc.is_fsdp2:
            raise ValueError("sharded training takes FSDP2: set fsdp_version: 2 in the accelerate config "
                             "(configs/accelerate/fsdp2.yaml)")
        return "fsdp"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return None


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds: the local shard of an FSDP2 parameter (a DTensor), the
    partition of a ZeRO-3 parameter, or ``t`` itself.  Elementwise updates of the local parts (an
    EMA) equal the same updates of the whole tensor."""
    if hasattr(t, "ds_tensor"):  # ZeRO-3 partitioned parameter
        return t.ds_tensor
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def release_zero3_gathered(params) -> int:
    """Free the gathered full copies that ZeRO-3 keeps of ``params`` (the small "persistent" weights
    stay gathered between steps), so the next forward gathers them again from the partitions; call it
    after writing the partitions (:func:`local`) outside the optimizer, or the forward keeps using the
    stale full copies.  Returns how many were released."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    held = [p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE]
    if held:
        held[0].partition(param_list=held, has_been_updated=False)
    return len(held)


def prepare_deepspeed_config(acc, *, max_grad_norm: float) -> None:
    """Fill in what the trainer decides in the DeepSpeed config before ``accelerator.prepare``: one
    optimizer step is taken when the trainer says so after any number of backward passes
    (``managed_gradient_accumulation: false``), gradients are clipped to ``max_grad_norm``, the
    micro-batch size is bookkeeping only, and ZeRO-3 gathers the full weights for export."""
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    if cfg.get("train_micro_batch_size_per_gpu") in (None, "auto"):
        cfg["train_micro_batch_size_per_gpu"] = 1
    cfg.pop("train_batch_size", None)
    cfg["gradient_accumulation_steps"] = 1
    cfg["managed_gradient_accumulation"] = False
    cfg["gradient_clipping"] = float(max_grad_norm)
    zero = cfg.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def shard_like(acc, module: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen ``module`` (the reference copy of full fine-tuning) with the run's FSDP2 plugin,
    through accelerate's FSDP2 helper, so it costs a shard per process like the trained denoiser."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(acc, module)
