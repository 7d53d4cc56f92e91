"""Weight sync from learner rank 0 to the samplers.

On CPU (and by default) weights travel through the Ray object store: rank 0 ``ray.put``s one
:class:`WeightUpdate` of numpy arrays and hands the driver only its reference, which the driver passes to
every sampler; each sampler maps the same shared-memory buffers (no copy through the driver, no pickled
torch tensors). ``lora`` publishes the adapter tensors only; ``full`` every tensor of the transformer.
"""

from __future__ import annotations

import hashlib

import torch

from rlflow.models.base import FlowPolicy


def weight_state(policy: FlowPolicy, kind: str) -> dict[str, torch.Tensor]:
    """The tensors a ``kind`` (``"lora"`` or ``"full"``) update carries."""
    if kind == "lora":
        return policy.lora_state_dict()
    if kind == "full":
        return {k: v for k, v in policy.transformer.state_dict().items()}
    raise ValueError(f"ray.weight_sync '{kind}': expected 'lora' or 'full'")


@torch.no_grad()
def apply_update(policy: FlowPolicy, state: dict[str, torch.Tensor], kind: str) -> None:
    if kind == "lora":
        policy.load_lora_state_dict(state)
        return
    missing, unexpected = policy.transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"full weight update does not match the sampler's model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def weights_digest(policy: FlowPolicy) -> str:
    """A hash of the trainable (LoRA) tensors, to check that two processes hold the same weights."""
    h = hashlib.sha256()
    for name, t in sorted(policy.lora_state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
