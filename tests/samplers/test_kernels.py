"""Kernels against the published formulas (docs/samplers.md, docs/grpo.md), computed independently here in float64."""

import math

import pytest
import torch

from visalign.samplers import Schedule, ddim_step, flow_cps_step, flow_sde_step, get_kernel, ode_step


def flow_schedule(sigmas):
    s = torch.tensor(sigmas, dtype=torch.float32)
    return Schedule("flow", timesteps=s[:-1] * 1000, sigmas=s)


def gauss_logprob_mean(x, mu, std):
    """log N(x; mu, std^2), averaged over non-batch dims, float64."""
    x, mu = x.double(), mu.double()
    lp = -((x - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


@pytest.fixture
def xv():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_flow_sde_matches_reference(xv, i):
    x, v = xv
    sched = flow_schedule([1.0, 0.8, 0.5, 0.0])
    a = 0.7
    s, s_next = [1.0, 0.8, 0.5, 0.0][i], [1.0, 0.8, 0.5, 0.0][i + 1]
    dt = s_next - s
    s_den = 0.8 if s == 1.0 else s  # at s == 1 the second sigma replaces s in the denominator
    std = a * math.sqrt(s / (1 - s_den))
    xd, vd = x.double(), v.double()
    mu = xd + (vd + std**2 / (2 * s) * (xd + (1 - s) * vd)) * dt
    out = flow_sde_step(v, x, sched, i, generator=torch.Generator().manual_seed(1), noise_level=a)
    assert torch.allclose(out.mean.double(), mu, atol=1e-5)
    assert math.isclose(float(out.std), std * math.sqrt(-dt), rel_tol=1e-5)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).double()
    assert torch.allclose(out.prev_sample.double(), mu + std * math.sqrt(-dt) * z, atol=1e-5)
    expected = gauss_logprob_mean(out.prev_sample, mu, std * math.sqrt(-dt))
    assert torch.allclose(out.log_prob.double(), expected, atol=1e-4)
    # scoring the stored transition gives the same log-prob (ratio 1)
    again = flow_sde_step(v, x, sched, i, prev_sample=out.prev_sample, noise_level=a)
    assert torch.equal(again.log_prob, out.log_prob)


def test_flow_sde_a0_is_euler(xv):
    x, v = xv
    sched = flow_schedule([1.0, 0.6, 0.0])
    out = flow_sde_step(v, x, sched, 1, generator=torch.Generator().manual_seed(0), noise_level=0.0)
    euler = ode_step(v, x, sched, 1)
    assert torch.allclose(out.prev_sample, x + v * (0.0 - 0.6), atol=1e-6)
    assert torch.equal(out.prev_sample, euler.prev_sample)
    assert out.log_prob is None


@pytest.mark.parametrize("log_prob_type", ["mse", "gaussian"])
def test_flow_cps_matches_reference(xv, log_prob_type):
    x, v = xv
    sched = flow_schedule([1.0, 0.7, 0.3, 0.0])
    a, i = 0.8, 1
    s, s_next = 0.7, 0.3
    s_noise = s_next * math.sin(a * math.pi / 2)
    xd, vd = x.double(), v.double()
    x0, x1 = xd - s * vd, xd + (1 - s) * vd
    mu = (1 - s_next) * x0 + math.sqrt(s_next**2 - s_noise**2) * x1
    out = flow_cps_step(v, x, sched, i, generator=torch.Generator().manual_seed(2), noise_level=a,
                        log_prob_type=log_prob_type)
    assert torch.allclose(out.mean.double(), mu, atol=1e-5)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).double()
    assert torch.allclose(out.prev_sample.double(), mu + s_noise * z, atol=1e-5)
    assert math.isclose(float(out.kl_std), s_noise, rel_tol=1e-6)  # the reference's std_dev_t
    if log_prob_type == "gaussian":
        expected = gauss_logprob_mean(out.prev_sample, mu, s_noise)
    else:  # the reference's CPS "log-prob": -mean((x' - mu)^2), no variance, no constants
        expected = -((out.prev_sample.double() - mu) ** 2).flatten(1).mean(1)
    assert torch.allclose(out.log_prob.double(), expected, atol=1e-5)
    last = flow_cps_step(v, x, sched, 2, generator=torch.Generator().manual_seed(2), noise_level=a,
                         log_prob_type=log_prob_type)
    assert torch.allclose(last.prev_sample, x - 0.3 * v, atol=1e-6)  # s' = 0: the clean x0-estimate
    if log_prob_type == "gaussian":
        assert last.log_prob is None  # deterministic: no density
    else:  # still defined (0 on-policy) and it trains: rescoring with other weights moves it
        assert torch.equal(last.log_prob, torch.zeros(3))
        w = (v + 0.1).requires_grad_(True)
        rescored = flow_cps_step(w, x, sched, 2, prev_sample=last.prev_sample, noise_level=a)
        assert (rescored.log_prob < 0).all()
        rescored.log_prob.sum().backward()
        assert w.grad.abs().sum() > 0


