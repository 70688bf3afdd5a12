"""The reward server (``visalign rewards serve``) and the ``remote`` reward, tested for real: the
server runs as its own process on a free loopback port with the shipped ``shapes-proxy`` and the
weight-free ``artifact`` reward, and is stopped (SIGTERM, or SIGKILL where that is the point)."""

from __future__ import annotations

import base64
import copy
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visalign import rewards as R
from visalign.toy.prompts import split

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install 'visalign[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install 'visalign[serve]'")

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-5f1c"
PROMPTS = [m["prompt"] for m in split("train")[::17]]  # grammar prompts of every category


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``visalign rewards serve`` in a subprocess; ``url`` once it listens."""

    def __init__(self, specs: str, *args: str, port: int = 0, token: str | None = TOKEN,
                 command: list[str] | None = None) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("VISALIGN_REWARD_TOKEN", None)
        if token:
            env["VISALIGN_REWARD_TOKEN"] = token
        command = command or [sys.executable, "-m", "visalign", "rewards", "serve", specs, "--port", str(port),
                              "--threads", "1", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("serving "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {''.join(self.lines)} {self.proc.stderr.read()}")
        line = next(x for x in self.lines if x.startswith("serving "))
        self.url = line.split(" on ")[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for stream in (self.proc.stdout, self.proc.stderr):
                stream.close()


@pytest.fixture(scope="module")
def server():
    srv = Server("shapes-proxy,artifact,shapes:mode=strict,video_frames:reward=artifact,frames=2", "--max-wait-ms", "30", "--max-request-mb", "1",
                 "--max-pixels", str(128 * 128))
    yield srv
    rc = srv.stop(signal.SIGTERM)
    assert rc == 0 and "stopped on SIGTERM" in "".join(srv.lines), (rc, srv.lines)  # a clean shutdown


def images(n: int, seed: int = 0, side: int = 32) -> torch.Tensor:
    """Random images on the uint8 grid (k / 255), which PNG carries exactly.  (n, 3, side, side)"""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g).float() / 255.0


def png_b64(array: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def post(url: str, body: bytes | str, token: str | None = TOKEN, path: str = "/score") -> tuple[int, dict]:
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        conn.request("POST" if path == "/score" else "GET", path, body=body if path == "/score" else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def remote(url: str, name: str, **options) -> R.Reward:
    opts = ",".join(f"{k}={v}" for k, v in {"token": TOKEN, **options}.items())
    return R.load(f"remote:url={url},name={name},{opts}")


def assert_same(a: R.RewardOutput, b: R.RewardOutput) -> None:
    """Equal to 1e-5, or to float32 rounding (2e-6 relative) for scores of larger magnitude: the
    server batches items with other requests' items, and a batched reduction may round differently."""
    assert torch.equal(a.valid, b.valid)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=2e-6, equal_nan=True)
    assert a.components.keys() == b.components.keys()
    for key in a.components:
        torch.testing.assert_close(a.components[key], b.components[key], atol=1e-5, rtol=2e-6, equal_nan=True)


def test_remote_scores_equal_in_process_scores(server):
    x, prompts = images(12), PROMPTS[:11] + ["a purple dragon riding a bicycle"]  # the last: outside the grammar
    local = R.load("shapes-proxy")
    far = remote(server.url, "shapes-proxy", batch=5, concurrency=2)  # 3 requests in flight
    assert far.info.name == "shapes-proxy" and far.info.inputs == local.info.inputs
    assert not far.info.differentiable and far.info.native_range == local.info.native_range
    want, got = local(x, prompts), far(x, prompts)
    assert_same(got, want)
    assert not got.valid[-1] and "could not judge" in got.extras["reason"][-1]
    assert_same(copy.deepcopy(far)(x, prompts), want)  # a copy opens its own connections
    for encoding in ("png", "raw"):
        art = remote(server.url, "artifact", encoding=encoding)
        assert_same(art(x), R.load("artifact")(x))
    mixed = R.combine({remote(server.url, "artifact"): 1.0, "shapes-proxy": 0.5})  # remote beside local
    assert_same(mixed(x, prompts), R.combine({"artifact": 1.0, "shapes-proxy": 0.5})(x, prompts))
    video = torch.stack([x[:4], x[4:8].flip(-1)], dim=1)  # (4, 2, 3, H, W): two frames per item
    for encoding in ("png", "raw"):
        assert_same(remote(server.url, "video_frames", encoding=encoding)(video),
                    R.load("video_frames:reward=artifact,frames=2")(video))
    with pytest.raises(ValueError, match="needs prompts"):  # the served reward's inputs hold on the client
        far(x)


