"""The ``vlm-api`` reward against real OpenAI-compatible chat servers on loopback ports.

Two servers run a tiny random Qwen2-VL whose answer rows make it answer like a judge
(:func:`visalign.rewards.vlm_api_testing.tiny_judge_qwen2vl`):

- ``transformers serve`` in a subprocess: it answers with text only (it ignores ``logprobs``), so
  it tests the text reading against in-process greedy decoding;
- :func:`visalign.rewards.vlm_api_testing.chat_app` (Starlette + uvicorn in a thread), which runs
  the model in-process and returns ``top_logprobs``: the scores must equal the in-process
  ``vqascore`` / ``vlm-judge`` on the same model and images.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from visalign import rewards as R
from visalign.rewards.unifiedreward import unifiedreward_point_prompt
from visalign.rewards.vlm import RUBRIC, VQA_QUESTION, vlm_judge, vqascore
from visalign.rewards.vlm_api import VLMAPIError, parse_yes_no, read_rating, read_yes_no
from visalign.rewards.vlm_backend import load_backend

pytest.importorskip("starlette", reason="the test chat server needs starlette: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="the test chat server needs uvicorn: pip install -e '.[test]'")

from visalign.rewards.vlm_api_testing import chat_app, serve_in_thread, tiny_judge_qwen2vl  # noqa: E402

MODEL = "tiny-judge"
PROMPTS = ["a red cat", "a blue dog", "a blue square", "a dog", "a blue cat", "the cat", "a red dog", "a good image"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(n: int, seed: int = 5, side: int = 32) -> torch.Tensor:
    """Random images on the 8-bit grid (PNG carries them exactly), on the tiny model's patch grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g).float() / 255.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_judge_qwen2vl(tmp_path_factory.mktemp("judge"))


class TransformersServe:
    """``transformers serve`` in a subprocess on a free loopback port; started with the module and
    waited for on first use (importing its stack takes 20-30 s), stopped at the end of the module.
    It loads a model on the first request that names it (a local folder here)."""

    def __init__(self, log: Path) -> None:
        self.port, self.log_path = free_port(), log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        code = "import sys; from transformers.cli.transformers import main; sys.exit(main())"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--device", "cpu"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.ready = False

    def wait(self, timeout: float = 150.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"transformers serve did not start: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    self.ready = resp.status == 200
            except OSError:
                time.sleep(0.3)
        return self.url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module", autouse=True)
def hf_process(request, tmp_path_factory):
    """Start transformers serve first thing, so that it loads while the other tests run (when a
    selected test needs it and its extra packages are installed)."""
    wanted = any("hf_url" in item.fixturenames for item in request.session.items if item.module is request.module)
    missing = [m for m in ("fastapi", "openai") if importlib.util.find_spec(m) is None]
    if not wanted or missing:
        yield None
        return
    server = TransformersServe(tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()


@pytest.fixture
def hf_url(hf_process) -> str:
    if hf_process is None:
        pytest.skip("transformers serve needs fastapi and openai: pip install -e '.[test]'")
    return hf_process.wait()


@pytest.fixture(scope="module")
def backend(folder):
    return load_backend(str(folder))


@pytest.fixture(scope="module")
def api(backend):
    app = chat_app(backend, model_name=MODEL)
    with serve_in_thread(app) as url:
        yield url


def vlm_api(url: str, model: str = MODEL, **options) -> R.Reward:
    opts = "".join(f",{k}={v}" for k, v in options.items() if isinstance(v, (int, float, str)) and "," not in str(v))
    rest = {k: v for k, v in options.items() if not (isinstance(v, (int, float, str)) and "," not in str(v))}
    return R.load(f"vlm-api:url={url},model={model}{opts}", **rest)


# ---- log-probabilities: equal to the in-process judges ----------------------------------------------


def test_logprobs_equal_in_process_vqascore(api, backend):
    x = images(8)
    for variant in ("p_yes_norm", "p_yes", "log_odds"):
        want = vqascore(backend, variant=variant)(x, PROMPTS)
        got = vlm_api(api, variant=variant, concurrency=4)(x, PROMPTS)
        assert got.valid.all() and got.extras["source"] == ["logprobs"] * 8
        torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=0)
        for key in ("p_yes", "p_no", "p_yes_norm", "log_odds"):
            torch.testing.assert_close(got.components[key], want.components[key], atol=1e-4, rtol=0)
    assert want.components["p_yes_norm"].std() > 0.1  # the model's answers depend on the image
    assert not got.scores.requires_grad and not R.info("vlm-api").differentiable


def test_logprobs_rubric_equals_in_process_vlm_judge(api, backend):
    x = images(8)
    want = vlm_judge(backend, mode="expected")(x, PROMPTS)
    reward = vlm_api(api, mode="rubric")
    got = reward(x, PROMPTS)
    assert got.valid.all() and got.extras["source"] == ["logprobs"] * 8
    torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.components["rating_mass"], want.components["rating_mass"], atol=1e-4, rtol=0)
    assert want.scores.std() > 0.3 and reward.info.native_range == (1.0, 5.0)