def test_flow_cps_mse_ratio_scale_differs_from_gaussian(xv):
    """Why the reference's CPS log-prob matters: at a late step the Gaussian log-prob's sensitivity
    to the mean is 1 / (2 s_noise^2) times the mse form's, so a clip range means another thing."""
    x, v = xv
    sched = flow_schedule([1.0, 0.5, 0.05, 0.0])
    out = flow_cps_step(v, x, sched, 1, generator=torch.Generator().manual_seed(0))
    w = v + 1e-3
    d_mse = flow_cps_step(w, x, sched, 1, prev_sample=out.prev_sample).log_prob - out.log_prob
    g = flow_cps_step(v, x, sched, 1, prev_sample=out.prev_sample, log_prob_type="gaussian").log_prob
    d_gauss = flow_cps_step(w, x, sched, 1, prev_sample=out.prev_sample, log_prob_type="gaussian").log_prob - g
    s_noise = 0.05 * math.sin(0.8 * math.pi / 2)
    assert torch.allclose(d_gauss, d_mse / (2 * s_noise**2), rtol=1e-3)
    with pytest.raises(ValueError, match="log_prob_type"):
        flow_cps_step(v, x, sched, 1, generator=torch.Generator(), log_prob_type="exact")


def test_flow_sde_kl_std_is_the_reference_std_dev_t(xv):
    """The KL on the step mean is normalised by a sqrt(s / (1 - s)), not by the step's std
    a sqrt(s / (1 - s)) sqrt(-dt): published kl_beta values assume the former."""
    x, v = xv
    sched = flow_schedule([1.0, 0.8, 0.5, 0.0])
    for i, (s, s_next) in enumerate([(1.0, 0.8), (0.8, 0.5), (0.5, 0.0)]):
        out = flow_sde_step(v, x, sched, i, generator=torch.Generator().manual_seed(0), noise_level=0.7)
        s_den = 0.8 if s == 1.0 else s
        assert math.isclose(float(out.kl_std), 0.7 * math.sqrt(s / (1 - s_den)), rel_tol=1e-6)
        assert math.isclose(float(out.std), float(out.kl_std) * math.sqrt(s - s_next), rel_tol=1e-6)


@pytest.mark.parametrize("param", ["eps", "v"])
def test_ddim_matches_reference(xv, param):
    x, pred = xv
    ab_t, ab_prev, eta = 0.3, 0.6, 1.0
    sched = Schedule(param, timesteps=torch.tensor([500]), alphas_cumprod=torch.tensor([ab_t]),
                     alphas_cumprod_prev=torch.tensor([ab_prev]))
    xd, pd = x.double(), pred.double()
    if param == "eps":
        eps = pd
        x0 = (xd - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    else:
        x0 = math.sqrt(ab_t) * xd - math.sqrt(1 - ab_t) * pd
        eps = math.sqrt(ab_t) * pd + math.sqrt(1 - ab_t) * xd
    var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    std = eta * math.sqrt(var)
    mu = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - std**2) * eps
    out = ddim_step(pred, x, sched, 0, generator=torch.Generator().manual_seed(3), eta=eta)
    assert torch.allclose(out.mean.double(), mu, atol=1e-5)
    assert math.isclose(float(out.std), std, rel_tol=1e-5)
    assert torch.allclose(out.log_prob.double(), gauss_logprob_mean(out.prev_sample, mu, std), atol=1e-4)
    scored = ddim_step(pred, x, sched, 0, prev_sample=out.prev_sample, eta=eta)
    assert torch.equal(scored.log_prob, out.log_prob)
    # eta = 0 is the deterministic DDIM step == ode_step
    assert torch.allclose(ddim_step(pred, x, sched, 0, eta=0.0).prev_sample, ode_step(pred, x, sched, 0).prev_sample)


def test_log_prob_is_average_not_sum(xv):
    """Averaged over non-batch dims: doubling the image size leaves the log-prob scale unchanged."""
    x, v = xv
    sched = flow_schedule([1.0, 0.5, 0.0])
    small = flow_sde_step(v, x, sched, 1, generator=torch.Generator().manual_seed(0))
    big_x, big_v = x.repeat(1, 1, 2, 2), v.repeat(1, 1, 2, 2)
    big = flow_sde_step(big_v, big_x, sched, 1, prev_sample=small.prev_sample.repeat(1, 1, 2, 2))
    assert torch.allclose(small.log_prob, big.log_prob, atol=1e-5)


def test_kernel_family_checks():
    with pytest.raises(ValueError, match="eps/v models"):
        get_kernel("ddim", "flow")
    with pytest.raises(ValueError, match="rectified-flow"):
        get_kernel("flow_sde", "eps")
    with pytest.raises(ValueError, match="unknown kernel"):
        get_kernel("euler_a", "flow")


