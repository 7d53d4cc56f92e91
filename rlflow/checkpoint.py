"""Checkpoints: ``<run_dir>/checkpoints/step_NNNNNN/`` with the LoRA (safetensors), the optimizer and RNG
state, a ``state.json`` (step counter, policy version, MLflow run id, the step's metrics) and a
``manifest.json`` (every file's size and sha256). An algorithm's extra adapters are saved beside the trained
one (``lora_<name>.safetensors``, e.g. DiffusionNFT's ``lora_old.safetensors``); a learner that keeps the
previous policy version (the one-step-off pipeline samples with it) saves its sampling weights as
``lora_previous.safetensors``.

Durable: the files are written (and fsynced) into a hidden temporary folder, the manifest last, and the folder
is renamed to ``step_N`` (then the parent folder is fsynced), so a crash or a full disk mid-write never leaves a
``step_N``; a stale temporary folder is removed by the next save. Resume does not trust a ``step_N`` folder:
:func:`load_latest` checks it against its manifest and falls back to the newest checkpoint that passes, warning
with the bad file's name. ``trainer.pt`` is loaded with ``weights_only=True``: a checkpoint folder is data,
never code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load_file

from rlflow.types import LearnerState

_PREVIOUS = "previous"
MANIFEST = "manifest.json"
REQUIRED = ("state.json", "trainer.pt", "lora.safetensors")
_STEP = re.compile(r"step_\d+")
_TMP_PREFIX = ".step_"  # temporary folders: hidden, and never named like a checkpoint


class CheckpointWarning(UserWarning):
    """A checkpoint folder was skipped (the message names the bad file)."""


class CheckpointError(RuntimeError):
    """The run folder has checkpoints, but none of them is usable."""


@dataclass
class TrainState:
    """What a run needs to continue exactly where it stopped.

    report: the metrics of step ``step`` as they were when its checkpoint was written, before the step's eval
            and logging (a resume finishes that report with them).
    recent_rewards: the training reward means since the last eval (the eval's generalisation gap uses them).
    """

    step: int = 0
    policy_version: int = 0
    mlflow_run_id: str | None = None
    history: dict[str, float] = field(default_factory=dict)
    report: dict[str, float] = field(default_factory=dict)
    recent_rewards: list[float] = field(default_factory=list)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``step_N`` folders of ``run_dir``, oldest first (whether or not they are valid)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP.fullmatch(p.name))


def save_checkpoint(run_dir: Path, state: TrainState, learner: LearnerState) -> Path:
    """Write ``step_N`` durably (see the module docstring); returns its folder. On any error nothing named
    ``step_N`` is left (an existing ``step_N`` is replaced only once the new one is complete)."""
    final = checkpoint_dir(run_dir, state.step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{state.step:06d}.", suffix=".tmp", dir=root))
    try:
        files = {name: _write(tmp / name, data) for name, data in _serialise(state, learner)}
        _write(tmp / MANIFEST, (json.dumps({"format": 1, "step": state.step, "files": files}, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        old = None
        if final.exists():  # re-reached after a fallback: swap the new one in, then drop the old one
            old = root / f"{_TMP_PREFIX}{state.step:06d}.replaced.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _serialise(state: TrainState, learner: LearnerState) -> list[tuple[str, bytes]]:
    """Every file of a checkpoint as ``(name, bytes)``; ``state.json`` last (the manifest comes after)."""
    out = [("lora.safetensors", safetensors.torch.save(_contiguous(learner.lora)))]
    for name, weights in learner.adapters.items():
        out.append((f"lora_{name}.safetensors", safetensors.torch.save(_contiguous(weights))))
    if learner.previous is not None:
        out.append((f"lora_{_PREVIOUS}.safetensors", safetensors.torch.save(_contiguous(learner.previous))))
    buf = io.BytesIO()
    torch.save({"optimizer": learner.optimizer, "optimizer_steps": learner.optimizer_steps,
                "torch_rng": torch.get_rng_state()}, buf)
    out.append(("trainer.pt", buf.getvalue()))
    out.append(("state.json", (json.dumps(asdict(state), indent=2) + "\n").encode()))
    return out


def _write(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` and fsync it; returns its manifest entry (size and sha256)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary folders of saves that never finished (a killed process); also the ``step_N.tmp`` of older
    versions. One process writes a run's checkpoints, so none of them is in use."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or (p.name.startswith("step_") and p.name.endswith(".tmp"))):
            shutil.rmtree(p, ignore_errors=True)


def check_checkpoint(path: Path, *, hashes: bool = True) -> str | None:
    """Why the checkpoint folder ``path`` cannot be trusted, naming the bad file, or None when it is sound.

    With a manifest: every listed file is present with its size (and, with ``hashes``, its sha256), and the
    required files are listed. Without one (written before manifests existed): the required files are present
    and, with ``hashes``, load.
    """
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return _check_unlisted(path, load=hashes)
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = {str(name): (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{manifest}: unreadable ({type(err).__name__}: {err})"
    for name in REQUIRED:
        if name not in entries:
            return f"{path / name}: not in {MANIFEST}"
    for name, (size, digest) in entries.items():
        f = path / name
        if Path(name).name != name:
            return f"{manifest}: names a file outside the folder ({name!r})"
        if not f.is_file():
            return f"{f}: missing"
        if (actual := f.stat().st_size) != size:
            return f"{f}: {actual} bytes, {MANIFEST} says {size} (truncated or overwritten)"
        if hashes and _sha256(f) != digest:
            return f"{f}: its sha256 differs from {MANIFEST}'s (corrupted)"
    return None


def _check_unlisted(path: Path, *, load: bool) -> str | None:
    loaders: dict[str, Callable[[Path], Any]] = {
        "state.json": lambda f: TrainState(**json.loads(f.read_text())),
        "trainer.pt": lambda f: torch.load(f, weights_only=True),
        "lora.safetensors": lambda f: load_file(str(f)),
    }
    for name, loader in loaders.items():
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        if load:
            try:
                loader(f)
            except Exception as err:  # any failure to read it makes the checkpoint unusable
                return f"{f}: {type(err).__name__}: {err}"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _skip(path: Path, problem: str) -> None:
    warnings.warn(f"checkpoint {path.name} is not usable, skipped: {problem}", CheckpointWarning, stacklevel=3)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder that passes :func:`check_checkpoint` (each one skipped is warned about,
    naming its bad file), or None."""
    for path in reversed(checkpoints(run_dir)):
        problem = check_checkpoint(path)
        if problem is None:
            return path
        _skip(path, problem)
    return None


def load_latest(run_dir: Path) -> tuple[Path, TrainState, LearnerState] | None:
    """``(folder, train state, learner state)`` of the newest checkpoint that passes :func:`check_checkpoint`
    and loads (each one skipped is warned about, naming its bad file); restores the torch RNG. None without
    checkpoints; :class:`CheckpointError` when there are some but none is usable."""
    problems = []
    for path in reversed(checkpoints(run_dir)):
        problem = check_checkpoint(path)
        if problem is None:
            try:
                return (path, *load_checkpoint(path))
            except Exception as err:  # e.g. a refused pickle payload: fall back, never run it
                problem = f"{path}: {type(err).__name__}: {err}"
        _skip(path, problem)
        problems.append(problem)
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: {'; '.join(problems)} "
            "(move the folder away to start the run over)"
        )
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete every checkpoint folder older than the ``keep``-th newest sound one (sizes checked against the
    manifest, not hashes); returns the deleted folders. A bad folder newer than that is left (resume skips it,
    and the run replaces it when it reaches that step again)."""
    sound, deleted = 0, []
    for path in reversed(checkpoints(run_dir)):
        if sound >= keep:
            shutil.rmtree(path)
            deleted.append(path)
        elif check_checkpoint(path, hashes=False) is None:
            sound += 1
    return deleted


def load_checkpoint(path: Path) -> tuple[TrainState, LearnerState]:
    """``(train state, learner state)``; restores the torch RNG."""
    state = TrainState(**json.loads((path / "state.json").read_text()))
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    torch.set_rng_state(trainer["torch_rng"])
    extra = {p.name[len("lora_"):-len(".safetensors")]: load_file(str(p)) for p in sorted(path.glob("lora_*.safetensors"))}
    previous = extra.pop(_PREVIOUS, None)
    learner = LearnerState(
        lora=load_file(str(path / "lora.safetensors")), optimizer=trainer["optimizer"], version=state.policy_version,
        optimizer_steps=int(trainer.get("optimizer_steps", 0)), adapters=extra, previous=previous,
    )
    return state, learner


def adapter_files(path: Path) -> list[Path]:
    """The checkpoint's LoRA files of the trained and the algorithm's extra adapters (what MLflow gets; the
    kept previous version stays local)."""
    return [p for p in sorted(Path(path).glob("lora*.safetensors")) if p.name != f"lora_{_PREVIOUS}.safetensors"]


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous().cpu() for k, v in state.items()}
