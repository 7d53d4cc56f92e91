"""Scoring outside the run: the ``rlflow-reward/1`` HTTP protocol, the ``http`` reward client and
``rlflow serve-reward`` (a real Ray Serve application on a real local Ray cluster)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import rewards.http  # noqa: F401  (registers "http" until rewards/__init__ lists it)
from rewards import build_reward
from rewards.http import PROTOCOL, HttpReward, HttpRewardError, decode_request, encode_request, quantize
from rlflow.cli import main
from rlflow.config import validate
from rlflow.trainer import Trainer
from rlflow.types import Conditions, Media
from rlflow.worlds.shapes.scene import all_specs, render, sample_scene
from tests.helpers import metric_history, start_local_ray, tiny_config, tiny_run

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_run(name="tiny-http", train={"steps": 2, "checkpoint_every": 2})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shapes_batch(n: int, seed: int = 0, noise: float = 0.0) -> tuple[Media, Conditions]:
    """World scenes and their prompts (``noise``: added pixel noise, so the 8-bit round trip matters)."""
    rng = np.random.default_rng(seed)
    specs = all_specs()
    picked = [specs[int(i)] for i in rng.integers(len(specs), size=n)]
    images = torch.from_numpy(np.stack([render(sample_scene(s, rng)) for s in picked]))
    images = (images + noise * torch.from_numpy(rng.standard_normal(images.shape).astype(np.float32))).clamp(0, 1)
    meta = tuple({"kind": s.kind, "i": i} for i, s in enumerate(picked))
    return Media(images=images), Conditions(tuple(s.prompt for s in picked), metadata=meta)


# ---- the protocol, no server
def test_protocol_round_trip_is_lossless_at_8_bits():
    media, cond = _shapes_batch(3, noise=0.1)
    m, c = decode_request(json.loads(json.dumps(encode_request(media, cond))))
    assert torch.equal(m.images, quantize(media.images)) and not m.is_video
    assert c.prompts == cond.prompts and c.metadata == cond.metadata and c.source_images is None
    video, src = torch.rand(2, 3, 3, 8, 12), torch.rand(2, 2, 3, 5, 5)
    m, c = decode_request(json.loads(json.dumps(encode_request(Media(video=video, fps=12.0),
                                                               Conditions(("a", "b"), source_images=src)))))
    assert torch.equal(m.video, quantize(video)) and m.fps == 12.0
    assert torch.equal(c.source_images, quantize(src))


def test_server_handler_names_malformed_requests():
    from workers.reward_server import RewardServer
    from workers.serve_reward import handle

    server = RewardServer("shapes_geneval", {}, 4)
    media, cond = _shapes_batch(2)
    good = encode_request(media, cond)
    status, answer = handle(server, json.dumps(good).encode())
    assert status == 200 and len(answer["scores"]) == 2 and answer["reward"] == "shapes_geneval"
    for body, match in [
        (b"not json", "not JSON"),
        (json.dumps({**good, "protocol": "rlflow-reward/0"}).encode(), "protocol 'rlflow-reward/0' is not served"),
        (json.dumps({**good, "samples": [{**good["samples"][0], "images": ["bm90IGEgcG5n"]}]}).encode(),
         r"samples\[0\].images\[0\]: not a base64 PNG"),
    ]:
        status, answer = handle(server, body)
        assert status == 400
        assert re.search(match, answer["error"]), answer


# ---- a real Ray Serve application
@pytest.fixture(scope="module")
def served():
    """A local Ray cluster with ``rlflow serve-reward``'s application of ``shapes_geneval`` (1 replica, half
    a CPU) at ``/score``, and of a reward that always fails at ``/broken``."""
    from ray import serve

    from workers.serve_reward import serve_reward

    start_local_ray()
    port = _free_port()
    base = {"replicas": 1, "num_cpus": 0.5, "max_batch_size": 4}
    cfg = validate({"reward": {"name": "shapes_geneval", **base}}).reward
    url = serve_reward(cfg, port=port, route="/score", threads=1)
    broken = validate({"reward": {"name": "tests.plugins.my_rewards:broken", **base, "num_cpus": 0.25}}).reward
    broken_url = serve_reward(broken, port=port, route="/broken", threads=1)
    yield {"url": url, "broken": broken_url, "port": port}
    serve.shutdown()
    ray.shutdown()


def test_served_reward_scores_as_the_in_process_reward(served):
    """Same images (noisy, so they are not 8-bit already), same scores and components, to the bit, as the
    in-process reward on the 8-bit images; 11 samples in requests of 4 (and batches of reward.max_batch_size=4
    on the server)."""
    info = json.loads(urllib.request.urlopen(served["url"], timeout=30).read())
    assert info == {"protocol": PROTOCOL, "reward": "shapes_geneval", "max_batch_size": 4}
    media, cond = _shapes_batch(11, seed=1, noise=0.05)
    client = build_reward("http", {"url": served["url"], "batch_size": 4})
    got = client(media, cond)
    want = build_reward("shapes_geneval")(Media(images=quantize(media.images)), cond)
    assert torch.equal(got.score, want.score)
    assert set(got.components) == set(want.components) == {"partial", "strict", "valid_objects", "objects"}
    for key, value in want.components.items():
        assert torch.equal(got.components[key], value), key
    assert got.score.dtype == torch.float32 and got.score.shape == (11,)


def test_a_reward_failing_on_the_server_is_a_named_error_not_retried(served):
    client = HttpReward(served["broken"], retries=3, retry_backoff_s=5.0)
    media, cond = _shapes_batch(3)
    t0 = time.monotonic()
    with pytest.raises(HttpRewardError) as err:
        client(media, cond)
    msg = str(err.value)
    assert f"reward 'http' at {served['broken']}, samples 0..2" in msg and "HTTP 422" in msg, msg
    assert "tests.plugins.my_rewards:broken" in msg and "non-finite" in msg, msg
    assert "after 1 attempt(s)" in msg and time.monotonic() - t0 < 5.0  # a deterministic failure: no retry


def test_toy_run_trains_with_the_served_reward(served, tmp_path):
    """A toy run with ``reward.name: http`` computes the same run as one scoring the same reward in-process on
    8-bit images: the served reward's scores are what the run learns from."""

    class EightBitGenEval:
        def __init__(self):
            self.fn = build_reward("shapes_geneval")

        def __call__(self, media, conditions):
            return self.fn(Media(images=quantize(media.images)), conditions)

    http_cfg = tiny_config(TINY, tmp_path, reward={"name": "http", "kwargs": {"url": served["url"]}})
    remote = Trainer(http_cfg, build_reward("http", http_cfg.reward.kwargs), tmp_path / "http")
    remote.run()
    local = Trainer(tiny_config(TINY, tmp_path), EightBitGenEval(), tmp_path / "local")
    local.run()
    served_rewards = metric_history(remote, "reward/mean")
    assert len(served_rewards) == 2
    assert served_rewards == metric_history(local, "reward/mean")
    for key in ("reward/partial_mean", "reward/objects_mean"):  # the served reward's components, logged
        assert len(metric_history(remote, key)) == 2 and metric_history(remote, key) == metric_history(local, key)