def test_kernels_return_float32_samples_and_keep_gradient(xv):
    x, v = xv
    v = v.clone().requires_grad_(True)
    sched = flow_schedule([1.0, 0.5, 0.0])
    out = flow_sde_step(v.bfloat16(), x.bfloat16(), sched, 1, generator=torch.Generator().manual_seed(0))
    # the sample that was scored comes back in float32 (a bf16 copy would no longer match its log-prob)
    assert out.prev_sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32
    again = flow_sde_step(v.bfloat16(), x.bfloat16(), sched, 1, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)
    # training scores a stored (detached) transition: the gradient reaches the prediction
    scored = flow_sde_step(v.bfloat16(), x.bfloat16(), sched, 1, prev_sample=out.prev_sample.detach())
    scored.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def _block_mean64(t, f):
    """Block means over f x f blocks, repeated back to full size (the projector P), float64 loops."""
    out = torch.empty_like(t, dtype=torch.float64)
    h, w = t.shape[-2:]
    for r in range(0, h, f):
        for c in range(0, w, f):
            out[..., r : r + f, c : c + f] = t[..., r : r + f, c : c + f].double().mean((-2, -1), keepdim=True)
    return out


@pytest.mark.parametrize("f", [2, 3])
def test_flow_sde_pooled_noise_matches_its_formula(f):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    sched = flow_schedule([1.0, 0.8, 0.5, 0.0])
    a, i, s, dt = 0.7, 1, 0.8, -0.3
    std = a * math.sqrt(s / (1 - s)) * math.sqrt(-dt)
    xd, vd = x.double(), v.double()
    mu = xd + (vd + a**2 * s / (1 - s) / (2 * s) * _block_mean64(xd + (1 - s) * vd, f)) * dt
    out = flow_sde_step(v, x, sched, i, generator=torch.Generator().manual_seed(1), noise_level=a, noise_pool=f)
    assert torch.allclose(out.mean.double(), mu, atol=1e-5)
    # the noise is z (pooled size) spread evenly over each block: U z with U orthonormal
    z = torch.randn(3, 4, 6 // f, 6 // f, generator=torch.Generator().manual_seed(1)).double()
    noise = z.repeat_interleave(f, -2).repeat_interleave(f, -1) / f
    assert torch.allclose(out.prev_sample.double(), mu + std * noise, atol=1e-5)
    # log-prob: density of the k = numel / f^2 coordinates U^T (x' - mu) = z * std, averaged over k
    assert torch.allclose(out.log_prob.double(), gauss_logprob_mean(std * z, torch.zeros_like(z), std), atol=1e-4)
    again = flow_sde_step(v, x, sched, i, prev_sample=out.prev_sample, noise_level=a, noise_pool=f)
    assert torch.equal(again.log_prob, out.log_prob)
    # f = 1 is Flow-GRPO's step exactly
    one = flow_sde_step(v, x, sched, i, generator=torch.Generator().manual_seed(1), noise_level=a, noise_pool=1)
    ref = flow_sde_step(v, x, sched, i, generator=torch.Generator().manual_seed(1), noise_level=a)
    assert torch.equal(one.prev_sample, ref.prev_sample) and torch.equal(one.log_prob, ref.log_prob)
    with pytest.raises(ValueError, match="noise_pool=4 must divide"):
        flow_sde_step(v, x, sched, i, generator=torch.Generator().manual_seed(1), noise_pool=4)


@pytest.mark.parametrize("f", [1, 2])
def test_flow_sde_keeps_the_data_marginal_with_pooled_noise(f):
    """Data x0 ~ N(0, c^2 I) has the exact velocity v(x, s) = x (s - (1 - s) c^2) / ((1 - s)^2 c^2 + s^2);
    the SDE with (pooled) noise must end at variance c^2 in both the block-mean and the
    within-block directions, like the ODE (Euler error over 200 steps is ~1%)."""
    c2, n = 0.25, 200
    sig = torch.linspace(1.0, 0.0, n + 1)
    sched = flow_schedule(sig.tolist())
    x = torch.randn(20000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        s = float(sig[i])
        v = x * (s - (1 - s) * c2) / ((1 - s) ** 2 * c2 + s**2)
        x = flow_sde_step(v, x, sched, i, generator=g, noise_level=0.7, noise_pool=f).prev_sample
    low = _block_mean64(x, 2)  # the pooled subspace (for f = 2 the only one the noise enters)
    high = x.double() - low
    # per-coordinate variances: P x has variance c^2 / 4 per entry, (I - P) x has 3 c^2 / 4
    assert abs(float(low.var()) / (c2 / 4) - 1) < 0.05
    assert abs(float(high.var()) / (3 * c2 / 4) - 1) < 0.05
