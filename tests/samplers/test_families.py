"""What the newer families add to the contract, on tiny models: Wan2.2-A14B's two experts (routing
by time per sample, the low-noise guidance scale, LoRA on one or both experts), Qwen-Image's
padded prompt embeddings and norm-rescaled guidance, SD3.5's sampling defaults."""

import pytest
import torch

import visalign.samplers as vs
from visalign.samplers.families._mmdit import pack
from visalign.samplers.lora import add_lora, load_lora, save_lora

SIZE = {"height": 32, "width": 32}
WAN = {"max_sequence_length": 8, "num_frames": 5}


@pytest.fixture(scope="module")
def a14b(tiny_model_dir):
    return tiny_model_dir("wan", "a14b")


def _direct(transformer, x, s, cond):
    """The expert's own prediction (no guidance) at noise level ``s`` for every row."""
    t = torch.full((x.shape[0],), 1000.0 * s)
    with torch.no_grad():
        out = transformer(hidden_states=x.transpose(1, 2), timestep=t, encoder_hidden_states=cond.pos["encoder_hidden_states"],
                          return_dict=False)[0]
    return out.transpose(1, 2)


def test_wan22_routes_each_sample_to_the_expert_of_its_time(a14b):
    sampler = vs.load(str(a14b), **WAN)
    pipe = sampler.pipeline
    assert sampler.boundary == pytest.approx(875.0)
    assert sampler.denoiser.transformer is pipe.transformer and sampler.denoiser.transformer_2 is pipe.transformer_2
    assert (sampler.default_steps, sampler.default_guidance) == (40, 4.0)
    cond = sampler.encode(["a red cube", "a blue ball"])
    x = sampler.noise(2, torch.Generator().manual_seed(0), **SIZE)
    s = torch.tensor([0.95, 0.3])  # row 0 above the boundary (high noise), row 1 below
    with torch.no_grad():
        both = sampler.predict_at(x, s, cond, 1.0)
    high, low = _direct(pipe.transformer, x, 0.95, cond), _direct(pipe.transformer_2, x, 0.3, cond)
    assert torch.allclose(both[0], high[0], atol=1e-5) and torch.allclose(both[1], low[1], atol=1e-5)
    assert (_direct(pipe.transformer_2, x, 0.95, cond)[0] - high[0]).abs().max() > 1e-3  # the experts differ


def test_wan22_low_noise_expert_uses_guidance_scale_2(a14b):
    two = vs.load(str(a14b), guidance_scale_2=1.5, **WAN)
    one = vs.load(str(a14b), **WAN)  # the pipeline's default: one scale for both experts
    cond = two.encode(["a red cube"])
    x = two.noise(1, torch.Generator().manual_seed(0), **SIZE)
    with torch.no_grad():
        for s, g_low in ((0.95, 3.0), (0.3, 1.5)):
            t = torch.tensor([s])
            assert torch.allclose(two.predict_at(x, t, cond, 3.0), one.predict_at(x, t, cond, g_low), atol=1e-5)
    with pytest.raises(ValueError, match="experts"):
        vs.load(str(a14b), experts="middle", **WAN)


def _perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))


def test_wan22_lora_on_both_experts_saves_loads_and_turns_off(a14b, tmp_path):
    sampler = vs.load(str(a14b), **WAN)
    torch.manual_seed(0)
    params = add_lora(sampler, rank=2, alpha=2)
    _perturb(params)
    pipe = sampler.pipeline
    for expert in (pipe.transformer, pipe.transformer_2):  # the pipeline's modules carry the adapters
        assert any("lora_" in n for n, _ in expert.named_parameters())
    cond = sampler.encode(["a red cube", "a blue ball"])
    x = sampler.noise(2, torch.Generator().manual_seed(0), **SIZE)
    s = torch.tensor([0.95, 0.3])
    with torch.no_grad():
        tuned = sampler.predict_at(x, s, cond, 2.0)
        with sampler.reference():
            ref = sampler.predict_at(x, s, cond, 2.0)
    fresh = vs.load(str(a14b), **WAN)
    with torch.no_grad():
        base = fresh.predict_at(x, s, cond, 2.0)
    assert torch.allclose(ref, base, atol=1e-5)
    assert ((tuned - base).flatten(1).abs().amax(1) > 1e-4).all()  # both experts moved
    out = save_lora(sampler, tmp_path / "lora")
    load_lora(fresh, out)
    with torch.no_grad():
        assert torch.allclose(fresh.predict_at(x, s, cond, 2.0), tuned, atol=1e-5)


