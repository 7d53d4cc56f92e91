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

from rlflow.types import Conditions

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

    def lora_state_dict(self, adapter: str = "default") -> dict[str, Tensor]: ...

    def load_lora_state_dict(self, state: dict[str, Tensor], adapter: str = "default") -> None: ...

    def reference(self) -> contextlib.AbstractContextManager[None]: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def add_adapter_copy(self, name: str) -> None: ...

    def adapter(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def adapter_parameters(self, adapter: str = "default") -> dict[str, nn.Parameter]: ...

    def encode(self, conditions: Conditions) -> Conditioning: ...


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
    """LoRA on ``self.transformer`` through diffusers' PEFT integration: the trained adapter ``"default"`` and
    any extra adapters an algorithm declares (e.g. DiffusionNFT's ``"old"`` policy), which never train."""

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

    def add_adapter_copy(self, name: str) -> None:
        """A frozen second adapter ``name`` holding a copy of the default adapter's weights."""
        if name == "default":
            raise ValueError("the extra adapter may not be called 'default'")
        cfg = self.transformer.peft_config["default"]
        self.transformer.add_adapter(cfg, adapter_name=name)  # diffusers activates the new adapter ...
        self.transformer.set_adapter("default")  # ... so make the trained one active (and trainable) again
        self.load_lora_state_dict(self.lora_state_dict(), adapter=name)
        for n, p in self.transformer.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(False)

    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def lora_state_dict(self, adapter: str = "default") -> dict[str, Tensor]:
        """The adapter's tensors under adapter-free names (the same names for every adapter)."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer, adapter_name=adapter)
        return {k: v.detach().clone() for k, v in state.items()}

    def load_lora_state_dict(self, state: dict[str, Tensor], adapter: str = "default") -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.transformer, state, adapter_name=adapter)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA state has keys this model does not: {unexpected[:5]}")

    def adapter_parameters(self, adapter: str = "default") -> dict[str, nn.Parameter]:
        """The adapter's live parameters under adapter-free names (``...lora_A.weight``)."""
        tag = f".{adapter}."
        return {n.replace(tag, "."): p for n, p in self.transformer.named_parameters() if "lora_" in n and tag in n}

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        """Inside the block the transformer runs with adapter ``name``. Only the active-adapter pointer of
        each LoRA layer moves: PEFT's ``set_adapter`` would also flip ``requires_grad``, which the optimizer
        and FSDP must never see change."""
        if name == "default":
            yield
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        saved = [m._active_adapter for m in layers]
        for m in layers:
            m._active_adapter = name
        try:
            yield
        finally:
            for m, a in zip(layers, saved, strict=True):
                m._active_adapter = a

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

    def encode(self, conditions: Conditions) -> Conditioning:
        """Encoded conditions (the text-to-image families read the prompts only)."""
        return self.encode_prompts(list(conditions.prompts))  # type: ignore[attr-defined]


def freeze(*modules: nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.requires_grad_(False)
            m.eval()
