"""Checkpoints: ``<run_dir>/checkpoints/step_NNNNNN/`` with the LoRA (safetensors), the optimizer and RNG
state, and a ``state.json`` (step counter, policy version, MLflow run id). An algorithm's extra adapters are
saved beside the trained one (``lora_<name>.safetensors``, e.g. DiffusionNFT's ``lora_old.safetensors``); a
learner that keeps the previous policy version (the one-step-off pipeline samples with it) saves its
sampling weights as ``lora_previous.safetensors``. Written to a temporary folder and renamed, so a crash
mid-write never leaves a half checkpoint that resume would pick up. ``trainer.pt`` is loaded with
``weights_only=True``: a checkpoint folder is data, never code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlflow.types import LearnerState

_PREVIOUS = "previous"


@dataclass
class TrainState:
    """What a run needs to continue exactly where it stopped."""

    step: int = 0
    policy_version: int = 0
    mlflow_run_id: str | None = None
    history: dict[str, float] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(run_dir: Path, state: TrainState, learner: LearnerState) -> Path:
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(learner.lora), str(tmp / "lora.safetensors"))
    for name, weights in learner.adapters.items():
        save_file(_contiguous(weights), str(tmp / f"lora_{name}.safetensors"))
    if learner.previous is not None:
        save_file(_contiguous(learner.previous), str(tmp / f"lora_{_PREVIOUS}.safetensors"))
    torch.save({"optimizer": learner.optimizer, "optimizer_steps": learner.optimizer_steps,
                "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step_") and not p.name.endswith(".tmp"))
    return done[-1] if done else None


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


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous().cpu() for k, v in state.items()}
