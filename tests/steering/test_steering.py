"""Inference-time steering (docs/steering.md): resampling statistics, FK invariants (k = 1 is the
plain SDE rollout, lambda = 0 is k independent rollouts, resampling keeps the count and a
consistent lineage, the final weights equal the reference code's, and with final_numerator: reward
every path's potentials multiply to exp(lambda r)),
guidance (scale 0 is unguided, a guided rollout raises a differentiable reward) and every method
on every family."""

import math

import pytest
import torch
from tests_support import Brightness

import visalign.samplers as vs
from visalign.steering import (
    FKConfig,
    FKHook,
    GuidanceConfig,
    RewardGuidance,
    SearchConfig,
    best_of_n,
    fk_steer,
    guided,
    noise_search,
)
from visalign.steering import resampling as rs
from visalign.steering.common import Compute, CountingDenoiser, lookahead_x0

SIZE = {"height": 32, "width": 32}
FAMILIES = [("sd", "eps"), ("sd", "v"), ("sdxl", None), ("sd3", None), ("flux", "dev"), ("wan", None), ("toy", None),
            ("qwenimage", None), ("flux2", None), ("wan", "a14b")]


def _load(tiny_model_dir, family, variant=None):
    if family == "toy":
        return vs.load("toy-shapes"), {}
    options = {"max_sequence_length": 8} if family in ("sd3", "flux", "wan", "qwenimage", "flux2") else {}
    size = dict(SIZE, num_frames=5) if family == "wan" else dict(SIZE)
    return vs.load(str(tiny_model_dir(family, variant)), **options), size


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return _load(tiny_model_dir, "sd3")


# ---- resampling ------------------------------------------------------------------------------

def test_normalise_and_ess():
    w = rs.normalise(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(w, torch.full((4,), 0.25, dtype=torch.float64)) and float(rs.ess(w)) == pytest.approx(4)
    w = rs.normalise(torch.tensor([1000.0, -torch.inf, float("nan"), 0.0]))  # no overflow; -inf / NaN weigh 0
    assert w.tolist()[1:3] == [0.0, 0.0] and float(w[0]) == pytest.approx(1.0) and float(rs.ess(w)) == pytest.approx(1.0)
    w = rs.normalise(torch.tensor([[-torch.inf, -torch.inf]]))  # a group that failed everywhere stays as it is
    assert w.tolist() == [[0.5, 0.5]]
    assert float(rs.ess(torch.tensor([0.5, 0.5, 0.0]))) == pytest.approx(2.0)


@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "systematic"])
def test_resampling_expected_counts(scheme):
    """Each scheme gives particle i k * w_i copies on average (fixed seed, 4000 draws of k = 5:
    the standard error of a mean count is below 0.02); systematic also never strays more than one
    copy from k * w_i, and equal weights return every particle once, in order."""
    w = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.35], dtype=torch.float64)
    k, draws = 5, 4000
    g = torch.Generator().manual_seed(0)
    idx = rs.resample(w.expand(draws, k), scheme, g)
    assert idx.shape == (draws, k) and idx.min() >= 0 and idx.max() < k
    counts = torch.stack([(idx == i).sum(1) for i in range(k)], 1).double()  # (draws, k)
    assert torch.allclose(counts.mean(0), k * w, atol=0.06), (scheme, counts.mean(0))
    assert (counts.sum(1) == k).all()
    if scheme == "systematic":
        assert ((counts - k * w).abs() < 1).all()
    if scheme != "multinomial":
        same = rs.resample(torch.full((k,), 1 / k, dtype=torch.float64), scheme, g)
        assert same.tolist() == list(range(k))
    with pytest.raises(ValueError, match="choose one of"):
        rs.resample(w, "residual")


def test_multinomial_variance_exceeds_systematic():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).expand(3000, 4)
    var = {}
    for scheme in ("multinomial", "stratified", "systematic"):
        idx = rs.resample(w, scheme, torch.Generator().manual_seed(1))
        var[scheme] = float((idx == 3).sum(1).double().var())
    # stratified and systematic are the low-variance schemes (Douc et al. 2005); the two need not be ordered
    assert var["systematic"] < 0.5 * var["multinomial"] and var["stratified"] < 0.5 * var["multinomial"]


# ---- FK: potentials and the final weight ---------------------------------------------------------

