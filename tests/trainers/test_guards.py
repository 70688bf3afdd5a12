"""Hacking guards on the trainer floor: GARDO's gated KL, the adaptive reference and the held-out
alarm, each against its formula, through the trainers that use them."""

import math

import pytest
import torch
from tests_support import Brightness

from visalign.rewards import Reward, RewardInfo, RewardOutput
from visalign.trainers.common.guards import GuardSettings, HackingAlarm, kl_gate, uncertainty_of


class UncertainBrightness(Reward):
    """Brightness with an 'uncertainty' component: the pixel std (a stand-in for an ensemble's spread)."""

    info = RewardInfo("uncertain_brightness", differentiable=True)

    def score(self, images, prompts, references, metadata):
        return RewardOutput(images.mean(dim=(1, 2, 3)), components={"uncertainty": images.std(dim=(1, 2, 3))})


def test_kl_gate_formula():
    u = torch.tensor([0.1, 0.5, 0.2, 0.9, float("nan")])
    w = kl_gate(u, 0.5)
    thr = torch.quantile(torch.tensor([0.1, 0.5, 0.2, 0.9]), 0.5)
    assert w.tolist() == [float(x >= thr) for x in [0.1, 0.5, 0.2, 0.9]] + [1.0]
    assert kl_gate(u, None) is None and kl_gate(None, 0.5) is None
    assert torch.equal(kl_gate(torch.tensor([1.0, 2.0]), 0.0), torch.ones(2))
    comps = {"a": torch.zeros(2), "a/uncertainty": torch.tensor([1.0, 2.0]), "b/uncertainty": torch.tensor([0.5, 0.5])}
    assert torch.equal(uncertainty_of(comps), torch.tensor([1.5, 2.5]))
    assert uncertainty_of({"a": torch.zeros(2)}) is None
    with pytest.raises(ValueError, match="kl_gate_quantile"):
        GuardSettings(kl_gate_quantile=1.0)


def test_gated_kl_is_zero_for_low_uncertainty_samples(make_trainer):
    """GRPO with guards.kl_gate_quantile: the KL term of a sample below the uncertainty quantile is 0,
    the others keep Flow-GRPO's KL exactly."""
    tr = make_trainer(reward=UncertainBrightness(), kl_beta=0.04, learning_rate=5e-2, clip_range=0.5)
    tr.step()  # move away from the reference so the KL is not zero
    tr.guards = GuardSettings(kl_gate_quantile=0.5)
    batch = tr.collect(1)
    assert batch.kl_weight is not None and 0 < float(batch.kl_weight.sum()) < len(batch.kl_weight)
    rows = torch.arange(4)
    sub = batch.traj[rows]
    _, plain = tr._step_loss(sub, 1, torch.zeros(4))
    _, gated = tr._step_loss(sub, 1, torch.zeros(4), batch.kl_weight[rows])
    w = batch.kl_weight[rows]
    assert float(plain["kl"].min()) > 0
    assert torch.equal(gated["kl"][w == 0], torch.zeros(int((w == 0).sum())))
    assert torch.allclose(gated["kl"][w == 1], plain["kl"][w == 1])
    row = tr.step()
    assert 0 < row["kl/gated_fraction"] < 1


def test_gate_without_an_uncertainty_is_a_clear_error(make_trainer):
    tr = make_trainer()
    tr.guards = GuardSettings(kl_gate_quantile=0.5)
    with pytest.raises(ValueError, match="'uncertainty' component"):
        tr.collect(0)


def test_adaptive_reference_refreshes_on_schedule_and_resumes_exactly(make_trainer):
    """guards.reference_refresh_every = 2: the KL to the reference is 0 right after each refresh
    (iterations 3 and 5), positive between; a resumed run continues exactly."""
    def make(run_dir):
        tr = make_trainer(kl_beta=0.04, learning_rate=5e-2, clip_range=0.5, train_batch_size=8, run_dir=run_dir)
        tr.guards = GuardSettings(reference_refresh_every=2)
        return tr

    tr = make("a")
    rows = [tr.step() for _ in range(5)]
    assert [r["reference/refreshes"] for r in rows] == [0, 0, 1, 1, 2]
    kls = [r["kl"] for r in rows]
    assert kls[0] == pytest.approx(0.0, abs=1e-12)  # the start: the policy is the base
    assert kls[1] > 0 and kls[3] > 0
    assert kls[2] == pytest.approx(0.0, abs=1e-12) and kls[4] == pytest.approx(0.0, abs=1e-12)  # just refreshed
    b = make("b")
    for _ in range(3):
        b.step()
    b.save_checkpoint()
    c = make("b")
    assert c.resume() and c.reference_refreshes == 1
    r4, r5 = c.step(), c.step()
    assert r4["kl"] == pytest.approx(rows[3]["kl"], rel=1e-5) and r5["reference/refreshes"] == 2


def test_held_out_alarm_rings_when_the_trained_reward_rises_and_a_held_out_one_falls():
    alarm = HackingAlarm(["proxy"], tolerance=0.01)
    seq = [({"eval/proxy": 0.50, "eval/gold": 0.50}, 0.0), ({"eval/proxy": 0.55, "eval/gold": 0.56}, 0.0),
           ({"eval/proxy": 0.60, "eval/gold": 0.555}, 0.0),  # gold dipped within the tolerance
           ({"eval/proxy": 0.70, "eval/gold": 0.50}, 1.0),  # proxy up, gold 6 points below its peak
           ({"eval/proxy": 0.70, "eval/gold": 0.58}, 0.0)]  # gold recovered to a new peak
    for metrics, expected in seq:
        out = alarm.update(metrics, ["proxy", "gold"])
        assert out["alarm/hacking"] == expected, metrics
    assert math.isclose(alarm.update({"eval/proxy": 0.65, "eval/gold": 0.50}, ["proxy", "gold"])["alarm/gold/below_peak"], 0.08)
    state = alarm.state_dict()
    again = HackingAlarm(["proxy"])
    again.load_state_dict(state)
    assert again.peaks == alarm.peaks