def test_serve_reward_command_deploys_on_a_running_cluster(served, tmp_path):
    """``rlflow serve-reward CONFIG --address ... --detach`` in its own process: the application it leaves on
    the cluster answers the protocol."""
    from ray import serve

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("reward:\n  name: shapes_geneval\n  num_cpus: 0.25\n  max_batch_size: 8\n")
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-m", "rlflow", "serve-reward", str(cfg), "--address", address, "--detach",
         "--port", str(served["port"]), "--route", "/cli", "--name", "cli-app", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert line["url"] == f"http://127.0.0.1:{served['port']}/cli"
    assert line["config"] == {"reward": {"name": "http", "kwargs": {"url": line["url"]}}}
    moved = subprocess.run(  # Serve's proxy cannot move: a different port is an error, not a wrong URL
        [sys.executable, "-m", "rlflow", "serve-reward", str(cfg), "--address", address, "--detach",
         "--port", str(served["port"] + 1), "--route", "/cli2", "--name", "cli-app2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert moved.returncode == 2 and f"use --host 127.0.0.1 --port {served['port']}" in moved.stderr, moved.stderr[-2000:]
    try:
        media, cond = _shapes_batch(2, seed=3)
        out = HttpReward(line["url"])(media, cond)
        assert torch.equal(out.score, build_reward("shapes_geneval")(Media(images=quantize(media.images)), cond).score)
    finally:
        serve.delete("cli-app")


def test_serve_reward_command_refuses_bad_input(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reward:\n  name: http\n  kwargs: {url: 'http://127.0.0.1:1/score'}\n")
    assert main(["serve-reward", str(cfg), "--detach"]) == 2
    assert "--detach needs --address" in capsys.readouterr().err
    assert main(["serve-reward", str(cfg), "--set", "reward.name=no_such_reward"]) == 2
    assert "no_such_reward" in capsys.readouterr().err


# ---- a bad server: a plain stdlib http.server on loopback, because a correct server (the Serve app above)
# ---- never answers with a 500, a malformed body, a wrong length or too late; any server of the protocol may.
class _Bad:
    def __init__(self, mode: str):
        self.mode, self.calls, self.headers = mode, 0, []
        bad = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                bad.calls += 1
                bad.headers.append(dict(self.headers))
                n = len(body["samples"])
                answer: object = {"protocol": PROTOCOL, "scores": [0.5] * n, "components": {}}
                status = 200
                if bad.mode == "500":
                    status, answer = 500, {"protocol": PROTOCOL, "error": "the judge fell over"}
                elif bad.mode == "malformed":
                    answer = "<html>not json</html>"
                elif bad.mode == "no_scores":
                    answer = {"protocol": PROTOCOL, "score": [0.5] * n}
                elif bad.mode == "short":
                    answer = {"protocol": PROTOCOL, "scores": [0.5] * (n - 1)}
                elif bad.mode == "nan":
                    answer = {"protocol": PROTOCOL, "scores": [0.5] * (n - 1) + [float("nan")]}
                elif bad.mode == "slow":
                    time.sleep(1.5)
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout case)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bad_server():
    made = []

    def make(mode):
        made.append(_Bad(mode))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("mode, match, calls", [
    ("500", r"request failed after 3 attempt\(s\) \(retries=2\): HTTP 500 .*the judge fell over", 3),
    ("malformed", r"malformed answer \(not JSON", 1),
    ("no_scores", r"malformed answer: the answer has no 'scores'", 1),
    ("short", r"malformed answer: 'scores' has 2 values for 3 samples", 1),
    ("nan", r"malformed answer: 'scores' has 1 non-finite value\(s\) \(samples \[2\]", 1),
    ("slow", r"request failed after 2 attempt\(s\) \(retries=1\): timed out after 0.5s", 2),
])
def test_a_bad_answer_is_a_named_error_never_a_zero(bad_server, mode, match, calls):
    server = bad_server(mode)
    url = f"http://127.0.0.1:{server.port}/score"
    client = build_reward("http", {"url": url, "timeout_s": 0.5, "retries": 1 if mode == "slow" else 2,
                                   "retry_backoff_s": 0.01, "batch_size": 3})
    media, cond = _shapes_batch(5)
    with pytest.raises(HttpRewardError, match=f"reward 'http' at {url}, samples 0..2: {match}"):
        client(media, cond)
    assert server.calls == calls


def test_credentials_reach_the_server_and_never_the_message(bad_server, monkeypatch):
    server = bad_server("500")
    monkeypatch.setenv("RLFLOW_TEST_REWARD_KEY", "s3cret-key")
    monkeypatch.setenv("RLFLOW_TEST_TENANT", "tenant-7")
    client = HttpReward(f"http://alice:pa55word@127.0.0.1:{server.port}/score", retries=0,
                        api_key_env="RLFLOW_TEST_REWARD_KEY", headers_env={"X-Tenant": "RLFLOW_TEST_TENANT"})
    media, cond = _shapes_batch(2)
    with pytest.raises(HttpRewardError) as err:
        client(media, cond)
    msg = str(err.value)
    assert f"at http://***@127.0.0.1:{server.port}/score" in msg
    assert "pa55word" not in msg and "s3cret" not in msg and "pa55word" not in repr(client)
    sent = server.headers[0]
    assert sent["Authorization"] == "Bearer s3cret-key" and sent["X-Tenant"] == "tenant-7"
    # no key variable: the user/password of the URL go as Basic auth
    basic = HttpReward(f"http://alice:pa55word@127.0.0.1:{server.port}/score", retries=0)._headers()
    assert basic["Authorization"] == "Basic " + base64.b64encode(b"alice:pa55word").decode()
    monkeypatch.delenv("RLFLOW_TEST_REWARD_KEY")
    with pytest.raises(ValueError, match="'RLFLOW_TEST_REWARD_KEY' .* is not set"):
        HttpReward(f"http://127.0.0.1:{server.port}/score", api_key_env="RLFLOW_TEST_REWARD_KEY")


def test_a_refused_connection_is_retried_then_named():
    port = _free_port()  # nothing listens there
    client = HttpReward(f"http://127.0.0.1:{port}/score", retries=1, retry_backoff_s=0.01)
    media, cond = _shapes_batch(2)
    with pytest.raises(HttpRewardError, match=rf"at http://127.0.0.1:{port}/score, samples 0..1: request failed "
                       r"after 2 attempt\(s\) \(retries=1\): URLError: .*refused"):
        client(media, cond)
