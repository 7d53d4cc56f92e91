"""Experiment tracking on MLflow.

Everything goes through ``mlflow.tracking.MlflowClient`` with an explicit tracking URI and run id, never
through MLflow's fluent (process-global) run API, so several processes can log to the same run.

Two store layouts are supported:

* local: ``default_tracking_uri(output_dir)`` -> ``sqlite:///<output_dir>/mlflow.db`` with artifacts in
  ``<output_dir>/mlartifacts/<experiment>``; browse it with ``serve_ui(output_dir)``.
* server: ``http://host:port`` of an ``mlflow server`` started with ``--serve-artifacts`` (see
  ``start_server``); clients upload artifacts through the server.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # rlflow.types imports torch; tracking stays light at runtime
    from rlflow.types import Media

__all__ = [
    "Tracker",
    "default_tracking_uri",
    "flatten",
    "image_grid",
    "to_uint8",
    "serve_ui",
    "server_command",
    "start_server",
    "stop_server",
    "video_strips",
    "wait_for_server",
]

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
_PARAMS_PER_BATCH = 100  # MLflow's limit on params (or tags) per log_batch
_METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch
_STATUSES = ("FINISHED", "FAILED", "KILLED")

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"

GRID_MAX_COLS = 8
GRID_MIN_TILE = 96  # tiles are upscaled by an integer factor to at least this width
GRID_GAP = 2  # pixels between tiles and around the border
GRID_MAX_LINES = 4  # caption lines per tile; longer captions end in "..."
STRIP_MAX_FRAMES = 8  # frames per sample in a video filmstrip
GIF_DEFAULT_FPS = 8.0  # GIF frame rate when the media carries no fps


# --------------------------------------------------------------------------- URIs and params


def default_tracking_uri(output_dir: str | Path) -> str:
    """``sqlite:///<abs output_dir>/mlflow.db``; creates ``output_dir``."""
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(out / DB_NAME).as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    """Database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}``; lists/tuples as JSON, everything else ``str()``."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(value, prefix=f"{name}."))
            else:
                out[name] = "{}"
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = str(value)
    return out


# --------------------------------------------------------------------------- image grid


def to_uint8(images: Any) -> np.ndarray:
    """Float tensor/array [B,C,H,W] in [0,1] -> uint8 array [B,H,W,3]."""
    if hasattr(images, "detach"):  # torch.Tensor, without importing torch here
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B,3,H,W], got {tuple(arr.shape)}")
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    arr = np.clip(arr, 0.0, 1.0) * 255.0
    return np.rint(arr).astype(np.uint8).transpose(0, 2, 3, 1)


def _videoto_uint8(video: Any) -> np.ndarray:
    """Float tensor/array [B,T,C,H,W] in [0,1] -> uint8 array [B,T,H,W,3]."""
    if hasattr(video, "detach"):  # torch.Tensor, without importing torch here
        video = video.detach().float().cpu().numpy()
    arr = np.asarray(video, dtype=np.float32)
    if arr.ndim != 5 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected video of shape [B,T,3,H,W], got {tuple(arr.shape)}")
    b, t, c, h, w = arr.shape
    return to_uint8(arr.reshape(b * t, c, h, w)).reshape(b, t, h, w, 3)


def _strip_frames(t: int, max_frames: int) -> list[int]:
    """Indices of ``min(max_frames, t)`` evenly spaced frames of ``t``: first and last included (one frame:
    the middle one, as ``Media.stills``)."""
    n = min(max_frames, t)
    if n == 1:
        return [t // 2]
    return [int(i) for i in np.rint(np.linspace(0, t - 1, n))]


def _caption_layout(captions: Sequence[str], width: int) -> tuple[Any, Any, int, list[list[str]], int]:
    """Font, text top offset, line height, ``captions`` wrapped to ``width - 2`` px and the caption band
    height (the same under every tile/row: the tallest caption's)."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), "Ag", font=font)
    line_h = int(bottom - top) + 2
    wrapped = [_wrap(c, probe, font, width - 2, GRID_MAX_LINES) if c else [] for c in captions]
    n_lines = max((len(lines) for lines in wrapped), default=0)
    cap_h = n_lines * line_h + (4 if n_lines else 0)
    return font, top, line_h, wrapped, cap_h


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words wider than a line are split by character."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:
                if line and draw.textlength(line + ch, font=font) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def image_grid(images: Any, captions: Sequence[str] = ()) -> Image.Image:
    """Grid of ``images`` ([B,3,H,W] in [0,1]) with a caption under each tile.

    ``min(8, B)`` columns; each tile is upscaled by the smallest integer factor making it at least 96 px
    wide; tiles are separated by a 2 px gap; captions are wrapped to the tile width (at most 4 lines).
    """
    return _grid_uint8(to_uint8(images), captions)


def _grid_uint8(arr: np.ndarray, captions: Sequence[str]) -> Image.Image:
    """:func:`image_grid` of a uint8 [B,H,W,3] array."""
    b, h, w, _ = arr.shape
    if b == 0:
        raise ValueError("no images")
    caps = list(captions)
    if caps and len(caps) != b:
        raise ValueError(f"{len(caps)} captions for {b} images")
    caps = caps or [""] * b

    scale = max(1, math.ceil(GRID_MIN_TILE / w))
    tw, th = w * scale, h * scale
    cols = min(GRID_MAX_COLS, b)
    rows = math.ceil(b / cols)

    font, top, line_h, wrapped, cap_h = _caption_layout(caps, tw)

    cell_h = th + cap_h
    grid = Image.new(
        "RGB", (cols * (tw + GRID_GAP) + GRID_GAP, rows * (cell_h + GRID_GAP) + GRID_GAP), "white"
    )
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        r, c = divmod(i, cols)
        x = GRID_GAP + c * (tw + GRID_GAP)
        y = GRID_GAP + r * (cell_h + GRID_GAP)
        tile = Image.fromarray(arr[i])
        if scale > 1:
            tile = tile.resize((tw, th), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x + 1, y + th + 2 + j * line_h - top), line, fill="black", font=font)
    return grid


