"""Weight sync from learner rank 0 to the samplers, over one of two transports (``ray.weight_transport``).

``object_store`` (the CPU default): rank 0 ``ray.put``s one :class:`WeightUpdate` of numpy arrays and hands
the driver only its reference, which the driver passes to every sampler; each sampler maps the same
shared-memory buffers (no copy through the driver, no pickled torch tensors).

``collective`` (the GPU default): rank 0 and the samplers form their own process group (:class:`WeightGroup`:
NCCL on GPUs, gloo on CPUs, apart from the learners' group) and rank 0 broadcasts the tensors packed into one
flat buffer per dtype, device to device; a header with the policy version and the layout goes first, so a
sampler never loads weights of another version or another model by mistake.

``lora`` publishes the adapter tensors only; ``full`` every tensor of the transformer. What is published is
the adapter the algorithm samples with (``PolicySpec.sample_with``: the trained ``"default"`` one, or e.g.
DiffusionNFT's ``"old"``) under the default adapter's names: a sampler holds one adapter and loads it there.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rlflow.models.base import FlowPolicy


def _full(policy: FlowPolicy, adapter: str, keep_vars: bool) -> dict[str, torch.Tensor]:
    """Every transformer tensor, with the LoRA tensors of ``adapter`` only, named as the default adapter's."""
    out = {}
    for name, t in policy.transformer.state_dict(keep_vars=keep_vars).items():
        if "lora_" not in name:
            out[name] = t
        elif f".{adapter}." in name:
            out[name.replace(f".{adapter}.", ".default.")] = t
    return out


def weight_state(policy: FlowPolicy, kind: str, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The tensors a ``kind`` (``"lora"`` or ``"full"``) update of ``adapter`` carries."""
    if kind == "lora":
        return policy.lora_state_dict(adapter)
    if kind == "full":
        return _full(policy, adapter, keep_vars=False)
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


def weights_digest(policy: FlowPolicy, state: dict[str, torch.Tensor] | None = None) -> str:
    """A hash of the trainable (LoRA) tensors (or of ``state``, e.g. a sharded policy's gathered LoRA), to
    check that two processes hold the same weights."""
    h = hashlib.sha256()
    for name, t in sorted((policy.lora_state_dict() if state is None else state).items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class WeightGroup:
    """One member of the weight-broadcast group: rank 0 is learner rank 0, ranks 1.. are the samplers.

    A standalone process group (its own TCP store, hosted by rank 0), so it coexists with the learners'
    default group. Every member must call :meth:`broadcast` for each update, in the same order.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0):
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        if backend == "gloo":
            self.pg: Any = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        elif backend == "nccl":
            nccl = getattr(dist, "ProcessGroupNCCL", None)
            if nccl is None or not torch.cuda.is_available():
                raise RuntimeError("ray.weight_transport 'collective' with NCCL needs CUDA and a torch built with NCCL")
            self.pg = nccl(store, rank, world_size)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"weight group backend '{backend}': expected 'gloo' or 'nccl'")

    def _bcast(self, t: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()

    def broadcast(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Rank 0: send ``state`` (tagged ``version``); others: receive into ``state`` in place (their own
        tensors of the same names and shapes). Returns the version received."""
        names = sorted(state)
        layout = _layout_code(names, state)
        header = torch.tensor([version, layout, len(names)], dtype=torch.int64, device=self.device)
        self._bcast(header)
        got_version, got_layout, got_n = (int(v) for v in header.cpu())
        if (got_layout, got_n) != (layout, len(names)):
            raise RuntimeError(f"weight broadcast v{got_version}: rank 0 sent {got_n} tensors with another layout "
                               f"than the {len(names)} this rank holds (a different model or LoRA config?)")
        for dtype in sorted({state[n].dtype for n in names}, key=str):
            group = [n for n in names if state[n].dtype == dtype]
            if self.rank == 0:
                flat = torch.cat([state[n].detach().reshape(-1).to(self.device) for n in group])
            else:
                flat = torch.empty(sum(state[n].numel() for n in group), dtype=dtype, device=self.device)
            self._bcast(flat)
            if self.rank != 0:
                offset = 0
                with torch.no_grad():
                    for n in group:
                        k = state[n].numel()
                        state[n].copy_(flat[offset : offset + k].view_as(state[n]))
                        offset += k
        return got_version


def _layout_code(names: list[str], state: dict[str, torch.Tensor]) -> int:
    """A 62-bit hash of the names, shapes and dtypes (both sides must agree)."""
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}:{tuple(state[n].shape)}:{state[n].dtype};".encode())
    return int.from_bytes(h.digest()[:8], "big") >> 2


def live_weights(policy: FlowPolicy, kind: str, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The policy's own tensors of ``adapter`` a ``kind`` update reads or writes (parameters and buffers, not
    copies), under the names :func:`weight_state` gives them."""
    if kind == "lora":
        return dict(policy.adapter_parameters(adapter))
    if kind == "full":
        return _full(policy, adapter, keep_vars=True)
    raise ValueError(f"ray.weight_sync '{kind}': expected 'lora' or 'full'")
