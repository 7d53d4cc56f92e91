"""The adapter contract every model family implements, and the LoRA plumbing they share.

An adapter wraps one diffusers transformer with its text encoders and decoder. Its surface is small:
``from_pretrained``, ``schedule``, ``latent_shape``, ``encode_prompts``, ``velocity``, ``decode``, and the
LoRA methods below. The base weights are frozen; with the LoRA disabled the same module is the reference
policy, so no second copy of the model is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts: name -> tensor with the batch on dim 0 (``[B, L, D]`` sequences, ``[B, P]`` pooled).

    Tensors shared by the whole batch (e.g. FLUX text position ids ``[L, 3]``) go in ``shared``.
    """

    tensors: dict[str, Tensor]
    shared: dict[str, Tensor]

    def index(self, idx: Tensor | list[int] | slice) -> Conditioning:
        if isinstance(idx, slice):
            return Conditioning({k: v[idx] for k, v in self.tensors.items()}, self.shared)
        i = torch.as_tensor(idx, dtype=torch.long)
        return Conditioning({k: v[i.to(v.device)] for k, v in self.tensors.items()}, self.shared)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in keys}, items[0].shared)


class FlowPolicy(Protocol):
    """What samplers and learners need from a model family."""

    family: str
    transformer: nn.Module

    def set_resolution(self, height: int, width: int) -> FlowPolicy: ...

    def schedule(self, num_steps: int) -> Tensor: ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]: ...

    def encode_prompts(self, prompts: list[str]) -> Conditioning: ...

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning, *, guidance_scale: float = 1.0) -> Tensor: ...

    def decode(self, x: Tensor) -> Tensor: ...

    def add_lora(self, rank: int, alpha: float, target_modules: tuple[str, ...] = ...) -> None: ...

    def lora_state_dict(self) -> dict[str, Tensor]: ...

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def reference(self) -> contextlib.AbstractContextManager[None]: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...


class PromptCache:
    """Prompt -> conditioning row, computed one prompt at a time.

    Encoding each prompt alone makes its embedding independent of which other prompts share the batch, so
    rollout and re-scoring see bit-identical conditioning (batched matmuls on CPU are not batch-invariant).
    """

    def __init__(self, encode_one: Any, max_size: int = 4096):
        self._encode_one = encode_one
        self._rows: dict[str, Conditioning] = {}
        self._max_size = max_size

    def __call__(self, prompts: list[str]) -> Conditioning:
        for p in prompts:
            if p not in self._rows:
                if len(self._rows) >= self._max_size:
                    self._rows.pop(next(iter(self._rows)))
                with torch.no_grad():
                    self._rows[p] = self._encode_one(p)
        return Conditioning.cat([self._rows[p] for p in prompts])


class LoraMixin:
    """LoRA on ``self.transformer`` through diffusers' PEFT integration (one adapter named ``"default"``)."""

    transformer: Any

    def add_lora(self, rank: int, alpha: float, target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS) -> None:
        from peft import LoraConfig

        present = {name.split(".")[-1] for name, _ in self.transformer.named_modules()}
        present |= {".".join(name.split(".")[-2:]) for name, _ in self.transformer.named_modules()}
        targets = [t for t in target_modules if t in present]
        if not targets:
            raise ValueError(f"lora.target_modules {list(target_modules)} match no module of the transformer")
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
        self.transformer.add_adapter(cfg)

    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def lora_state_dict(self) -> dict[str, Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.transformer, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA state has keys this model does not: {unexpected[:5]}")

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen base model: LoRA disabled inside the block."""
        if not self.has_lora():
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]


def freeze(*modules: nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.requires_grad_(False)
            m.eval()