def video_strips(video: Any, captions: Sequence[str] = (), max_frames: int = STRIP_MAX_FRAMES) -> Image.Image:
    """Filmstrip grid of ``video`` ([B,T,3,H,W] in [0,1]): one row per sample, the sample's caption under it.

    Each row shows ``n = min(max_frames, T)`` evenly spaced frames (first and last included; the middle
    one when ``n == 1``) side by side. Tiles are upscaled like :func:`image_grid` (smallest integer factor
    making them at least 96 px wide, ``tw x th``) and separated by a 2 px gap, so the image is
    ``n * (tw + 2) + 2`` wide and ``B * (th + cap_h + 2) + 2`` high, where ``cap_h`` is the band of the
    tallest caption (0 without captions); captions wrap to the row width (at most 4 lines). Tile ``j`` of
    sample ``b`` sits at ``(2 + j * (tw + 2), 2 + b * (th + cap_h + 2))``.
    """
    return _strips_uint8(_videoto_uint8(video), captions, max_frames)


def _strips_uint8(arr: np.ndarray, captions: Sequence[str], max_frames: int) -> Image.Image:
    """:func:`video_strips` of a uint8 [B,T,H,W,3] array."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    b, t, h, w, _ = arr.shape
    if b == 0 or t == 0:
        raise ValueError(f"empty video of shape {tuple(arr.shape)}")
    caps = list(captions)
    if caps and len(caps) != b:
        raise ValueError(f"{len(caps)} captions for {b} videos")
    caps = caps or [""] * b

    picks = _strip_frames(t, max_frames)
    scale = max(1, math.ceil(GRID_MIN_TILE / w))
    tw, th = w * scale, h * scale
    row_w = len(picks) * (tw + GRID_GAP) - GRID_GAP
    font, top, line_h, wrapped, cap_h = _caption_layout(caps, row_w)

    row_h = th + cap_h
    strip = Image.new("RGB", (row_w + 2 * GRID_GAP, b * (row_h + GRID_GAP) + GRID_GAP), "white")
    draw = ImageDraw.Draw(strip)
    for i in range(b):
        y = GRID_GAP + i * (row_h + GRID_GAP)
        for j, k in enumerate(picks):
            tile = Image.fromarray(arr[i, k])
            if scale > 1:
                tile = tile.resize((tw, th), Image.Resampling.NEAREST)
            strip.paste(tile, (GRID_GAP + j * (tw + GRID_GAP), y))
        for j, line in enumerate(wrapped[i]):
            draw.text((GRID_GAP + 1, y + th + 2 + j * line_h - top), line, fill="black", font=font)
    return strip


# --------------------------------------------------------------------------- tracker


def _open_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` whose store is open; a sqlite store is opened under an exclusive file lock.

    MLflow creates and migrates a sqlite store's tables on first use. Runs started at the same moment on a
    fresh ``runs/`` would all migrate it, and all but one die (``duplicate column name``, alembic errors).
    The lock makes the others wait until the first has finished.
    """
    db = _sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