def test_a_server_that_refuses_logprobs_is_read_from_its_text(backend):
    x = images(4)
    want = [1.0 if t.startswith("Yes") else 0.0 for t in backend.generate(x, [VQA_QUESTION.format(prompt=p)
                                                                              for p in PROMPTS[:4]], 1)]
    with serve_in_thread(chat_app(backend, model_name=MODEL, refuse_logprobs=True)) as url:
        got = vlm_api(url, concurrency=1)(x, PROMPTS[:4])
    assert got.scores.tolist() == want and got.extras["source"] == ["text"] * 4
    with serve_in_thread(chat_app(backend, model_name=MODEL)) as url:
        assert vlm_api(url, logprobs="false")(x, PROMPTS[:4]).scores.tolist() == want
        jpeg = vlm_api(url, image_format="jpeg")(x, PROMPTS[:4])  # lossy, so close to but not the PNG scores
        assert jpeg.valid.all() and jpeg.extras["source"] == ["logprobs"] * 4


def test_reading_answers():
    top = [{"token": "Yes", "logprob": math.log(0.5)}, {"token": " yes", "logprob": math.log(0.1)},
           {"token": "ĠNO", "logprob": math.log(0.2)}, {"token": "Maybe", "logprob": math.log(0.05)},
           {"token": "Yes", "logprob": math.log(0.5)}]  # the chosen token, listed twice
    r = read_yes_no(top)
    assert r["p_yes"] == pytest.approx(0.6) and r["p_no"] == pytest.approx(0.2)
    assert r["p_yes_norm"] == pytest.approx(0.75) and r["log_odds"] == pytest.approx(math.log(3))
    only_yes = read_yes_no(top[:2] + top[3:4])  # "no" not listed: the lowest listed probability bounds it
    assert only_yes["p_no"] == pytest.approx(0.05) and only_yes["p_yes_norm"] == pytest.approx(0.6 / 0.65)
    assert read_yes_no([{"token": "Maybe", "logprob": -0.1}]) is None
    digits = read_rating([{"token": "4", "logprob": math.log(0.3)}, {"token": " 5", "logprob": math.log(0.1)},
                          {"token": "x", "logprob": math.log(0.5)}])
    assert digits["rating"] == pytest.approx(4.25) and digits["rating_mass"] == pytest.approx(0.4)
    assert read_rating([{"token": "6", "logprob": -1.0}]) is None
    assert [parse_yes_no(t) for t in ("Yes", "yes.", "**No**, it does not", " NO", "Not sure", "", "Yesterday")] == \
        [1.0, 1.0, 0.0, 0.0, None, None, None]


