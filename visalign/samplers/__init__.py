"""The Sampler contract and the model-family adapters (docs/samplers.md).

``load(model)`` returns a :class:`Sampler` for a built-in name, a local diffusers folder or a
hub id.  Kernels live in :mod:`visalign.samplers.kernels`.
"""

from .collect import Rollout, collect
from .contract import (
    CFGDenoiser,
    Conditioning,
    Denoiser,
    HookResult,
    HookState,
    RandomWindow,
    Sampler,
    Schedule,
    StepOutput,
    Trajectory,
    resolve_sde_steps,
)
from .kernels import KERNELS, ddim_step, flow_cps_step, flow_sde_step, get_kernel, ode_step
from .loading import FAMILIES, ModelNotFoundError, load, register_family, register_model

__all__ = [
    "collect", "Rollout", "CFGDenoiser", "Denoiser",
    "Conditioning", "HookResult", "HookState", "RandomWindow", "Sampler", "Schedule", "StepOutput",
    "Trajectory", "resolve_sde_steps", "KERNELS", "ddim_step", "flow_cps_step", "flow_sde_step",
    "get_kernel", "ode_step", "FAMILIES", "ModelNotFoundError", "load", "register_family", "register_model",
]