class Tracker:
    """One MLflow run, logged through an explicit ``MlflowClient``.

    Creates ``experiment`` if missing and starts a run, or re-opens ``run_id`` (status back to RUNNING).
    With a sqlite store, a new experiment's artifacts go to ``<db dir>/mlartifacts/<experiment>``; with an
    http(s) server, the server chooses (proxied ``mlflow-artifacts:/`` under ``--serve-artifacts``).
    Use as a context manager to mark the run FAILED (KILLED on Ctrl-C) when the block raises.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
    ) -> None:
        self._uri = tracking_uri
        self._client = _open_client(tracking_uri)
        self._finished = False
        self._tmp: str | None = None
        if run_id is not None:
            run = self._client.get_run(run_id)
            self._run_id = run.info.run_id
            self._experiment_id = run.info.experiment_id
            self._client.update_run(self._run_id, status="RUNNING")
            if tags:
                self.set_tags(tags)
        else:
            self._experiment_id = self._ensure_experiment(experiment, artifact_location)
            run = self._client.create_run(self._experiment_id, tags=dict(tags or {}), run_name=run_name)
            self._run_id = run.info.run_id

    def _ensure_experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            db = _sqlite_path(self._uri)
            if artifact_location is None and db is not None:
                folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
                artifact_location = (db.parent / ARTIFACTS_DIR / folder).resolve().as_uri()
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # created concurrently by another process
                exp = self._client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self._client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    # ---- properties

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def client(self) -> MlflowClient:
        return self._client

    @property
    def run_url(self) -> str:
        """Browser URL of the run (http stores) or how to open it (sqlite stores)."""
        path = f"#/experiments/{self._experiment_id}/runs/{self._run_id}"
        if _is_http(self._uri):
            return f"{self._uri.rstrip('/')}/{path}"
        db = _sqlite_path(self._uri)
        if db is not None:
            return f"rlflow ui --output-dir {db.parent}  then open http://127.0.0.1:5000/{path}"
        return f"{self._uri} experiment {self._experiment_id} run {self._run_id}"

    # ---- logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flattened ``params`` (values cut to 6000 chars), skipping keys the run already has.

        A key already logged with a different value is skipped with a warning (MLflow params are immutable).
        """
        flat = {k: v[:MAX_PARAM_VALUE] for k, v in flatten(params).items()}
        existing = self._client.get_run(self._run_id).data.params
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            warnings.warn(
                f"run {self._run_id}: params already logged with other values, not updated: {changed}",
                stacklevel=2,
            )
        todo = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(todo), _PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=todo[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` with the current wall-clock timestamp (values cast to float)."""
        ts = int(time.time() * 1000)
        todo = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(todo), _METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=todo[i : i + _METRICS_PER_BATCH])

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="rlflow-tracking-")
        return Path(self._tmp)

    def log_image_grid(self, images: Any, captions: list[str], step: int, name: str = "samples") -> Path:
        """Log ``image_grid(images, captions)`` as ``images/<name>_step<step>.png`` plus the captions as
        ``images/<name>_step<step>.json``; returns the local PNG (deleted by ``finish``)."""
        stem = f"{name}_step{int(step):06d}"
        folder = self._tmpdir() / "images"
        folder.mkdir(parents=True, exist_ok=True)
        png = folder / f"{stem}.png"
        image_grid(images, captions).save(png)
        cap = folder / f"{stem}.json"
        cap.write_text(json.dumps(list(captions), indent=1, ensure_ascii=False))
        self._client.log_artifact(self._run_id, str(png), "images")
        self._client.log_artifact(self._run_id, str(cap), "images")
        return png

    def log_media(
        self, media: Media, captions: Sequence[str], step: int, name: str = "samples"
    ) -> list[Path]:
        """Log decoded ``media`` with one caption per sample; returns the local files (deleted by ``finish``).

        Images: exactly :meth:`log_image_grid` (``images/<name>_step<step>.png`` + ``.json``), returns
        ``[png]``. Video: ``images/<name>_step<step>.png``, a :func:`video_strips` filmstrip grid;
        ``images/<name>_step<step>.gif``, the :func:`image_grid` of every sample's frame ``k`` as GIF frame
        ``k`` at ``media.fps`` (8 fps when 0), looping (Pillow merges identical consecutive frames, adding
        their durations); and the captions as ``.json``; returns ``[png, gif]``. Audio is not logged.
        """
        caps = list(captions)
        n = media.num_samples
        if len(caps) != n:
            raise ValueError(f"{len(caps)} captions for {n} samples")
        if not media.is_video:
            return [self.log_image_grid(media.images, caps, step, name=name)]

        video = _videoto_uint8(media.video)
        stem = f"{name}_step{int(step):06d}"
        folder = self._tmpdir() / "images"
        folder.mkdir(parents=True, exist_ok=True)
        png = folder / f"{stem}.png"
        _strips_uint8(video, caps, STRIP_MAX_FRAMES).save(png)
        frames = [_grid_uint8(video[:, k], caps) for k in range(video.shape[1])]
        fps = float(media.fps) if media.fps and media.fps > 0 else GIF_DEFAULT_FPS
        gif = folder / f"{stem}.gif"
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=round(1000.0 / fps), loop=0)
        cap = folder / f"{stem}.json"
        cap.write_text(json.dumps(caps, indent=1, ensure_ascii=False))
        for path in (png, gif, cap):
            self._client.log_artifact(self._run_id, str(path), "images")
        return [png, gif]

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under ``artifact_path``."""
        p = Path(local_path)
        if p.is_dir():
            self._client.log_artifacts(self._run_id, str(p), artifact_path)
        elif p.is_file():
            self._client.log_artifact(self._run_id, str(p), artifact_path)
        else:
            raise FileNotFoundError(p)

    def log_dict(self, d: dict, artifact_file: str) -> None:
        """Log ``d`` as YAML (``.yaml``/``.yml``) or JSON (anything else) at ``artifact_file``."""
        import yaml

        dest = self._tmpdir() / "dicts" / f"{time.time_ns()}" / Path(artifact_file).name
        dest.parent.mkdir(parents=True)
        if dest.suffix in (".yaml", ".yml"):
            dest.write_text(yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=False))
        else:
            dest.write_text(json.dumps(d, indent=2, default=str))
        parent = str(Path(artifact_file).parent.as_posix())
        self._client.log_artifact(self._run_id, str(dest), None if parent == "." else parent)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        todo = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(todo), _PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=todo[i : i + _PARAMS_PER_BATCH])

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        if self._finished:
            return
        self._finished = True
        try:
            self._client.set_terminated(self._run_id, status=status)
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")


# --------------------------------------------------------------------------- server


def _server_env() -> dict[str, str]:
    """Environment for a lean server: no background job runner (override by setting the variable)."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def server_command(
    backend_store_uri: str,
    artifacts_dir: str | Path,
    port: int,
    host: str = "127.0.0.1",
    allowed_hosts: str | None = None,
) -> list[str]:
    """``mlflow server`` argv: one worker, artifacts proxied to ``artifacts_dir``."""
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination", Path(artifacts_dir).expanduser().resolve().as_uri(),
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def serve_ui(
    output_dir: str | Path, host: str = "127.0.0.1", port: int = 5000, allowed_hosts: str | None = None
) -> int:
    """Serve the UI for ``output_dir``'s sqlite store in the foreground; returns the exit code."""
    uri = default_tracking_uri(output_dir)
    artifacts = Path(output_dir).expanduser().resolve() / ARTIFACTS_DIR
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = server_command(uri, artifacts, port, host=host, allowed_hosts=allowed_hosts)
    print(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.run(cmd, env=_server_env()).returncode
    except KeyboardInterrupt:
        return 130


def start_server(
    backend_store_uri: str,
    artifacts_dir: str | Path,
    port: int,
    host: str = "127.0.0.1",
    *,
    allowed_hosts: str | None = None,
    log_file: str | Path | None = None,
) -> subprocess.Popen:
    """Start ``mlflow server`` in its own session (stop it with ``stop_server``); output to ``log_file``."""
    Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    cmd = server_command(backend_store_uri, artifacts_dir, port, host=host, allowed_hosts=allowed_hosts)
    if log_file is None:
        return subprocess.Popen(cmd, env=_server_env(), start_new_session=True)
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            cmd, env=_server_env(), start_new_session=True, stdout=log, stderr=subprocess.STDOUT
        )


def wait_for_server(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> float:
    """Poll ``<url>/health`` until it answers 200; returns seconds waited.

    Raises TimeoutError after ``timeout`` s, RuntimeError if ``proc`` exits first.
    """
    start = time.monotonic()
    health = url.rstrip("/") + "/health"
    while True:
        try:
            with urllib.request.urlopen(health, timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (OSError, http.client.HTTPException):  # refused, reset, 403 while starting, ...
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before {health} answered")
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{health} did not answer within {timeout:.0f} s")
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group (workers included), SIGKILL it after ``timeout`` s."""

    def _signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    try:
        leader = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:  # already reaped; its group may still hold workers
        leader = True
    if leader:
        _signal_group(signal.SIGTERM)
    else:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if leader:
            _signal_group(signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(timeout=timeout)
    if not leader:
        return
    # workers can outlive the leader for a moment; make sure the group is gone
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    _signal_group(signal.SIGKILL)