def test_unifiedreward_mode_reads_the_final_score(api):
    """``mode=unifiedreward``: the expected score over the digits at ``Final Score:`` when the reply
    carries per-token log-probabilities, else the parsed score; a reply without one is invalid."""
    reward = vlm_api(api, mode="unifiedreward")
    assert reward.question == unifiedreward_point_prompt("{prompt}") and reward.max_tokens == 512
    assert reward.info.native_range == (1.0, 5.0)
    tokens = [{"token": t, "logprob": -0.1, "top_logprobs": []} for t in ("ball (object): 1\n", "Final", " Score", ":")]
    tokens.append({"token": " 4", "logprob": math.log(0.6),
                   "top_logprobs": [{"token": " 4", "logprob": math.log(0.6)}, {"token": " 3", "logprob": math.log(0.2)},
                                    {"token": " 5", "logprob": math.log(0.2)}]})
    text = "ball (object): 1\nFinal Score: 4"
    values, source, _ = reward._judge({"text": text, "top": None, "tokens": tokens})
    assert source == "logprobs" and values["rating"] == pytest.approx(0.6 * 4 + 0.2 * 3 + 0.2 * 5)
    values, source, _ = reward._judge({"text": "**Final Score:** 3.5", "top": None, "tokens": None})
    assert source == "text" and values["rating"] == 3.5
    values, _, reason = reward._judge({"text": "A nice picture.", "top": None, "tokens": None})
    assert values is None and "Final Score" in reason
    # end to end on the tiny model, which never writes a final score: every item invalid, none 0
    out = reward(images(2), PROMPTS[:2])
    assert not out.valid.any() and out.scores.isnan().all() and all("Final Score" in r for r in out.extras["reason"])


# ---- errors, retries, concurrency ------------------------------------------------------------------


def test_server_down_is_a_clear_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ConnectionError) as err:
        vlm_api(url, retries=1, backoff=0.01)
    message = str(err.value)
    assert url in message and "did not answer after 2 tries" in message and "vllm serve" in message
    with pytest.raises(ValueError, match="not an http"):
        R.load("vlm-api:url=127.0.0.1:8000,model=x")
    with pytest.raises(ValueError, match="mode="):
        vlm_api(url, mode="essay", check="false")


def test_api_key_comes_from_the_environment(backend, monkeypatch):
    x = images(2)
    with serve_in_thread(chat_app(backend, model_name=MODEL, api_key="s3cret")) as url:
        monkeypatch.setenv("VISALIGN_VLM_API_KEY", "wrong")
        with pytest.raises(VLMAPIError, match=r"HTTP 401\): Incorrect API key provided.*VISALIGN_VLM_API_KEY"):
            vlm_api(url)
        unchecked = vlm_api(url, check="false")
        with pytest.raises(VLMAPIError, match="HTTP 401"):
            unchecked(x, PROMPTS[:2])
        monkeypatch.setenv("MY_VLM_KEY", "s3cret")
        assert vlm_api(url, api_key_env="MY_VLM_KEY")(x, PROMPTS[:2]).valid.all()
        monkeypatch.delenv("VISALIGN_VLM_API_KEY")
        with pytest.raises(VLMAPIError, match="HTTP 401"):
            vlm_api(url)
    with pytest.raises(ValueError, match="does not go in the spec"):
        R.load("vlm-api:url=http://127.0.0.1:1/v1,model=x,api_key=s3cret")
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE.*not set"):
        R.load("vlm-api:url=http://127.0.0.1:1/v1,model=x,api_key_env=NOT_SET_ANYWHERE")


def test_unknown_model_is_named_by_the_server(api):
    with pytest.raises(ValueError, match=f"does not serve model='nope'; it serves {MODEL}"):
        vlm_api(api, model="nope")
    with pytest.raises(VLMAPIError, match=r"HTTP 404\): The model `nope` does not exist"):
        vlm_api(api, model="nope", check="false")(images(1), PROMPTS[:1])


def test_busy_answers_are_retried(backend):
    x = images(2)
    app = chat_app(backend, model_name=MODEL, fail_first=2)
    with serve_in_thread(app) as url:
        out = vlm_api(url, retries=2, backoff=0.01, concurrency=1)(x, PROMPTS[:2])
        assert out.valid.all() and app.state.stats["failed"] == 2
    with serve_in_thread(chat_app(backend, model_name=MODEL, fail_first=9)) as url:
        with pytest.raises(VLMAPIError, match=r"after 2 tries \(last: HTTP 503: the server is busy"):
            vlm_api(url, retries=1, backoff=0.01)(x, PROMPTS[:2])


