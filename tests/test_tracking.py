"""rlflow.tracking against a local sqlite store and a real ``mlflow server``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image, ImageSequence

from rlflow.tracking import (
    GRID_GAP,
    Tracker,
    default_tracking_uri,
    flatten,
    image_grid,
    start_server,
    stop_server,
    video_strips,
    wait_for_server,
)
from rlflow.types import Media


def test_flatten_nested_with_lists():
    d = {"a": 1, "b": {"c": [1, 2, "x"], "d": {"e": None, "f": 0.5}}, "g": (True,), "h": {}}
    assert flatten(d) == {
        "a": "1",
        "b.c": '[1, 2, "x"]',
        "b.d.e": "None",
        "b.d.f": "0.5",
        "g": "[true]",
        "h": "{}",
    }
    assert flatten({"x": {"y": 1}}, prefix="cfg.") == {"cfg.x.y": "1"}


def test_image_grid_layout():
    imgs = np.random.default_rng(0).random((10, 3, 20, 30))
    grid = image_grid(imgs, ["a long caption that has to wrap over several lines " * 3] + ["b"] * 9)
    # 8 columns, tiles upscaled x4 (30 -> 120 px >= 96), 2 rows
    assert grid.width == 8 * (120 + GRID_GAP) + GRID_GAP
    assert grid.height > 2 * (80 + GRID_GAP)
    with pytest.raises(ValueError):
        image_grid(imgs, ["only one"])
    with pytest.raises(ValueError):
        image_grid(np.zeros((2, 20, 30)), [])


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_sqlite_store_roundtrip_and_resume(tmp_path: Path):
    uri = default_tracking_uri(tmp_path / "out")
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve().as_posix()}"
    params = {"train": {"lr": 3e-4, "steps": 3}, "prompts": ["a cat", "a dog"], "long": "x" * 7000}

    tracker = Tracker(uri, "unit", run_name="r1", tags={"algo": "dppo"})
    assert tracker.run_url.startswith("rlflow ui --output-dir ")
    assert tracker.run_url.endswith(f"#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}")
    tracker.log_params(params)
    for step in range(3):
        tracker.log_metrics({"reward/mean": 0.1 * step, "loss": np.float32(1.0 - step)}, step=step)
    images = torch.rand(4, 3, 16, 16)
    png = tracker.log_image_grid(images, ["red square", "blue circle", "", "two green triangles"], step=2)
    assert png.is_file()
    tracker.log_dict({"name": "run", "algo": {"clip": 0.2}}, "config.yaml")
    tracker.log_dict({"x": [1, 2]}, "eval/summary.json")
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "lora.safetensors").write_bytes(b"\0" * 10)
    (ckpt / "sub" / "opt.pt").write_bytes(b"\1" * 5)
    tracker.log_artifact(ckpt, "checkpoints/step_2")
    tracker.finish()
    tracker.finish()  # idempotent
    assert not png.exists()  # temp files go with finish()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert run.data.tags["algo"] == "dppo"
    expected = flatten(params)
    expected["long"] = "x" * 6000
    assert run.data.params == expected
    assert _history(client, tracker.run_id, "loss") == [(0, 1.0), (1, 0.0), (2, -1.0)]
    reward = _history(client, tracker.run_id, "reward/mean")
    assert [s for s, _ in reward] == [0, 1, 2]
    assert [v for _, v in reward] == pytest.approx([0.0, 0.1, 0.2])
    assert all(m.timestamp > 0 for m in client.get_metric_history(tracker.run_id, "loss"))

    # artifacts live next to the db
    assert run.info.artifact_uri.startswith((tmp_path / "out" / "mlartifacts" / "unit").resolve().as_uri())
    assert {f.path for f in client.list_artifacts(tracker.run_id, "images")} == {
        "images/samples_step000002.png",
        "images/samples_step000002.json",
    }
    local = Path(client.download_artifacts(tracker.run_id, "images", str(tmp_path / "dl")))
    with Image.open(local / "samples_step000002.png") as im:
        assert im.format == "PNG"
        assert im.width == 4 * (96 + GRID_GAP) + GRID_GAP  # 16 px tiles upscaled x6
        assert im.height > 96 + GRID_GAP
    assert json.loads((local / "samples_step000002.json").read_text())[3] == "two green triangles"
    top = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "eval", "checkpoints", "images"} <= top
    ck = {f.path for f in client.list_artifacts(tracker.run_id, "checkpoints/step_2")}
    assert ck == {"checkpoints/step_2/lora.safetensors", "checkpoints/step_2/sub"}
    cfg = Path(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl")))
    assert cfg.read_text().startswith("name: run")

    # resume: same run, params re-logged without error, history continues
    with Tracker(uri, "unit", run_id=tracker.run_id) as resumed:
        assert resumed.run_id == tracker.run_id
        assert client.get_run(tracker.run_id).info.status == "RUNNING"
        resumed.log_params(params)
        resumed.log_params({"resume": {"from_step": 3}})
        for step in range(3, 5):
            resumed.log_metrics({"loss": -float(step)}, step=step)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["resume.from_step"] == "3"
    assert [s for s, _ in _history(client, tracker.run_id, "loss")] == [0, 1, 2, 3, 4]
    assert len(client.search_runs([tracker.experiment_id])) == 1

    # an exception inside the block marks the run FAILED
    with pytest.raises(RuntimeError), Tracker(uri, "unit") as failing:
        raise RuntimeError("boom")
    assert client.get_run(failing.run_id).info.status == "FAILED"
    with pytest.raises(ValueError):
        failing.finish("DONE")


# --------------------------------------------------------------------------- video / media


def _solid_video(b: int = 2, t: int = 4, size: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """[B,T,3,size,size] video whose frame k of sample b is one solid colour, and those colours [B,T,3] uint8."""
    colours = np.array(
        [[[40 + 40 * k, 200 if s == 0 else 50, 30 + 100 * s] for k in range(t)] for s in range(b)],
        dtype=np.uint8,
    )
    video = torch.from_numpy(colours.astype(np.float32) / 255.0)[:, :, :, None, None]
    video = video.expand(b, t, 3, size, size)
    return video.contiguous(), colours


def _tile_centre(b: int, j: int, tile: int, row_h: int) -> tuple[int, int]:
    """(x, y) of the centre of tile j in row b of a filmstrip (video_strips' documented layout)."""
    return GRID_GAP + j * (tile + GRID_GAP) + tile // 2, GRID_GAP + b * (row_h + GRID_GAP) + tile // 2


def test_video_strips_layout_and_colours():
    video, colours = _solid_video()  # B=2, T=4, 8x8 frames -> tiles upscaled x12 to 96 px
    tile = 96
    plain = video_strips(video)
    assert plain.size == (4 * (tile + GRID_GAP) + GRID_GAP, 2 * (tile + GRID_GAP) + GRID_GAP)
    px = np.asarray(plain)
    for b in range(2):
        for k in range(4):
            x, y = _tile_centre(b, k, tile, tile)
            assert tuple(px[y, x]) == tuple(colours[b, k]), (b, k)
            # tile corners too: the whole tile is the frame, not a neighbour's
            y0, x0 = GRID_GAP + b * (tile + GRID_GAP), GRID_GAP + k * (tile + GRID_GAP)
            assert (px[y0 : y0 + tile, x0 : x0 + tile] == colours[b, k]).all(), (b, k)
    assert (px[0, :] == 255).all() and (px[:, 0] == 255).all()  # white border

    # captions add the same band under every row, with text in it; the tiles do not change
    captioned = video_strips(video, ["a red fox", "two"])
    assert captioned.width == plain.width
    cap_h = (captioned.height - plain.height) // 2
    assert cap_h > 0 and captioned.height == 2 * (tile + cap_h + GRID_GAP) + GRID_GAP
    cpx = np.asarray(captioned)
    for b in range(2):
        y0 = GRID_GAP + b * (tile + cap_h + GRID_GAP)
        assert (cpx[y0 : y0 + tile] == px[GRID_GAP + b * (tile + GRID_GAP) :][:tile]).all()
        band = cpx[y0 + tile : y0 + tile + cap_h]
        assert (band < 128).any(), f"no caption text under row {b}"

    # at most max_frames evenly spaced frames, first and last included
    two = np.asarray(video_strips(video, max_frames=2))
    assert two.shape[1] == 2 * (tile + GRID_GAP) + GRID_GAP
    for j, k in enumerate([0, 3]):
        x, y = _tile_centre(1, j, tile, tile)
        assert tuple(two[y, x]) == tuple(colours[1, k])
    three = np.asarray(video_strips(video, max_frames=3))
    assert [tuple(three[_tile_centre(0, j, tile, tile)[::-1]]) for j in range(3)] == [
        tuple(colours[0, k]) for k in (0, 2, 3)
    ]
    one = np.asarray(video_strips(video, max_frames=1))  # the middle frame, as Media.stills
    assert tuple(one[_tile_centre(0, 0, tile, tile)[::-1]]) == tuple(colours[0, 2])

    with pytest.raises(ValueError, match="3 captions for 2"):
        video_strips(video, ["a", "b", "c"])
    with pytest.raises(ValueError):
        video_strips(video[:, 0])  # [B,3,H,W] is not a video


@pytest.fixture(scope="module")
def media_tracker(tmp_path_factory):
    """One local-store run shared by the media tests (creating a sqlite store takes a while)."""
    uri = default_tracking_uri(tmp_path_factory.mktemp("media"))
    tracker = Tracker(uri, "media", run_name="media")
    yield tracker, MlflowClient(tracking_uri=uri)
    tracker.finish()


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, "images")}