def test_per_sample_extras_travel(server):
    x, prompts = images(4, seed=3), PROMPTS[:3] + ["a purple dragon riding a bicycle"]
    want = R.load("shapes:mode=strict")(x, prompts)
    got = remote(server.url, "shapes")(x, prompts)
    assert_same(got, want)
    for key in ("tag", "source"):  # the gold verifier's per-sample strings
        assert got.extras[key] == list(want.extras[key]), key
    assert want.extras["reason"][-1] and want.extras["reason"][-1] in got.extras["reason"][-1]


def test_concurrent_clients_get_every_item_once_in_order_and_batched(server):
    far = remote(server.url, "shapes-proxy")
    local = R.load("shapes-proxy")
    before = far.health()["stats"]
    threads, requests, per = 8, 3, 2
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def client(t: int) -> None:
        try:
            mine = remote(server.url, "shapes-proxy")
            for r in range(requests):
                x = images(per, seed=100 * t + r)
                results[t, r] = mine(x, PROMPTS[t:t + per]).scores
        except BaseException as err:  # reported below
            errors.append(err)

    pool = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(120)
    assert not errors and not any(th.is_alive() for th in pool), errors
    for (t, r), scores in results.items():  # each request got its own items back, in order
        want = local(images(per, seed=100 * t + r), PROMPTS[t:t + per]).scores
        torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)
    after = far.health()["stats"]
    assert len(results) == threads * requests
    assert after["requests"] - before["requests"] == threads * requests
    assert after["items"] - before["items"] == threads * requests * per  # none lost, none twice
    assert after["batches"] - before["batches"] < threads * requests  # requests shared reward calls
    assert after["largest_batch"] > per


def test_token_is_required(server):
    body = json.dumps({"reward": "artifact", "images": [png_b64(np.zeros((8, 8, 3), np.uint8))]})
    for token in (None, "wrong"):
        status, answer = post(server.url, body, token=token)
        assert status == 401 and "bearer token" in answer["error"]
    assert post(server.url, "", token="wrong", path="/health")[0] == 401
    with pytest.raises(R.remote.RemoteRewardError, match="HTTP 401.*token"):
        R.load(f"remote:url={server.url},name=artifact,token=wrong")
    assert post(server.url, body)[0] == 200