def test_concurrent_requests_keep_the_input_order(api, backend):
    x = images(6, seed=11)
    one_by_one = vlm_api(api, concurrency=1)(x, PROMPTS[:6])
    app = chat_app(backend, model_name=MODEL, delay_s=0.2)
    with serve_in_thread(app) as url:
        reward = vlm_api(url, concurrency=3)
        start = time.monotonic()
        together = reward(x, PROMPTS[:6])
        took = time.monotonic() - start
    assert app.state.stats["max_in_flight"] > 1 and took < 6 * 0.2
    assert torch.equal(together.scores, one_by_one.scores) and together.extras["text"] == one_by_one.extras["text"]
    torch.testing.assert_close(together.scores, vqascore(backend, variant="p_yes_norm")(x, PROMPTS[:6]).scores,
                               atol=1e-4, rtol=0)
    video = torch.stack([x, x.flip(-1)], dim=1)  # (6, 2, 3, H, W)
    with pytest.raises(ValueError, match="scores images"):
        reward(video, PROMPTS[:6])
    frames = R.load(f"video_frames:reward=vlm-api,url={api},model={MODEL},frames=2")(video[:2], PROMPTS[:2])
    want = vqascore(backend, variant="p_yes_norm")(video[:2].flatten(0, 1), [p for p in PROMPTS[:2] for _ in "ab"])
    torch.testing.assert_close(frames.scores, want.scores.view(2, 2).mean(1), atol=1e-4, rtol=0)


# ---- visalign score ----------------------------------------------------------------------------------


def test_visalign_score_with_vlm_api(api, backend, tmp_path):
    from visalign.cli import main

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    x = images(3, seed=3)
    for i in range(3):
        Image.fromarray((x[i] * 255).round().byte().permute(1, 2, 0).numpy()).save(gallery / f"img_{i}.png")
        (gallery / f"img_{i}.txt").write_text(PROMPTS[i])
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(gallery), "--rewards", f"vlm-api:url={api},model={MODEL}", "--out", str(out),
                 "--no-progress", "--workers", "0"]) == 0
    rows = sorted(map(json.loads, out.read_text().splitlines()), key=lambda r: r["path"])
    want = vqascore(backend, variant="p_yes_norm")(x, PROMPTS[:3]).scores
    assert [r["vlm-api"] for r in rows] == pytest.approx(want.tolist(), abs=1e-4)


# ---- text: transformers serve (last in the file: it loads while the tests above run) --------------


def test_transformers_serve_answers_are_read_from_text(hf_url, folder, backend):
    x = images(6)
    texts = backend.generate(x, [VQA_QUESTION.format(prompt=p) for p in PROMPTS[:6]], max_new_tokens=1)
    assert {t.split()[0] for t in texts} == {"Yes", "No"}  # both answers occur
    got = vlm_api(hf_url, model=str(folder), concurrency=3)(x, PROMPTS[:6])
    assert got.extras["source"] == ["text"] * 6  # transformers serve returns no log-probabilities
    assert got.scores.tolist() == [1.0 if t.startswith("Yes") else 0.0 for t in texts]
    assert got.components["log_odds"].abs().eq(20.0).all()
    rubric = vlm_api(hf_url, model=str(folder), mode="rubric")(x, PROMPTS[:6])
    want = vlm_judge(backend, mode="generate", max_new_tokens=16)(x, PROMPTS[:6])
    assert rubric.valid.all() and rubric.scores.tolist() == want.scores.tolist()
    assert rubric.extras["text"] == want.extras["text"]


def test_an_answer_that_cannot_be_read_marks_its_item_invalid_never_zero(hf_url, folder):
    x = images(3)
    # the model answers a digit to the rubric: no yes / no in it
    out = vlm_api(hf_url, model=str(folder), question=RUBRIC)(x, PROMPTS[:3])
    assert not out.valid.any() and out.scores.isnan().all()
    assert all("neither yes nor no" in r for r in out.extras["reason"])
    out = vlm_api(hf_url, model=str(folder), mode="rubric", question=VQA_QUESTION,
                  max_tokens=1)(x, PROMPTS[:3])
    assert not out.valid.any() and all("no rating from 1 to 5" in r for r in out.extras["reason"])