def test_log_media_video_logs_filmstrip_and_gif(media_tracker, tmp_path: Path):
    tracker, client = media_tracker
    video, colours = _solid_video()
    caps = ["a red fox", "a blue bird"]
    paths = tracker.log_media(Media(video=video, fps=10.0), caps, step=7, name="vid")
    assert [p.name for p in paths] == ["vid_step000007.png", "vid_step000007.gif"]
    assert all(p.is_file() for p in paths)
    assert {"images/vid_step000007.png", "images/vid_step000007.gif", "images/vid_step000007.json"} <= (
        _artifacts(client, tracker.run_id)
    )

    dl = tmp_path / "dl"
    dl.mkdir()
    png = Path(client.download_artifacts(tracker.run_id, "images/vid_step000007.png", str(dl)))
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert (np.asarray(im.convert("RGB")) == np.asarray(video_strips(video, caps))).all()
    gif = Path(client.download_artifacts(tracker.run_id, "images/vid_step000007.gif", str(dl)))
    with Image.open(gif) as im:
        assert im.format == "GIF"
        assert im.n_frames == 4
        assert im.info["loop"] == 0
        expected_size = image_grid(video[:, 0], caps).size
        for k, frame in enumerate(ImageSequence.Iterator(im)):
            assert frame.info["duration"] == 100  # 10 fps
            rgb = np.asarray(frame.convert("RGB")).astype(int)
            assert rgb.shape[1::-1] == expected_size
            for b in range(2):  # grid tile b (one row of 2 tiles) shows sample b's frame k
                x, y = GRID_GAP + b * (96 + GRID_GAP) + 48, GRID_GAP + 48
                assert np.abs(rgb[y, x] - colours[b, k]).max() <= 8, (k, b, rgb[y, x], colours[b, k])
    cap = Path(client.download_artifacts(tracker.run_id, "images/vid_step000007.json", str(dl)))
    assert json.loads(cap.read_text()) == caps

    # no fps -> 8 fps (125 ms; GIF stores centiseconds)
    (_, gif0) = tracker.log_media(Media(video=video), caps, step=8, name="vid")
    with Image.open(gif0) as im:
        assert im.n_frames == 4
        assert 120 <= im.info["duration"] <= 130