@pytest.mark.parametrize("potential", ["difference", "max", "sum", "immediate"])
def test_potentials_multiply_to_the_target(potential):
    """With ``final_numerator: reward``, along any path the intermediate potentials times the final
    weight equal exp(lambda r(x0)): the target is p(x0) exp(lambda r(x0)) whatever the potential."""
    cfg = FKConfig(lam=3.0, potential=potential, resampling="systematic", final_resample=False,
                   final_numerator="reward")
    hook = FKHook(None, None, cfg, 2, 10, metadata=[None] * 2, denoiser=None, compute=Compute())
    hook._reset(2)
    seq = [torch.tensor([0.2, 0.9]), torch.tensor([0.5, 0.1]), torch.tensor([0.4, 0.3])]
    expected = {"difference": [3 * 0.2, 3 * 0.3, 3 * -0.1], "max": [0.6, 1.5, 1.5], "sum": [0.6, 2.1, 3.3],
                "immediate": [0.6, 1.5, 1.2]}[potential]
    for t, r in enumerate(seq):
        lg = hook._log_potential(r.double())
        hook.log_applied += lg
        hook.log_w += lg.view(1, 2)
        assert float(lg[0]) == pytest.approx(expected[t])
    final = torch.tensor([0.7, 0.6])
    hook.finalize(final, None)
    # carried log-weight = sum of all potentials on the path = lambda * r(x0)
    assert torch.allclose(hook.log_w.flatten(), 3.0 * final.double())


def _reference_fk_weights(rewards, parents, potential, lam, reward_min_value=0.0):
    """The FK reference implementation's normalised weights at every resampling step and the
    final step (Singhal et al. 2025, ``fkd_class.py``, resampling at every step of the schedule),
    transcribed for one group of k particles.

    ``rewards[t] (k,)``: the scores of the particles present at resampling step t (the last entry
    is the final step); ``parents[t] (k,)``: the ancestors drawn at step t (all but the final one).
    Each particle carries ``population_rs`` (starts at ``reward_min_value``) and the product of the
    potentials it received; at the final step ``w = exp(lambda * rs) / product`` for max / sum /
    immediate (``rs`` after the running max / sum update), the plain potential for difference."""
    k = rewards[0].shape[0]
    population_rs = torch.full((k,), reward_min_value, dtype=torch.float64)
    product = torch.ones(k, dtype=torch.float64)
    last = len(rewards) - 1
    out = []
    for t, scores in enumerate(rewards):
        cur = scores.double()
        if potential == "max":
            cur = torch.max(cur, population_rs)
            w = torch.exp(lam * cur)
        elif potential == "sum":
            cur = cur + population_rs
            w = torch.exp(lam * cur)
        elif potential == "difference":
            w = torch.exp(lam * (cur - population_rs))
        else:
            w = torch.exp(lam * cur)
        if t == last:
            if potential in ("max", "sum", "immediate"):
                w = torch.exp(lam * cur) / product
            return out + [w / w.sum()]
        out.append(w / w.sum())
        idx = torch.as_tensor(parents[t])
        population_rs = cur[idx]
        product = product[idx] * w[idx]


# 2 groups x 3 particles; 3 intermediate resampling steps and the final scores (group 1 scores
# below 0 throughout, so the max potential's floor at 0 matters)
_FK_REWARDS = [torch.tensor([-0.4, 0.3, 0.1, -0.6, -0.2, -0.05]), torch.tensor([0.2, -0.5, 0.7, -0.1, -0.4, -0.3]),
               torch.tensor([-0.3, 0.1, 0.5, -0.2, -0.9, -0.6]), torch.tensor([0.35, -0.25, 0.15, -0.8, -0.4, -0.1])]


@pytest.mark.parametrize("potential,max_start", [("difference", 0.0), ("max", 0.0), ("max", None), ("sum", 0.0),
                                                 ("immediate", 0.0)])