def test_bad_requests_are_4xx_with_a_message_and_the_server_keeps_serving(server):
    good = png_b64(np.full((32, 32, 3), 120, np.uint8))
    truncated = good[:-3]
    cases = [
        ("{\"reward\": \"artifact\", \"images\": [", 400, "malformed JSON"),
        (json.dumps({"reward": "artifact", "images": [good, truncated]}), 400, "images[1] is not valid base64 (truncated?"),
        (json.dumps({"reward": "nope", "images": [good]}), 404, "this server serves artifact, shapes, shapes-proxy, video_frames"),
        (json.dumps({"reward": "artifact", "images": [good], "imgs": []}), 400, "unknown field(s) ['imgs']"),
        (json.dumps({"reward": "shapes-proxy", "images": [good]}), 400, "needs 'prompts'"),
        (json.dumps({"reward": "artifact", "images": [good], "prompts": ["a", "b"]}), 400, "'prompts' has 2 entries for 1"),
        (json.dumps({"images": [good]}), 400, "name the reward"),
        (json.dumps({"reward": "artifact", "images": [{"height": 2, "width": 2}]}), 400,
         "images[0]: a raw image is an object with exactly ['height', 'rgb', 'width']"),
        (json.dumps({"reward": "artifact", "images": [7]}), 400, "images[0] must be a base64 PNG / JPEG string or a raw"),
        (json.dumps({"reward": "video_frames", "videos": [[good], []]}), 400, "videos[1] must be a non-empty list"),
        (json.dumps({"reward": "artifact", "images": [png_b64(np.random.default_rng(0).integers(
            0, 256, (700, 700, 3), dtype=np.uint8))]}), 413, "larger than the server's limit of 1 MB"),
    ]
    for body, status, needle in cases:
        got, answer = post(server.url, body)
        assert got == status and needle in answer["error"], (needle, got, answer)
    # bad items: their own errors and null scores; the good items of the same request are scored
    damaged = base64.b64encode(base64.b64decode(good)[:60]).decode()
    items = [good, damaged, png_b64(np.zeros((8, 8, 4), np.uint8)), png_b64(np.zeros((200, 100, 3), np.uint8)),
             base64.b64encode(b"not an image at all").decode(), png_b64(np.full((16, 16, 3), 9, np.uint8), "JPEG"),
             {"height": 4, "width": 4, "rgb": base64.b64encode(bytes(47)).decode()}]
    status, answer = post(server.url, json.dumps({"reward": "artifact", "images": items}))
    assert status == 200
    assert [s is None for s in answer["scores"]] == [False, True, True, True, True, False, True]
    errs = answer["errors"]
    assert errs[0] is None and errs[5] is None
    assert "images[1]: the PNG data is damaged" in errs[1] or "images[1]: not a PNG or JPEG" in errs[1]
    assert "images[2]: mode RGBA (4 channels)" in errs[2]
    assert "images[3]: 100x200 = 20000 pixels is over the server's limit of 16384" in errs[3]
    assert "images[4]: not a PNG or JPEG image" in errs[4]
    assert "images[6]: 'rgb' holds 47 bytes; a 4x4 RGB image has 48" in errs[6]
    want = R.load("artifact")(images(1)[:0].new_full((1, 3, 32, 32), 120 / 255)).scores.item()
    assert answer["scores"][0] == pytest.approx(want, abs=1e-5)
    assert all(len(v) == len(items) for v in answer["components"].values())
    # still serving
    assert post(server.url, "", path="/health")[1]["status"] == "ok"
    assert remote(server.url, "artifact")(images(2)).valid.all()


def test_client_survives_a_server_restart_on_the_same_port():
    port = free_port()
    first = Server("artifact", port=port)
    far = remote(first.url, "artifact", retries=30, backoff=0.2)  # up to ~4 min of patience
    x = images(3)
    want = R.load("artifact")(x)
    assert_same(far(x), want)
    first.stop(signal.SIGKILL)
    out: dict = {}
    call = threading.Thread(target=lambda: out.update(result=far(x)))
    call.start()
    time.sleep(1.0)  # the client is now retrying against a closed port
    assert call.is_alive()
    second = Server("artifact", port=port)
    try:
        call.join(120)
        assert not call.is_alive() and "result" in out
        assert_same(out["result"], want)
    finally:
        second.stop()


def test_server_down_is_a_clear_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError) as err:
        R.load(f"remote:url={url},name=artifact,retries=2,backoff=0.01")
    message = str(err.value)
    assert url in message and "did not answer after 3 tries" in message and "visalign rewards serve" in message
    with pytest.raises(ValueError, match="not an http"):
        R.load("remote:url=127.0.0.1:8700")