def test_log_media_images_matches_log_image_grid(media_tracker, tmp_path: Path):
    tracker, client = media_tracker
    images = torch.rand(3, 3, 16, 16)
    caps = ["red square", "", "two green triangles"]
    paths = tracker.log_media(Media(images=images), caps, step=3, name="img")
    assert [p.name for p in paths] == ["img_step000003.png"]
    ref = tracker.log_image_grid(images, caps, step=3, name="ref")
    assert paths[0].read_bytes() == ref.read_bytes()
    names = _artifacts(client, tracker.run_id)
    assert {"images/img_step000003.png", "images/img_step000003.json"} <= names
    assert "images/img_step000003.gif" not in names
    logged = Path(client.download_artifacts(tracker.run_id, "images/img_step000003.png", str(tmp_path)))
    with Image.open(logged) as im:
        assert (np.asarray(im) == np.asarray(image_grid(images, caps))).all()


def test_log_media_rejects_caption_count(media_tracker):
    tracker, client = media_tracker
    video, _ = _solid_video()
    before = _artifacts(client, tracker.run_id)
    with pytest.raises(ValueError, match=r"3 captions for 2 samples"):
        tracker.log_media(Media(video=video), ["a", "b", "c"], step=9, name="bad")
    with pytest.raises(ValueError, match=r"1 captions for 3 samples"):
        tracker.log_media(Media(images=torch.rand(3, 3, 8, 8)), ["a"], step=9, name="bad")
    with pytest.raises(ValueError, match=r"0 captions for 2 samples"):
        tracker.log_media(Media(video=video), [], step=9, name="bad")
    assert _artifacts(client, tracker.run_id) == before  # nothing logged