def test_final_weights_equal_the_reference_implementation(potential, max_start):
    """FK's final weights (default ``final_numerator: potential``) equal the reference code's on
    the same ancestry: ``exp(lambda S_T) / prod G`` with ``S_T`` the running max (from 0) or the
    running sum including r_T; the ESS of every intermediate resampling step is the reference's
    too.  ``max_start: null`` is the reference with ``reward_min_value = -inf``.  With
    ``final_numerator: reward`` max and sum differ."""
    lam, k = 2.0, 3
    weights = {}
    for numerator in ("potential", "reward"):
        cfg = FKConfig(lam=lam, potential=potential, max_start=max_start, final_resample=False,
                       final_numerator=numerator)
        hook = FKHook(None, None, cfg, k, 10, metadata=[None] * 2 * k, denoiser=None, compute=Compute(), seed=3)
        hook._reset(2 * k)
        for t, r in enumerate(_FK_REWARDS[:-1]):
            assert hook.weigh(r, t) is not None  # not adaptive: every step resamples
        res = hook.finalize(_FK_REWARDS[-1], None)
        weights[numerator] = res["weights"].double()
        if numerator == "potential":
            events = hook.events
    for g in range(2):
        rows = slice(g * k, (g + 1) * k)
        ref = _reference_fk_weights([r[rows] for r in _FK_REWARDS], [ev["parents"][g] for ev in events], potential,
                                    lam, -math.inf if max_start is None else max_start)
        assert [ev["ess"][g] for ev in events] == pytest.approx([float(1 / (w**2).sum()) for w in ref[:-1]], abs=1e-9)
        assert torch.allclose(weights["potential"][g], ref[-1], atol=1e-6), (g, weights["potential"][g], ref[-1])
    if potential in ("max", "sum"):
        assert not torch.allclose(weights["potential"], weights["reward"], atol=1e-3)
    else:
        assert torch.allclose(weights["potential"], weights["reward"], atol=1e-7)


def test_max_potential_starts_from_zero_like_the_reference():
    """The reference's running max starts at reward_min_value = 0: negative first scores all get the
    potential exp(0); max_start: null starts from the particle's own first score."""
    r = torch.tensor([-0.5, -0.1, 0.3], dtype=torch.float64)
    for start, expected in ((0.0, [0.0, 0.0, 0.6]), (None, [-1.0, -0.2, 0.6])):
        hook = FKHook(None, None, FKConfig(lam=2.0, potential="max", max_start=start), 3, 10, metadata=[None] * 3,
                      denoiser=None, compute=Compute())
        hook._reset(3)
        assert hook._log_potential(r).tolist() == pytest.approx(expected)


def test_fk_with_one_particle_is_the_plain_sde_rollout(sd3):
    """k = 1: resampling always keeps the one particle and draws nothing from the particle's
    generator, so FK's image is the SDE rollout of the same seed."""
    sampler, size = sd3
    cfg = FKConfig(resample_every=1, resample_start=0, resample_end=None)
    res = fk_steer(sampler, ["a red cube", "a cat"], Brightness(), cfg, particles=1, num_steps=4, guidance_scale=2.0,
                   seed=11, size=size)
    with torch.no_grad():
        traj = sampler.rollout(["a red cube", "a cat"], num_steps=4, guidance_scale=2.0, kernel="flow_sde",
                               sde_steps=[0, 1, 2],  # FK takes the last step with the ODE (ode_last_step)
                               generator=[torch.Generator().manual_seed(s) for s in (11, 12)], **size)
        plain = sampler.decode(traj.final).float()
    assert torch.equal(res.images, plain)
    assert res.compute["denoiser_calls"] == 4 * 2  # 4 steps x (cond + uncond)
    assert res.compute["reward_calls"] == 3 + 1  # steps 0..2 and the final image
    noisy = fk_steer(sampler, ["a red cube", "a cat"], Brightness(), FKConfig(ode_last_step=False), particles=1,
                     num_steps=4, guidance_scale=2.0, seed=11, size=size)
    with torch.no_grad():
        traj = sampler.rollout(["a red cube", "a cat"], num_steps=4, guidance_scale=2.0, kernel="flow_sde",
                               generator=[torch.Generator().manual_seed(s) for s in (11, 12)], **size)
    assert torch.equal(noisy.images, sampler.decode(traj.final).float())


