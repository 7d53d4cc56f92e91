"""Checkpoints: ``<run_dir>/checkpoints/step_NNNNNN/`` with the LoRA (safetensors), the optimizer and RNG
state, and a ``state.json`` (step counter, policy version, MLflow run id). Written to a temporary folder
and renamed, so a crash mid-write never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class TrainState:
    """What a run needs to continue exactly where it stopped."""

    step: int = 0
    policy_version: int = 0
    mlflow_run_id: str | None = None
    history: dict[str, float] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(run_dir: Path, state: TrainState, lora: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> Path:
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
    torch.save({"optimizer": optimizer, "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
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


def load_checkpoint(path: Path) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, Any]]:
    state = TrainState(**json.loads((path / "state.json").read_text()))
    lora = load_file(str(path / "lora.safetensors"))
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    torch.set_rng_state(trainer["torch_rng"])
    return state, lora, trainer["optimizer"]