def test_alarm_reaches_the_eval_rows(make_trainer, tmp_path):
    tr = make_trainer()
    tr.eval_prompts = [{"prompt": "a red cube", "metadata": None}]
    tr.eval_rewards = {"brightness": Brightness(), "held": Brightness()}
    tr.run.eval_num_steps = 2
    row = tr.evaluate()
    assert row["alarm/hacking"] == 0.0 and "alarm/held/below_peak" in row


def test_gated_velocity_anchor_in_nft_is_zero_for_low_uncertainty_samples(make_trainer):
    """DiffusionNFT with guards.kl_gate_quantile: the velocity anchor kl_beta |v - v_ref|^2 of a sample
    below the uncertainty quantile is 0 and its loss is the bare NFT loss; the others keep both."""
    tr = make_trainer(algorithm="nft", reward=UncertainBrightness(), kl_beta=0.5, learning_rate=5e-2)
    tr.step()  # move away from the reference so the anchor is not zero
    tr.guards = GuardSettings(kl_gate_quantile=0.5)
    batch = tr.collect_groups(1)
    w = batch.kl_weight
    assert w is not None and 0 < float(w.sum()) < len(w)
    draws = tr._draws(batch.traj, torch.Generator().manual_seed(3))
    adv = torch.zeros(len(w))
    levels, x0, eps = draws["levels"][:, 0], draws["x0"], draws["eps"][:, 0]
    plain, p_stats = tr._loss(batch.traj, levels, x0, eps, adv, None)
    gated, g_stats = tr._loss(batch.traj, levels, x0, eps, adv, None, w)
    assert float(p_stats["kl"].min()) > 0
    assert torch.equal(g_stats["kl"][w == 0], torch.zeros(int((w == 0).sum())))
    assert torch.allclose(g_stats["kl"][w == 1], p_stats["kl"][w == 1])
    # loss_i = nft_i + kl_beta * g_i * kl_i
    expected = p_stats["nft_loss"] + 0.5 * w * p_stats["kl"]
    assert torch.allclose(gated.detach(), expected, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(gated.detach(), plain.detach())
    row = tr.step()
    assert 0 < row["kl/gated_fraction"] < 1


def test_gated_anchor_in_reward_backprop_is_zero_for_low_uncertainty_samples(tiny_model_dir, tmp_path):
    """Reward back-propagation (DRaFT-1) with guards.kl_gate_quantile: the micro-batch loss is
    mean_i(-r_i + kl_beta * g_i * |pred_i - pred_ref_i|^2) with g_i = 1[u_i >= quantile_q(u)]; the
    anchor of the confident sample is 0 and its gradient loses the anchor's part."""
    import visalign.samplers as vs
    from visalign.trainers import LoraSettings, RunSettings, registry
    from visalign.trainers.common.lora import add_lora

    sampler = vs.load(str(tiny_model_dir("sd3")), max_sequence_length=8)
    torch.manual_seed(0)
    trainable = add_lora(sampler, LoraSettings(rank=4, alpha=4))
    with torch.no_grad():  # a non-zero LoRA B so the anchor is not 0
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    algo = registry.get("backprop")
    cfg = algo.config_class(method="draft", grad_steps=1, num_steps=3, guidance_scale=2.0, batch_size=2,
                            kl_beta=0.7, ema_decay=0.0, checkpoint=False, checkpoint_decode=False)
    prompts = [{"prompt": p, "metadata": None} for p in ["a red cube", "a blue ball"]]
    run = RunSettings(run_dir=str(tmp_path / "run"), iterations=2, eval_every=0, progress=False,
                      save_sample_grid=False)
    tr = algo.trainer_class(sampler, {"u": (UncertainBrightness(), 1.0)}, cfg, train_prompts=prompts, run=run,
                            trainable=trainable, size={"height": 32, "width": 32})

    def loss_of(seed=4):
        tr.optimizer.zero_grad(set_to_none=True)
        loss, stats = tr.micro_batch(list(prompts), torch.Generator().manual_seed(seed))
        loss.backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().clone() for p in tr.params])
        return loss.detach(), stats, g

    plain, p_stats, g_plain = loss_of()
    tr.guards = GuardSettings(kl_gate_quantile=0.5)
    gated, g_stats, g_gated = loss_of()
    w = g_stats["kl_gate"]
    assert w.tolist() in ([0.0, 1.0], [1.0, 0.0])  # two samples, median gate: only the more uncertain one
    assert float(p_stats["kl"].min()) > 0
    assert torch.equal(g_stats["kl"][w == 0], torch.zeros(1))
    assert torch.allclose(g_stats["kl"][w == 1], p_stats["kl"][w == 1])
    r = p_stats["scores"]
    assert torch.allclose(plain, (-r + 0.7 * p_stats["kl"]).mean(), rtol=1e-5)
    assert torch.allclose(gated, (-r + 0.7 * w * p_stats["kl"]).mean(), rtol=1e-5)
    assert not torch.allclose(g_plain, g_gated)