@pytest.mark.parametrize("scheme,adaptive", [("systematic", False), ("stratified", False), ("multinomial", True)])
def test_fk_with_lambda_zero_is_k_independent_rollouts(sd3, scheme, adaptive):
    """lambda = 0: equal weights, so systematic / stratified resampling keep every particle in place
    and adaptive resampling never fires (ESS = k): the particles are best-of-N's candidates on the
    same kernel and seeds."""
    sampler, size = sd3
    cfg = FKConfig(lam=0.0, resampling=scheme, adaptive=adaptive, resample_every=1, resample_start=0, resample_end=None)
    kw = dict(num_steps=3, guidance_scale=2.0, seed=5, size=size, keep_particles=True)
    fk = fk_steer(sampler, ["a red cube", "a cat"], Brightness(), cfg, particles=3, **kw)
    bon = best_of_n(sampler, ["a red cube", "a cat"], Brightness(), n=3, kernel="flow_sde", sde_steps=[0, 1], **kw)
    for a, b in zip(fk.items, bon.items):
        assert torch.equal(a.particles, b.particles)
        assert a.particle_rewards == pytest.approx(b.particle_rewards)
        assert a.chosen == b.chosen and a.extra["origin"] == [0, 1, 2]


def test_resampling_keeps_particle_count_and_a_consistent_lineage(sd3):
    """Strong lambda, resampling after every step: the batch keeps k rows per prompt, and the
    recorded history of each final particle is, step by step, the sample of the ancestor that its
    lineage names (the trajectory the rollout reordered agrees with the parents the hook logged)."""
    sampler, size = sd3
    k, steps = 4, 4
    cfg = FKConfig(lam=200.0, resampling="multinomial", resample_every=1, resample_start=0, resample_end=None,
                   final_resample=False)
    cond = sampler.encode(["a red cube"] * k + ["a cat"] * k)
    hook = FKHook(sampler, Brightness(), cfg, k, steps, metadata=[None] * 2 * k,
                  denoiser=CountingDenoiser(sampler, 2.0), compute=Compute(), seed=3)
    seen = []  # each step's samples before the FK hook reorders them

    def record(state):
        seen.append(state.latents.clone())

    with torch.no_grad():
        traj = sampler.rollout(cond, num_steps=steps, guidance_scale=2.0, kernel="flow_sde", hooks=[record, hook],
                               generator=[torch.Generator().manual_seed(s) for s in range(2 * k)], **size)
    assert traj.latents.shape[0] == 2 * k and traj.cond.prompts == ["a red cube"] * k + ["a cat"] * k
    for g in range(2):
        events, origin = hook.lineage(g)
        assert [e["step"] for e in events] == [0, 1, 2] and all(e["resampled"] for e in events)
        assert any(len(set(e["parents"])) < k for e in events)  # lambda = 200 does select
        for j in range(k):
            anc = j  # walk back from the final particle j
            for step in reversed(range(3)):
                anc = events[step]["parents"][anc]
                assert torch.equal(traj.latents[g * k + j, step + 1], seen[step][g * k + anc])
        assert 0 <= min(origin) and max(origin) < k


def test_adaptive_resampling_fires_only_below_the_ess_threshold(sd3):
    sampler, size = sd3
    cfg = FKConfig(lam=0.0, adaptive=True, resample_every=1, resample_start=0, resample_end=None)
    res = fk_steer(sampler, ["a cat"], Brightness(), cfg, particles=4, num_steps=3, guidance_scale=2.0, size=size)
    assert not any(e["resampled"] for e in res.items[0].lineage)
    assert all(e["ess"] == pytest.approx(4.0) for e in res.items[0].lineage)
    cfg = FKConfig(lam=1e4, adaptive=True, resample_every=1, resample_start=0, resample_end=None)
    res = fk_steer(sampler, ["a cat"], Brightness(), cfg, particles=4, num_steps=3, guidance_scale=2.0, size=size)
    assert all(e["resampled"] == (e["ess"] < 2.0) for e in res.items[0].lineage)
    assert any(e["resampled"] for e in res.items[0].lineage)


def test_fk_raises_the_reward_over_its_own_proposal():
    """On the shipped toy model, FK with brightness as the potential ends brighter than lambda = 0
    (the same particles without selection): the selection does work (paired seeds)."""
    sampler = vs.load("toy-shapes")
    prompts = ["a circle", "a red square", "two triangles", "a blue circle"]
    kw = dict(particles=4, num_steps=6, seed=0, prompts_per_batch=4)
    sched = dict(resample_every=1, resample_start=1, resample_end=4, resampling="systematic", select="weighted")
    hot = fk_steer(sampler, prompts, Brightness(), FKConfig(lam=200.0, **sched), **kw)
    cold = fk_steer(sampler, prompts, Brightness(), FKConfig(lam=0.0, **sched), **kw)
    assert float(hot.rewards.mean()) > float(cold.rewards.mean()) + 0.005