# --------------------------------------------------------------------------- real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on a free loopback port; yields (http uri, artifacts dir)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    artifacts = root / "artifacts"
    log = root / "server.log"
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = start_server(f"sqlite:///{(root / 'mlflow.db').as_posix()}", artifacts, port, log_file=log)
    try:
        try:
            wait_for_server(uri, timeout=90, proc=proc)
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"{e}\n--- server log ---\n{log.read_text()[-4000:]}") from e
        print(f"mlflow server ready in {time.monotonic() - t0:.1f} s")
        yield uri, artifacts
    finally:
        stop_server(proc)
        left = subprocess.run(["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True)
        assert left.stdout.strip() == "", f"server processes left: {left.stdout}"


def test_tracker_through_server(mlflow_server, tmp_path: Path):
    uri, artifacts = mlflow_server
    with Tracker(uri, "server-test", run_name="remote") as tracker:
        assert tracker.run_url.startswith(uri)
        assert tracker.run_url == f"{uri}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
        tracker.log_params({"algo": {"name": "grpo", "beta": 0.01}})
        for step in range(3):
            tracker.log_metrics({"reward": float(step) / 2}, step=step)
        tracker.log_image_grid(torch.rand(3, 3, 32, 32), ["a", "b", "c"], step=1, name="eval")

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"algo.name": "grpo", "algo.beta": "0.01"}
    assert _history(client, tracker.run_id, "reward") == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    names = {f.path for f in client.list_artifacts(tracker.run_id, "images")}
    assert "images/eval_step000001.png" in names
    local = Path(client.download_artifacts(tracker.run_id, "images/eval_step000001.png", str(tmp_path)))
    with Image.open(local) as im:
        assert im.width == 3 * (96 + GRID_GAP) + GRID_GAP

    # uploaded through the server: the file sits in the server's artifacts destination
    stored = list(artifacts.rglob("eval_step000001.png"))
    assert len(stored) == 1
    assert tracker.run_id in stored[0].parts
    assert stored[0].read_bytes() == local.read_bytes()


def test_rlflow_ui_serves_the_local_store(tmp_path: Path):
    """`rlflow ui` (a real MLflow server over the run folder's sqlite store) shows runs and their images."""
    import urllib.request

    from rlflow.tracking import stop_server, wait_for_server

    with Tracker(default_tracking_uri(tmp_path), "ui-test", run_name="r") as tr:
        tr.log_metrics({"reward/mean": 0.5}, step=1)
        tr.log_image_grid(torch.rand(2, 3, 8, 8), ["a", "b"], step=1, name="eval")
        run_id = tr.run_id
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "rlflow"), "ui", "--output-dir", str(tmp_path), "--port", str(port)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, timeout=90, proc=proc)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}") as r:
            run = json.load(r)["run"]
        assert run["data"]["metrics"][0]["key"] == "reward/mean"
        path = "images/eval_step000001.png"
        with urllib.request.urlopen(f"{base}/get-artifact?path={path}&run_uuid={run_id}") as r:
            assert r.read()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        stop_server(proc)


def test_runs_started_together_on_a_fresh_sqlite_store_all_succeed(tmp_path: Path):
    """Several runs started at the same moment on a new ``runs/`` folder: MLflow migrates a fresh sqlite store
    on first use, and without the tracker's file lock two migrations race (``duplicate column name``)."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("import sys; from rlflow.tracking import Tracker; "
            f"t = Tracker({uri!r}, 'exp', run_name=sys.argv[1]); t.log_metrics({{'m': 1.0}}, step=0); t.finish()")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"r{i}"], stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("exp")
    assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == ["r0", "r1", "r2", "r3"]