def test_missing_serve_extra_names_the_install_command():
    code = ("import sys; sys.modules['uvicorn'] = None; from visalign.cli import main; "
            "sys.exit(main(['rewards', 'serve', 'artifact']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 2 and "pip install 'visalign[serve]'" in run.stderr, run.stderr


def test_visalign_score_with_a_remote_reward_equals_the_local_reward(server, tmp_path, monkeypatch):
    from visalign.cli import main

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    x = images(6, seed=7)
    for i in range(6):
        Image.fromarray((x[i] * 255).round().byte().permute(1, 2, 0).numpy()).save(gallery / f"img_{i}.png")
        (gallery / f"img_{i}.txt").write_text(PROMPTS[i])
    monkeypatch.setenv("VISALIGN_REWARD_TOKEN", TOKEN)
    rows = {}
    for tag, spec in (("local", "shapes-proxy"), ("remote", f"remote:url={server.url},name=shapes-proxy")):
        out = tmp_path / f"{tag}.jsonl"
        assert main(["score", str(gallery), "--rewards", spec, "--out", str(out), "--no-progress", "--workers", "0"]) == 0
        rows[tag] = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["local"].keys() == rows["remote"].keys() and len(rows["local"]) == 6
    for path, row in rows["local"].items():
        assert row["shapes-proxy"] == pytest.approx(rows["remote"][path]["remote"], abs=1e-5)


def test_a_toy_recipe_trains_one_iteration_with_its_reward_remote(server, tmp_path):
    from visalign.trainers import build_trainer, load_recipe

    spec = f"remote:url={server.url},name=shapes,token={TOKEN}"
    run = tmp_path / "run"
    overrides = ["run.iterations=1", f"run.run_dir={run}", "run.progress=false", "run.save_sample_grid=false",
                 "run.eval_every=0", f"rewards={json.dumps({spec: 1.0})}", "eval_rewards=[]",
                 "nft.group_size=4", "nft.prompts_per_iteration=2", "nft.num_steps=4", "nft.train_batch_size=8"]
    trainer = build_trainer(load_recipe(ROOT / "configs" / "toy" / "nft_cn.yaml", overrides))
    served = remote(server.url, "shapes").health()["stats"]["items"]
    before = torch.cat([p.detach().flatten().clone() for p in trainer.params])
    trainer.train()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["reward/valid_fraction"] == 1.0 and 0 <= rows[0]["reward/mean"] <= 1
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in trainer.params]))
    assert remote(server.url, "shapes").health()["stats"]["items"] - served == 4 * 2  # the rollouts, scored remotely


def test_a_training_run_rides_out_a_server_kill_and_restart_without_losing_an_iteration(tmp_path):
    """The server is SIGKILLed just as iteration 2 sends its rollouts and comes back on the same port
    3 s later: the client retries, the run goes on, every iteration is logged once with all its
    rewards valid, and the restarted server scored exactly the rollouts of iterations 2 and 3."""
    from visalign.trainers import build_trainer, load_recipe

    port = free_port()
    servers = [Server("shapes", port=port)]
    spec = f"remote:url={servers[0].url},name=shapes,token={TOKEN},retries=40,backoff=0.2"
    run = tmp_path / "run"
    overrides = ["run.iterations=3", f"run.run_dir={run}", "run.progress=false", "run.save_sample_grid=false",
                 "run.eval_every=0", f"rewards={json.dumps({spec: 1.0})}", "eval_rewards=[]",
                 "nft.group_size=4", "nft.prompts_per_iteration=2", "nft.num_steps=4", "nft.train_batch_size=8"]
    trainer = build_trainer(load_recipe(ROOT / "configs" / "toy" / "nft_cn.yaml", overrides))
    far = trainer.reward
    score, calls, outage = far.score, [], {}

    def restart() -> None:
        time.sleep(3.0)  # the client meanwhile retries against a closed port
        servers.append(Server("shapes", port=port))

    def score_with_an_outage(*args):
        calls.append(time.monotonic())
        if len(calls) == 2:  # iteration 2's rollouts: kill the server under the client
            servers[0].stop(signal.SIGKILL)
            outage["restart"] = threading.Thread(target=restart)
            outage["restart"].start()
            out = score(*args)
            outage["seconds"] = time.monotonic() - calls[-1]
            return out
        return score(*args)

    far.score = score_with_an_outage
    try:
        trainer.train()
        outage["restart"].join(120)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [1, 2, 3], rows
        assert all(r["reward/valid_fraction"] == 1.0 for r in rows)
        assert outage["seconds"] >= 2.5  # the iteration really waited for the restarted server
        assert len(calls) == 3
        assert remote(servers[1].url, "shapes").health()["stats"]["items"] == 2 * 4 * 2  # iterations 2 and 3
    finally:
        for srv in servers:
            srv.stop()


def test_rewards_the_server_cannot_serve_faithfully_are_refused():
    from visalign.serve import load_served

    for specs, needle in ((["diversity"], "scores each sample against the others"),
                          (["artifact", "artifact"], "two specs serve the name 'artifact'"),
                          (["remote:url=http://127.0.0.1:1"], "serves local rewards")):
        with pytest.raises(ValueError, match=needle):
            load_served(specs)