def test_lookahead_with_every_remaining_step_is_the_ode_continuation(sd3):
    sampler, size = sd3
    cond = sampler.encode(["a cat", "a dog"])
    den = CountingDenoiser(sampler, 2.0)
    with torch.no_grad():
        traj = sampler.rollout(cond, num_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **size)
        x = lookahead_x0(den, traj.latents[:, 1], traj.schedule, 1, 3, cond)
        coarse = lookahead_x0(den, traj.latents[:, 1], traj.schedule, 1, 1, cond)
    assert torch.allclose(x, traj.final, atol=1e-5)
    assert den.calls == (3 + 1) * 2 * 2 and not torch.allclose(coarse, traj.final, atol=1e-3)


# ---- guidance --------------------------------------------------------------------------------

def test_guidance_scale_zero_is_the_unguided_rollout(sd3):
    sampler, size = sd3
    kw = dict(num_steps=3, guidance_scale=2.0, seed=4, size=size)
    plain = best_of_n(sampler, ["a red cube", "a cat"], Brightness(), n=1, **kw)
    zero = guided(sampler, ["a red cube", "a cat"], Brightness(), GuidanceConfig(scale=0.0), **kw)
    assert torch.equal(plain.images, zero.images)
    assert zero.compute["denoiser_grad_calls"] == 0


@pytest.mark.parametrize("family,variant,through", [("sd3", None, True), ("sd", "eps", True), ("sd", "v", False),
                                                    ("toy", None, False)])
def test_guided_rollout_raises_a_differentiable_reward(tiny_model_dir, family, variant, through):
    """The sign and scale of the guidance term in each parameterisation (flow, eps, v): brightness
    of the guided images is above the unguided ones of the same seeds, for every pair."""
    sampler, size = _load(tiny_model_dir, family, variant)
    prompts = ["a red cube", "a cat", "a circle", "a blue ball"] if family != "toy" else ["a circle", "a red square",
                                                                                          "two triangles", "a blue circle"]
    kw = dict(num_steps=4, guidance_scale=2.0, seed=0, size=size)
    plain = best_of_n(sampler, prompts, Brightness(), n=1, **kw)
    cfg = GuidanceConfig(scale=30.0 if family == "toy" else 300.0, max_grad_norm=None, through_denoiser=through)
    up = guided(sampler, prompts, Brightness(), cfg, **kw)
    assert (up.rewards > plain.rewards).all(), (plain.rewards, up.rewards)
    assert up.compute["denoiser_grad_calls"] == (4 if through else 0)


