"""The DPO objective of a pair of clean latents, shared by offline and online DPO.

For a pair (winner ``w``, loser ``l``) of clean latents with the *same* noise ``eps`` and time ``t``:
``x_t = add_noise(x0, eps, t)``, target ``u = training_target(x0, eps, t)`` (``eps``, ``v`` or
``eps - x0``), ``e = mean((pred(x_t, t, c) - u)^2)`` over every latent dimension, ``e_ref`` likewise
with the reference model, and

    h      = -1/2 * ((e_w - e_l) - (e_w_ref - e_l_ref))      the log-ratio margin
    inside = beta * h

``h`` is Diffusion-DPO's estimate of ``log pi(x_w)/pi_ref(x_w) - log pi(x_l)/pi_ref(x_l)`` (Wallace
et al. 2023, eq. 14) with the ELBO's weighting ``T w(lambda_t)`` folded into ``beta``, as the authors'
training script does.  Each ``loss_type`` is a function of ``inside`` (:data:`LOSS_TYPES`):

- ``sigmoid`` (Diffusion-DPO, Flow-DPO): ``-log sigmoid(inside)``;
- ``ipo``: ``(inside - 1/2)^2 = beta^2 (h - 1/(2 beta))^2``, IPO's squared loss;
- ``hinge``: ``max(0, 1 - inside)``, SLiC's calibration loss.

At initialisation (model = reference) ``inside = 0``: the sigmoid loss is ``log 2``, the IPO loss
``1/4`` and the hinge loss ``1``.  docs/dpo.md gives the options and their sources.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_BETA", "default_beta", "LOSS_TYPES", "dpo_loss", "sigmoid_loss", "ipo_loss", "hinge_loss", "DPOPairLoss"]


def sigmoid_loss(inside: torch.Tensor) -> torch.Tensor:
    """Diffusion-DPO's loss ``-log sigmoid(inside)`` (Wallace et al. 2023, "Diffusion Model Alignment
    Using Direct Preference Optimization", eq. 14; Rafailov et al. 2023's DPO loss on the diffusion
    margin).  trl's ``loss_type="sigmoid"`` without label smoothing."""
    return -F.logsigmoid(inside)


def ipo_loss(inside: torch.Tensor) -> torch.Tensor:
    """IPO's squared loss on the diffusion margin, ``(inside - 1/2)^2`` (Azar et al. 2023, "A General
    Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17:
    ``(h - 1/(2 tau))^2`` with the regulariser ``tau = beta``).

    In terms of the log-ratio margin ``h = inside / beta`` this is ``beta^2 (h - 1/(2 beta))^2``:
    trl's ``loss_type="ipo"`` times the constant ``beta^2``, which keeps the gradient on the scale of
    the sigmoid loss (unscaled, the gradient at the reference would be ``2 / beta^2`` of the
    sigmoid's: 8e-8 at the DDPM families' ``beta = 5000``) and leaves the minimiser, ``h = 1/(2 beta)``, unchanged.
    Unlike the sigmoid loss it does not push a pair ranked right further once its margin reaches
    the target."""
    return (inside - 0.5) ** 2


def hinge_loss(inside: torch.Tensor) -> torch.Tensor:
    """SLiC's calibration (hinge) loss on the diffusion margin, ``max(0, 1 - inside)`` (Zhao et al.
    2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", the calibration loss with margin
    ``delta = 1`` and the log-likelihoods relative to the reference as in trl's
    ``loss_type="hinge"``, whose ``beta`` is the inverse of SLiC's margin).  Pairs ranked right by a
    margin of ``1 / beta`` or more give no gradient."""
    return torch.relu(1.0 - inside)


#: ``loss_type`` -> the per-pair loss as a function of ``inside = beta * h`` (``h``: log-ratio margin)
#: beta per family: 5000 for the DDPM families (Diffusion-DPO's SD1.5 and SDXL runs), 100 for the
#: rectified-flow families (Flow-GRPO's SD3.5-M DPO configuration); docs/dpo.md gives the sources
DEFAULT_BETA = {"sd": 5000.0, "sdxl": 5000.0, "sd3": 100.0, "flux": 100.0, "wan": 100.0}
_BY_PARAMETERIZATION = {"eps": 5000.0, "v": 5000.0, "flow": 100.0}


def default_beta(family: str, parameterization: str) -> float:
    """The family's default beta (by parameterisation for a family not in :data:`DEFAULT_BETA`)."""
    return DEFAULT_BETA.get(family, _BY_PARAMETERIZATION.get(parameterization, 100.0))


