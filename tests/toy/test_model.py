"""toy-shapes model: diffusers layout, tokenizer, sampling, seeded and resumable pretraining."""

import json

import pytest
import torch

from visalign.toy import model as M
from visalign.toy.prompts import all_prompts


def test_tokenizer_covers_grammar():
    tok = M.build_tokenizer()
    for m in all_prompts():
        enc = tok(m["prompt"], padding="max_length", max_length=M.MAX_LENGTH)
        ids = enc["input_ids"]
        assert len(ids) == M.MAX_LENGTH and tok.unk_token_id not in ids
        assert ids[0] == tok.bos_token_id and ids[len(m["prompt"].split()) + 1] == tok.eos_token_id
    assert tok("")["input_ids"] == [tok.bos_token_id, tok.eos_token_id]
    assert tok("a dog")["input_ids"][2] == tok.unk_token_id


def test_save_load_round_trip(tmp_path):
    model = M.build(seed=0)
    path = M.save(model, tmp_path / "toy")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "ToyShapesPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    loaded = M.load(path)
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert loaded.scheduler.config.num_train_timesteps == 1000 and loaded.scheduler.config.shift == 1.0
    # space-to-depth: 2x2 pixel blocks as channels, (3, 32, 32) <-> (12, 16, 16)
    assert loaded.unet.config.in_channels == 12 and loaded.unet.config.sample_size == 16
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(M.from_latent(M.to_latent(x)), x) and M.to_latent(x).shape == (2, 12, 16, 16)
    from visalign.toy.family import ToySampler

    a = ToySampler(loaded).generate(["a red circle", ""], num_steps=2, guidance_scale=3.0,
                                    generator=torch.Generator().manual_seed(0))
    b = ToySampler(model).generate(["a red circle", ""], num_steps=2, guidance_scale=3.0,
                                   generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    with pytest.raises(FileNotFoundError, match="no toy-shapes model"):
        M.load(tmp_path / "missing")


def test_pretrain_resume_equals_straight_run(tmp_path):
    from visalign.toy.pretrain import pretrain

    kw = dict(batch=2, log_every=1, ckpt_every=1, eval_every=0, threads=None, warmup=1)
    pretrain(tmp_path / "a", steps=2, **kw)
    pretrain(tmp_path / "b", steps=1, **kw)
    pretrain(tmp_path / "b", steps=2, **kw)
    sa = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert int(sa["step"]) == int(sb["step"]) == 2
    for key in ("unet", "ema_unet", "text_encoder"):
        for name, t in sa[key].items():
            assert torch.equal(t, sb[key][name]), (key, name)
    init = M.build(seed=0).unet.state_dict()
    assert any(not torch.equal(init[n], t) for n, t in sa["unet"].items())  # training moved the weights
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["event"] == "train"] == [1, 2]
    assert M.load(tmp_path / "a" / "final").unet.config.block_out_channels == list(M.UNET_CONFIG["block_out_channels"])


def test_caption_noise_pairs_captions_with_near_misses():
    """With ``caption_noise`` q, about a fraction q of the pretraining images fail their own caption
    (the renderer's scenes pass it 100%); q = 0 draws exactly the noiseless batch."""
    from visalign.toy.pretrain import _batch
    from visalign.toy.prompts import by_tag, split
    from visalign.toy.verify import verify

    train = by_tag(split("train"))
    clean, prompts = _batch(3, 256, 0, train, p_uncond=0.0)
    again, prompts0 = _batch(3, 256, 0, train, p_uncond=0.0, caption_noise=0.0)
    assert torch.equal(clean, again) and prompts == prompts0
    noisy, prompts_n = _batch(3, 256, 0, train, p_uncond=0.0, caption_noise=0.5)
    assert prompts_n == prompts  # the captions are the same, the scenes are not
    pass_clean = sum(v.strict for v in verify((clean + 1) / 2, prompts=prompts)) / 256
    pass_noisy = sum(v.strict for v in verify((noisy + 1) / 2, prompts=prompts)) / 256
    assert pass_clean == 1.0 and 0.35 < pass_noisy < 0.65


def test_pretrain_from_init_starts_at_those_weights(tmp_path):
    from visalign.toy.pretrain import pretrain

    start = M.build(seed=5)
    M.save(start, tmp_path / "start")
    with pytest.raises(ValueError, match="caption_noise"):
        pretrain(tmp_path / "bad", steps=1, caption_noise=1.0, init=tmp_path / "start")
    pretrain(tmp_path / "run", steps=1, batch=2, ckpt_every=1, eval_every=0, threads=None, warmup=1,
             init=tmp_path / "start", caption_noise=0.3, lr=0.0)
    st = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    for name, t in start.unet.state_dict().items():  # lr 0: still the init weights, not seed 0's
        assert torch.equal(st["unet"][name], t), name
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logs[0]["caption_noise"] == 0.3 and logs[0]["init"] == str(tmp_path / "start")


def test_pretrain_max_minutes_stops_on_the_wall_clock_and_continues(tmp_path):
    """A wall-clock budget stops after the step that uses it (with a checkpoint and ``final/``), is
    kept in the checkpoint, and a second call with no budget continues to ``steps``; the toy alignment
    bench's oracle row runs this way from the shipped model (``init="toy-shapes"``)."""
    from visalign.toy.pretrain import pretrain

    kw = dict(batch=2, log_every=1, ckpt_every=100, eval_every=0, threads=None, warmup=1)
    with pytest.raises(ValueError, match="max_minutes"):
        pretrain(tmp_path / "bad", steps=1, max_minutes=0, **kw)
    pretrain(tmp_path / "run", steps=50, max_minutes=1e-9, init="toy-shapes", **kw)
    st = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert int(st["step"]) == 1 and float(st["train_seconds"]) > 0  # saved although 1 % ckpt_every != 0
    assert (tmp_path / "run" / "final" / "model_index.json").is_file()
    pretrain(tmp_path / "run", steps=50, max_minutes=1e-9, **kw)  # the budget is spent: no step
    assert int(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"]) == 1
    pretrain(tmp_path / "run", steps=2, **kw)
    st2 = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert int(st2["step"]) == 2 and float(st2["train_seconds"]) > float(st["train_seconds"])
    shipped = M.load(__import__("visalign.assets", fromlist=["asset_path"]).asset_path("toy-shapes"))
    name, w = next(iter(shipped.unet.state_dict().items()))
    assert not torch.allclose(M.build(seed=0).unet.state_dict()[name], w, atol=0.05)
    assert torch.allclose(st["unet"][name], w, atol=0.05)  # one small step from the shipped weights


def test_second_base_is_built_in_and_a_pretrain_init():
    """``toy-shapes-cn`` (the base tuned on near-miss captions) loads by name like ``toy-shapes``, is
    the same architecture with other weights, and names a pretraining start (lr 0 keeps it)."""
    import tempfile
    from pathlib import Path

    import visalign.samplers as vs
    from visalign.assets import asset_path
    from visalign.toy.pretrain import pretrain

    a, b = vs.load("toy-shapes"), vs.load("toy-shapes-cn")
    assert b.family == "toy" and b.name == "toy-shapes-cn"
    sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(Path(tmp) / "run", steps=1, batch=2, ckpt_every=1, eval_every=0, threads=None, warmup=1,
                 init="toy-shapes-cn", lr=0.0)
        st = torch.load(Path(tmp) / "run" / "ckpt.pt", weights_only=True)
    cn = M.load(str(asset_path("toy-shapes-cn")))
    for name, t in cn.unet.state_dict().items():
        assert torch.equal(st["unet"][name], t), name