def test_guidance_term_matches_the_score_formula(sd3):
    """The wrapper subtracts w * s / (1 - s) * g from the velocity (flow), with g the gradient of the
    reward of the decoded x0-prediction, clipped per sample."""
    from visalign.samplers.kernels import predict_x0

    sampler, size = sd3
    cond = sampler.encode(["a cat", "a dog"])
    x = sampler.noise(2, torch.Generator().manual_seed(0), **size).float()
    sched = sampler.schedule(4, x)
    base = CountingDenoiser(sampler, 2.0)
    cfg = GuidanceConfig(scale=2.5, max_grad_norm=1e-3, through_denoiser=False)
    out = RewardGuidance(base, sampler, Brightness(), cfg)(x, 2, sched, cond)
    with torch.no_grad():
        pred = base(x, 2, sched, cond)
    xr = x.clone().requires_grad_(True)
    r = Brightness()(sampler.decode(predict_x0(pred, xr, sched, 2)), ["a cat", "a dog"]).scores
    (g,) = torch.autograd.grad(r.sum(), xr)
    g = g * (1e-3 / g.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    s = float(sched.sigmas[2])
    assert torch.allclose(out, pred - 2.5 * s / (1 - s) * g, atol=1e-6)


def test_guided_proposal_weights_by_the_base_transition(sd3):
    """FK + guidance: the log-weight of a guided step is log p(x'|x) - log q(x'|x) of the two
    Gaussian transitions, summed over dimensions; 0 when the guidance scale is 0."""
    sampler, size = sd3
    cfg = FKConfig(lam=0.0, resampling="systematic", resample_every=100, resample_start=100, resample_end=None,
                   final_resample=False)
    kw = dict(particles=2, num_steps=3, guidance_scale=2.0, seed=1, size=size)
    zero = fk_steer(sampler, ["a cat"], Brightness(), cfg, proposal=GuidanceConfig(scale=0.0), **kw)
    assert zero.items[0].extra["final_weights"] == [0.5, 0.5]
    from visalign.samplers.kernels import flow_sde_step

    x = sampler.noise(2, torch.Generator().manual_seed(0), **size).float()
    sched = sampler.schedule(3, x)
    cond = sampler.encode(["a cat"] * 2)
    base = CountingDenoiser(sampler, 2.0)
    wrapper = RewardGuidance(base, sampler, Brightness(), GuidanceConfig(scale=300.0))
    q = flow_sde_step(wrapper(x, 1, sched, cond), x, sched, 1, generator=torch.Generator().manual_seed(2))
    hook = FKHook(sampler, Brightness(), cfg, 2, 3, metadata=[None] * 2, denoiser=base, compute=Compute(),
                  proposal=wrapper)
    state = vs.HookState(sampler, 1, q.prev_sample, q, sched, cond, cond.prompts)
    ratio = hook._proposal_log_ratio(state)
    p = flow_sde_step(wrapper.last[2], x, sched, 1, prev_sample=q.prev_sample)
    sq = lambda m: ((q.prev_sample - m) ** 2).flatten(1).sum(1).double()  # noqa: E731
    expected = -(sq(p.mean) - sq(q.mean)) / (2 * float(q.std) ** 2)
    assert torch.allclose(ratio, expected, rtol=1e-4) and ratio.abs().max() > 1e-3


# ---- every method on every family ----------------------------------------------------------

class _ChunkCheck(Brightness):
    """Brightness that records the batch sizes it is called with."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def score(self, images, prompts, references, metadata):
        self.sizes.append(images.shape[0])
        return super().score(images, prompts, references, metadata)


@pytest.mark.parametrize("family,variant", FAMILIES, ids=[f + (f"-{v}" if v else "") for f, v in FAMILIES])
def test_every_method_on_every_family(tiny_model_dir, family, variant):
    sampler, size = _load(tiny_model_dir, family, variant)
    prompts = ["a red circle", "a blue square"] if family == "toy" else ["a red cube", "a dog runs"]
    kw = dict(num_steps=2, guidance_scale=2.0, seed=0, size=size, keep_history=True)
    cfg = FKConfig(resample_every=1, resample_start=0, resample_end=None, score_batch_size=1, lookahead=1)
    reward = _ChunkCheck()
    fk = fk_steer(sampler, prompts, reward, cfg, particles=2, **kw)
    assert set(reward.sizes) == {1}  # every decode + score one particle at a time (bounded memory)
    shape = (2, 5, 3, 32, 32) if family == "wan" else (2, 3, 32, 32)
    if family == "toy":
        shape = (2, 3, 32, 32)
    assert fk.images.shape == shape and torch.isfinite(fk.rewards).all()
    cfg_calls = 2 if sampler.guidance == "cfg" else 1
    # per image: 2 particles x 2 steps, plus a 1-step look-ahead per particle at step 0
    assert fk.compute["denoiser_calls"] == (2 * 2 + 2) * cfg_calls
    assert [lab for lab, _, _ in fk.items[0].history] == ["step 1", "final"]
    gcfg = GuidanceConfig(scale=1.0, chunk_size=1, through_denoiser=family != "wan")
    runs = {
        "bon": best_of_n(sampler, prompts, Brightness(), n=2, **kw),
        "guidance": guided(sampler, prompts, Brightness(), gcfg, **kw),
        "fk+guidance": fk_steer(sampler, prompts, Brightness(), FKConfig(resample_every=1, resample_start=0),
                                particles=2, proposal=gcfg, **kw),
        "search": noise_search(sampler, prompts, Brightness(), SearchConfig(rounds=2, radius=0.5), candidates=2, **kw),
    }
    for name, res in runs.items():
        assert res.method == name and len(res.items) == 2 and res.images.shape == shape, name
        assert all(math.isfinite(it.reward) for it in res.items), name
    assert runs["bon"].compute["denoiser_calls"] == 2 * 2 * cfg_calls
    assert runs["search"].compute["denoiser_calls"] == 2 * 2 * 2 * cfg_calls  # rounds x candidates x steps
    best = runs["bon"].items[0]
    assert best.reward == max(best.particle_rewards)


def test_search_never_loses_its_best_and_radius_one_is_random_search(sd3):
    sampler, size = sd3
    kw = dict(num_steps=2, guidance_scale=2.0, seed=3, size=size)
    res = noise_search(sampler, ["a cat"], Brightness(), SearchConfig(rounds=3, radius=0.3), candidates=3, **kw)
    rounds = res.items[0].lineage
    assert len(rounds) == 3
    best_seen = max(max(r["scores"]) for r in rounds)
    assert res.items[0].reward == pytest.approx(best_seen)
    item = res.items[0]
    assert item.particle_rewards[item.chosen] == pytest.approx(best_seen)
    assert rounds[item.extra["best_round"] - 1]["scores"] == item.particle_rewards
    with pytest.raises(ValueError, match="radius"):
        SearchConfig(radius=0.0)


def test_config_errors_teach():
    with pytest.raises(ValueError, match="potential must be one of"):
        FKConfig(potential="maximum")
    with pytest.raises(ValueError, match="resampling must be one of"):
        FKConfig(resampling="residual")
    with pytest.raises(ValueError, match=r"final_numerator must be one of \['potential', 'reward'\], got 'target'"):
        FKConfig(final_numerator="target")
    with pytest.raises(ValueError, match="window"):
        FKConfig(resample_start=5, resample_end=2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        GuidanceConfig(schedule="cosine")
    from visalign.steering import SteerConfig

    with pytest.raises(ValueError, match="Did you mean 'fk'"):
        SteerConfig(method="fkk")
    assert FKConfig(resample_every=5, resample_start=5, resample_end=30).resample_steps(100) == [5, 10, 15, 20, 25, 30]
    assert FKConfig(resample_every=2, resample_start=2, resample_end=None).resample_steps(10) == [2, 4, 6, 8]


def test_guidance_refuses_a_reward_without_gradient(sd3):
    import visalign.rewards as vr

    sampler, size = sd3
    with pytest.raises(ValueError, match="differentiable"):
        guided(sampler, ["a circle"], vr.load("shapes"), GuidanceConfig(), num_steps=2, size=size)
    with pytest.raises(ValueError, match="stochastic kernel"):
        fk_steer(sampler, ["a cat"], Brightness(), FKConfig(), kernel="ode", num_steps=2, size=size)


def test_the_methods_share_one_signature_and_one_resolution(sd3):
    """``run_*(sampler, reward, config, call)`` for every method, ``call`` resolved once with the
    model card's defaults; the convenience functions are exactly a resolved call and that run."""
    import inspect

    from visalign.steering import SteerCall, run_best_of_n, run_fk, run_guidance, run_search

    for run in (run_best_of_n, run_fk, run_guidance, run_search):
        assert list(inspect.signature(run).parameters)[:4] == ["sampler", "reward", "config", "call"], run
    sampler, size = sd3
    call = SteerCall.resolve(sampler, ["a cat", "a dog"], particles=2, size=size)
    assert (call.num_steps, call.guidance_scale, call.kernel) == (sampler.default_steps, sampler.default_guidance, "ode")
    assert call.rows == ["a cat", "a cat", "a dog", "a dog"] and call.metadata == [None, None] and call.batch_size == 4
    with pytest.raises(ValueError, match="particles must be >= 1"):
        SteerCall.resolve(sampler, ["a cat"], particles=0)
    kw = dict(num_steps=2, guidance_scale=2.0, seed=1, size=size)
    call = SteerCall.resolve(sampler, ["a cat", "a dog"], particles=2, kernel="flow_sde", **kw)
    a = run_fk(sampler, Brightness(), FKConfig(resample_every=1, resample_start=0), call)
    b = fk_steer(sampler, ["a cat", "a dog"], Brightness(), FKConfig(resample_every=1, resample_start=0), particles=2, **kw)
    assert torch.equal(a.images, b.images) and a.settings == b.settings