def test_wan22_one_trained_expert_leaves_the_other_frozen(a14b):
    sampler = vs.load(str(a14b), experts="low", **WAN)
    assert sampler.denoiser is sampler.pipeline.transformer_2
    cond = sampler.encode(["a red cube"])
    x = sampler.noise(1, torch.Generator().manual_seed(0), **SIZE)
    with torch.no_grad():
        before = [sampler.predict_at(x, torch.tensor([s]), cond, 1.0) for s in (0.95, 0.3)]
    torch.manual_seed(0)
    _perturb(add_lora(sampler, rank=2, alpha=2))
    assert not any("lora_" in n for n, _ in sampler.pipeline.transformer.named_parameters())
    with torch.no_grad():
        after = [sampler.predict_at(x, torch.tensor([s]), cond, 1.0) for s in (0.95, 0.3)]
    assert torch.equal(before[0], after[0])  # the high-noise expert's steps are untouched
    assert (before[1] - after[1]).abs().max() > 1e-4


def test_single_transformer_wan_refuses_expert_options(tiny_model_dir):
    with pytest.raises(ValueError, match="one transformer"):
        vs.load(str(tiny_model_dir("wan", "ti2v")), experts="low", **WAN)


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    return vs.load(str(tiny_model_dir("qwenimage")), max_sequence_length=16)


def test_qwenimage_padded_embeddings_concatenate_and_do_not_change_the_prediction(qwen):
    short, long = "a cat", "a photo of two red cubes on the left of a big blue sphere at night"
    batch = qwen.encode([short, long])
    alone = qwen.encode([short])
    assert batch.pos["encoder_hidden_states"].shape[1] == 16 == alone.pos["encoder_hidden_states"].shape[1]
    assert batch.pos["encoder_hidden_states_mask"].sum(1).tolist()[0] < 16  # the short prompt is padded
    joined = vs.Conditioning.cat([alone, batch])  # conditionings of different batches join
    assert len(joined) == 3 and joined.prompts == [short, short, long]
    x = qwen.noise(1, torch.Generator().manual_seed(0), height=64, width=64)
    sched = qwen.schedule(3, x)
    with torch.no_grad():
        a = qwen.denoise(x, 1, sched, batch[0], 4.0)
        b = qwen.denoise(x, 1, sched, alone, 4.0)
        c = qwen.denoise(x, 1, sched, joined[2], 4.0)
        d = qwen.denoise(x, 1, sched, batch[1], 4.0)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(c, d, atol=1e-5)


def test_qwenimage_guidance_keeps_the_conditional_norm_per_token(qwen):
    cond = qwen.encode(["a red cube"])
    x = qwen.noise(1, torch.Generator().manual_seed(0), height=64, width=64)
    t = torch.tensor(700.0)
    with torch.no_grad():
        text = qwen.predict(x, t, cond, 1.0)  # no CFG at g <= 1
        guided = qwen.predict(x, t, cond, 4.0)
    assert not torch.allclose(text, guided, atol=1e-4)
    assert torch.allclose(pack(guided).norm(dim=-1), pack(text).norm(dim=-1), atol=1e-5)


def test_sd35_defaults_follow_the_model_cards(tiny_model_dir):
    large = vs.load(str(tiny_model_dir("sd3", "large")), max_sequence_length=8)
    medium3 = vs.load(str(tiny_model_dir("sd3")), max_sequence_length=8)
    assert (large.default_steps, large.default_guidance) == (28, 3.5)
    assert (medium3.default_steps, medium3.default_guidance) == (28, 7.0)