def test_visalign_steer_best_of_n_with_a_remote_reward_picks_as_the_local_one(server, tmp_path, monkeypatch, capsys):
    from visalign.cli import main

    monkeypatch.setenv("VISALIGN_REWARD_TOKEN", TOKEN)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle\ntwo squares\n")
    rows = {}
    for tag, spec in (("local", "shapes-proxy"), ("remote", f"remote:url={server.url},name=shapes-proxy")):
        out = tmp_path / tag
        assert main(["steer", "--model", "toy-shapes", "--prompts", str(prompts), "--method", "bon", "--reward", spec,
                     "--particles", "3", "--steps", "2", "--seed", "7", "--out", str(out), "--threads", "1",
                     "--no-grid"]) == 0
        rows[tag] = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len({r for row in rows["local"] for r in row["particle_rewards"]}) > 1  # the choice is not a tie
    for a, b in zip(rows["local"], rows["remote"], strict=True):
        # the sampler's float images reach the server as 8-bit PNG (at most 1/510 a pixel off), hence 1e-3
        assert a["particle_rewards"] == pytest.approx(b["particle_rewards"], abs=1e-3) and a["seeds"] == b["seeds"]
        pick = [max(range(3), key=r["particle_rewards"].__getitem__) for r in (a, b)]
        assert pick[0] == pick[1]
    # gradient guidance needs a gradient, which no remote reward has
    assert main(["steer", "--model", "toy-shapes", "--prompt", "a circle", "--method", "guidance", "--reward",
                 f"remote:url={server.url},name=shapes-proxy", "--steps", "2", "--out", str(tmp_path / "g"),
                 "--threads", "1"]) == 2
    assert "differentiable" in capsys.readouterr().err


PICKY = '''
from visalign import rewards as R
from visalign.rewards import Reward, RewardInfo, RewardOutput
from visalign.serve import Limits, load_served, serve


class Picky(Reward):
    """Test reward: the mean pixel; rejects the prompt 'boom' (an input error), fails on 'crash'."""

    info = RewardInfo("picky", inputs=("images", "prompts"))

    def score(self, images, prompts, references, metadata):
        if "boom" in prompts:
            raise ValueError("the prompt 'boom' is not one this reward scores")
        if "crash" in prompts:
            raise RuntimeError("CUDA out of memory (a server fault)")
        return RewardOutput(images.flatten(1).mean(1))


R.register(Picky.info, Picky)
serve(load_served(["picky"]), port=0, limits=Limits(max_wait_ms=1000), log=lambda line: print(line, flush=True))
'''


def test_a_request_the_reward_rejects_fails_alone(tmp_path):
    """Requests batched together: the one whose input the reward rejects gets 422 with the reward's
    message, the others their scores; a server fault is a 500; the server goes on."""
    script = tmp_path / "picky_server.py"
    script.write_text(PICKY)
    srv = Server("", token=None, command=[sys.executable, str(script)])
    try:
        x = images(3, seed=11)
        encoded = [png_b64((x[i] * 255).round().byte().permute(1, 2, 0).numpy()) for i in range(3)]
        bodies = {tag: json.dumps({"images": encoded, "prompts": prompts})
                  for tag, prompts in (("a", ["p", "q", "r"]), ("bad", ["p", "boom", "r"]), ("c", ["s", "t", "u"]))}
        answers: dict = {}
        pool = [threading.Thread(target=lambda t=tag: answers.update({t: post(srv.url, bodies[t], token=None)}))
                for tag in bodies]
        for th in pool:
            th.start()
        for th in pool:
            th.join(60)
        stats = post(srv.url, "", token=None, path="/health")[1]["stats"]
        assert stats["batches"] < 3 and stats["failed_calls"] == 1  # batched together, then each request alone
        want = x.flatten(1).mean(1).tolist()
        for tag in ("a", "c"):
            status, answer = answers[tag]
            assert status == 200 and answer["scores"] == pytest.approx(want, abs=1e-6), answer
        status, answer = answers["bad"]
        assert status == 422 and "ValueError: the prompt 'boom' is not one this reward scores" in answer["error"]
        status, answer = post(srv.url, bodies["a"].replace('"q"', '"crash"'), token=None)
        assert status == 500 and "CUDA out of memory" in answer["error"]
        assert post(srv.url, bodies["c"], token=None)[0] == 200
    finally:
        assert srv.stop() == 0
