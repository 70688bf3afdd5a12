"""One steering recipe (``configs/steer/*.yaml``) as a typed :class:`SteerConfig`, and :func:`steer`,
which runs the recipe's method.

```yaml
model: {name: toy-shapes}
prompts: toy:eval            # a prompt source (file or registered set); or prompt: "a red circle"
method: fk                   # bon | fk | guidance | fk+guidance | search
reward: shapes-proxy         # the steering reward (spec string, visalign rewards)
particles: 4                 # k: particles (fk), candidates (bon, search per round)
steps: 10
guidance: 3.0                # classifier-free guidance scale (null = the model card's)
fk: {lam: 10.0, potential: difference, resample_every: 2, resample_start: 2, resample_end: 8}
reward_guidance: {scale: 1.0, max_grad_norm: null}
run: {out: runs/steer_toy, prompts_per_batch: 8, threads: 1}
```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .best_of_n import run_best_of_n
from .common import SteerCall
from .fk import FKConfig, default_kernel, run_fk
from .guidance import GuidanceConfig, run_guidance
from .search import SearchConfig, run_search

__all__ = ["SteerConfig", "SteerModel", "SteerRun", "METHODS", "steer"]

METHODS = ("bon", "fk", "guidance", "fk+guidance", "search")


@dataclass
class SteerModel:
    #: built-in name (toy-shapes), local diffusers folder or hub id
    name: str = "toy-shapes"
    #: weights' dtype: float32 (null = the model's), bfloat16, float16
    dtype: str | None = None
    #: cpu (null), cuda, cuda:1 ...
    device: str | None = None
    #: family adapter options, e.g. {max_sequence_length: 128}
    options: dict[str, Any] = field(default_factory=dict)
    #: a LoRA folder to steer with (``RUN/final`` of ``visalign train``); null = the model alone
    lora: str | None = None
    #: generation size in pixels / frames (null = the model's default)
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None

    def size(self) -> dict[str, int]:
        return {k: v for k, v in dict(height=self.height, width=self.width, num_frames=self.num_frames).items() if v}


@dataclass
class SteerRun:
    #: output folder: images/, grids/, manifest.jsonl, config.yaml
    out: str = "runs/steer"
    #: torch CPU threads (null = auto: the cores other processes leave free)
    threads: int | None = None
    #: prompts steered per rollout (the batch is this times the particles)
    prompts_per_batch: int = 4
    #: steered images per prompt (image m of prompt j is job j * images_per_prompt + m)
    images_per_prompt: int = 1
    #: a PNG per image: particles over time, the chosen one marked (images only; video: first frame)
    grid: bool = True
    #: also save every final particle / candidate
    save_particles: bool = False
    #: video container for video models
    video_format: str = "gif"

    def __post_init__(self) -> None:
        if self.prompts_per_batch < 1 or self.images_per_prompt < 1:
            raise ValueError(f"run.prompts_per_batch and run.images_per_prompt must be >= 1, got "
                             f"{self.prompts_per_batch} and {self.images_per_prompt}")
        if self.video_format not in ("gif", "mp4"):
            raise ValueError(f"run.video_format must be gif or mp4, got {self.video_format!r}")


@dataclass
class SteerConfig:
    model: SteerModel = field(default_factory=SteerModel)
    #: a prompt source: .txt / .jsonl / .json file or a registered set (toy:eval)
    prompts: str | None = None
    #: or one prompt
    prompt: str | None = None
    #: bon | fk | guidance | fk+guidance | search
    method: str = "fk"
    #: the steering reward (spec, e.g. shapes-proxy, aesthetic, "clipscore:model=ViT-L-14")
    reward: str = "shapes-proxy"
    #: the reward whose gradient guides (guidance, fk+guidance); null = `reward`
    guidance_reward: str | None = None
    #: options passed to every reward that takes them (device, dtype, model paths)
    reward_options: dict[str, Any] = field(default_factory=dict)
    #: k: FK particles, best-of-N candidates, noise-search candidates per round
    particles: int = 4
    #: denoising steps (null = the model card's)
    steps: int | None = None
    #: classifier-free guidance scale (null = the model card's)
    guidance: float | None = None
    #: sampling kernel (null: fk -> flow_sde / ddim; others -> ode)
    kernel: str | None = None
    kernel_options: dict[str, Any] = field(default_factory=dict)
    #: particle q of image j uses seed + j * particles + q
    seed: int = 0
    fk: FKConfig = field(default_factory=FKConfig)
    reward_guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    run: SteerRun = field(default_factory=SteerRun)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            import difflib

            close = difflib.get_close_matches(self.method, METHODS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"method {self.method!r} is not a steering method.{hint} Choose one of {', '.join(METHODS)}")
        if self.particles < 1:
            raise ValueError(f"particles must be >= 1, got {self.particles}")
        if self.prompt is not None and self.prompts is not None:
            raise ValueError("give prompt (one) or prompts (a source), not both")

    def settings(self) -> dict:
        return asdict(self)


def steer(sampler, prompts: Sequence[str], reward: Callable, config: SteerConfig, *,
          metadata: Sequence[dict | None] | None = None, guidance_reward: Callable | None = None,
          seed: int | None = None, keep_history: bool = False, keep_particles: bool = False,
          on_item: Callable | None = None, progress: bool | str = False):
    """Run ``config.method`` on ``prompts`` (one steered image each) and return its
    :class:`~visalign.steering.common.SteerResult`.

    The settings every method shares are resolved once (:class:`~visalign.steering.common.SteerCall`):
    ``particles`` is ``k`` (1 guided sample per image for ``guidance``), the kernel defaults to FK's
    stochastic one for ``fk`` / ``fk+guidance`` and to the ODE otherwise."""
    m = config.method
    call = SteerCall.resolve(
        sampler, prompts, particles=1 if m == "guidance" else config.particles, metadata=metadata,
        num_steps=config.steps, guidance_scale=config.guidance, kernel=config.kernel,
        default_kernel=default_kernel(sampler) if m in ("fk", "fk+guidance") else "ode",
        kernel_options=config.kernel_options, seed=config.seed if seed is None else seed,
        prompts_per_batch=config.run.prompts_per_batch, keep_history=keep_history, keep_particles=keep_particles,
        on_item=on_item, progress=progress, size=config.model.size())
    if m == "bon":
        return run_best_of_n(sampler, reward, None, call)
    if m == "fk":
        return run_fk(sampler, reward, config.fk, call)
    if m == "fk+guidance":
        return run_fk(sampler, reward, config.fk, call, proposal=config.reward_guidance,
                      proposal_reward=guidance_reward or reward)
    if m == "guidance":
        return run_guidance(sampler, guidance_reward or reward, config.reward_guidance, call, score_reward=reward)
    return run_search(sampler, reward, config.search, call)