LOSS_TYPES = {"sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float, loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the term ``inside = -beta/2 ((e_w - e_l) - (e_w_ref - e_l_ref))`` (the
    implicit reward margin; > 0 when the pair is ranked right).

    Args:
        err_w / err_l (`torch.Tensor` of shape `(B,)`): the model's denoising errors on the winners /
            losers.
        ref_w / ref_l (`torch.Tensor` of shape `(B,)`): the reference's.
        beta (`float`): the KL strength.
        loss_type (`str`, *optional*, defaults to `"sigmoid"`): a key of :data:`LOSS_TYPES`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    return LOSS_TYPES[loss_type](inside), inside


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every non-batch dimension (the reference scripts' mean)."""
    return ((pred.float() - target) ** 2).flatten(1).mean(1)


class DPOPairLoss:
    """What offline and online DPO trainers share: ``beta``, the reference, the training-time draws,
    the loss of a micro-batch of pairs and its metrics.  Mixed into a :class:`~..base.Trainer`
    (it uses ``sampler``, ``config``, ``acc`` and ``guards``)."""

    def _check_sampler(self, sampler, config) -> None:
        if config.time_distribution == "logit_normal" and sampler.parameterization != "flow":
            raise ValueError(f"dpo.time_distribution: {sampler.family} is {sampler.parameterization}-prediction and "
                             "trains on integer DDPM timesteps: set time_distribution: uniform (or null)")

    def _setup_pairs(self) -> None:
        """After the trainer floor is built: ``beta`` and the adaptive reference."""
        c, s = self.config, self.sampler
        self.beta = float(c.beta) if c.beta is not None else default_beta(s.family, s.parameterization)
        if c.ref_refresh_every:  # the DPO name of the floor's adaptive reference
            if self.guards.reference_refresh_every not in (0, c.ref_refresh_every):
                raise ValueError(f"dpo.ref_refresh_every ({c.ref_refresh_every}) and "
                                 f"guards.reference_refresh_every ({self.guards.reference_refresh_every}) disagree: "
                                 "set one of them")
            self.guards.reference_refresh_every = c.ref_refresh_every

    # ---- the reference ---------------------------------------------------------------------------
    def reference(self):
        """The reference model: the base (``sampler.reference()``: LoRA off or a kept copy), or, after a
        refresh (``ref_refresh_every`` / ``guards.reference_refresh_every``), the weights of that moment
        (``Sampler.refresh_reference``: a frozen second adapter or module copy)."""
        return self.sampler.reference()

    def encode(self, prompts: list[str]):
        """Conditioning of ``prompts``, each encoded on its own (cached when
        ``run.cache_prompt_embeddings``): an embedding then does not depend on the batch it was first
        encoded in (batched text encoders differ in the last bits), so a resumed run equals an
        uninterrupted one exactly."""
        from visalign.samplers import Conditioning

        encode_one = super().encode  # (a zero-argument super() does not work inside a comprehension)
        return Conditioning.cat([encode_one([p]) for p in prompts])

    # ---- the loss of a micro-batch of pairs -------------------------------------------------------
    def draw_times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training times of ``n`` pairs: integer DDPM timesteps (uniform) or flow noise levels (logit-
        normal by default, optionally shifted)."""
        c = self.config
        flow = self.sampler.parameterization == "flow"
        dist = c.time_distribution or ("logit_normal" if flow else "uniform")
        t = self.sampler.sample_times(n, generator, distribution=dist, logit_mean=c.logit_mean, logit_std=c.logit_std)
        if flow and c.time_shift != 1.0:
            t = c.time_shift * t / (1 + (c.time_shift - 1) * t)
        return t

    def pair_losses(self, x_w: torch.Tensor, x_l: torch.Tensor, cond, noise: torch.Tensor, t: torch.Tensor):
        """Per-pair loss ``(b,)`` and statistics for winners ``x_w`` and losers ``x_l`` (clean latents),
        their conditioning ``cond`` and one shared draw of ``noise`` / ``t`` per pair."""
        from visalign.samplers import Conditioning

        c, s = self.config, self.sampler
        dev = s.device
        x = torch.cat([x_w, x_l]).to(dev)
        nz = torch.cat([noise, noise]).to(dev)
        tt = torch.cat([t, t]).to(dev)
        cc = Conditioning.cat([cond, cond])
        x_t = s.add_noise(x, nz, tt)
        target = s.training_target(x, nz, tt)
        g = c.train_guidance_scale
        with torch.no_grad(), self.reference(), self.acc.autocast():
            ref_err = _mse(s.predict_at(x_t, tt, cc, g), target)
        with self.acc.autocast():
            err = _mse(s.predict_at(x_t, tt, cc, g), target)
        n = x_w.shape[0]
        loss, inside = dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], self.beta, c.loss_type)
        if c.sft_weight > 0:
            loss = loss + c.sft_weight * err[:n]
        e = err.detach()
        return loss, {"inside": inside.detach(), "mse_w": e[:n], "mse_l": e[n:], "ref_mse_w": ref_err[:n],
                      "ref_mse_l": ref_err[n:]}

    def pair_draws(self, x_w: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``timesteps_per_pair`` draws of noise ``(K, n, ...)`` and times ``(K, n)`` for ``n`` pairs, all
        drawn before any update (the same draw for a pair's winner and loser)."""
        k, n = self.config.timesteps_per_pair, x_w.shape[0]
        noise = torch.randn((k, *x_w.shape), generator=gen)
        times = torch.stack([self.draw_times(n, gen) for _ in range(k)])
        return noise, times

    @staticmethod
    def pair_metrics(stats: dict) -> dict:
        """The implicit reward accuracy (pairs with ``inside > 0``), the margin and the denoising errors
        of the pairs an update trained on."""
        if "inside" not in stats:
            return {}
        inside = stats["inside"]
        return {"implicit_acc": float((inside > 0).float().mean()), "margin": float(inside.mean()),
                "model_mse_w": float(stats["mse_w"].mean()), "model_mse_l": float(stats["mse_l"].mean()),
                "ref_mse_w": float(stats["ref_mse_w"].mean()), "ref_mse_l": float(stats["ref_mse_l"].mean())}

    def plot_keys(self, last: dict, final_eval: dict) -> tuple[list[str], list[str]]:
        train, evals = super().plot_keys(last, final_eval)
        return [k for k in ("loss", "implicit_acc", "reward/mean") if k in last] or train, evals
