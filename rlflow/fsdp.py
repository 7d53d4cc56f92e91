"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a LoRA-trained :class:`~rlflow.models.base.FlowPolicy`.

:func:`shard_policy` shards ``policy.transformer`` block by block, then its root, over a 1-D data-parallel
mesh. The frozen base weights and the trainable LoRA weights are sharded alike (dim 0, as
:class:`~torch.distributed.tensor.DTensor` parameters); FSDP all-gathers each block's weights for its
forward and backward and reduce-scatters the LoRA gradients (the frozen weights get none).

Gradients are **summed** over ranks, not averaged (FSDP's default): every FSDP module gets a divide factor of
1 and sum-only collectives, so the sharded gradient is exactly what the data-parallel learner's flat
all-reduce of the per-rank gradients gives (each rank scales its micro-batch losses by ``n / count``).
Sum-only collectives are also what gloo can run (it has no ``AVG`` / ``PREMUL_SUM`` reduce-scatter), so the
same code runs on CPU under gloo and on GPUs under NCCL.

Collectives: every FSDP forward all-gathers and every backward reduce-scatters, so all ranks must run the
same number of forwards and backwards of the sharded transformer, in the same order (pad a rank that owns
fewer micro-batches with a zero-weighted one). The helpers below that gather (:func:`full_lora_state`,
:func:`full_state`, :func:`full_tensor` of a DTensor, :func:`flat_grad`, :func:`clip_grad_norm_`,
:func:`full_optimizer_state`) must be called by every rank too, in the same order. Loading (:func:`load_full_lora_state`, :func:`load_full_optimizer_state`)
is local: each rank keeps its slice of the full tensors it is given, so all ranks must pass the same ones.

Create the optimizer *after* :func:`shard_policy`: ``fully_shard`` replaces the parameters with DTensor ones,
so ``policy.trainable_parameters()`` must be read again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from rlflow.models.base import FlowPolicy


def block_modules(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks: the children that own parameters of every outermost ``nn.ModuleList``
    (``transformer_blocks``, ``single_transformer_blocks``, ...), in registration order. ModuleLists inside a
    block (e.g. an attention's ``to_out``) belong to that block and are not split out."""
    lists: dict[str, nn.ModuleList] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(outer + ".") for outer in lists):
            lists[name] = module
    return [child for blocks in lists.values() for child in blocks if any(True for _ in child.parameters())]


def _default_mesh(transformer: nn.Module) -> DeviceMesh:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_policy needs torch.distributed initialised (init_process_group) or a mesh")
    device = next(transformer.parameters()).device
    device_type = "cpu" if device.type == "meta" else device.type
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard_policy(
    policy: FlowPolicy, *, mesh: DeviceMesh | None = None, reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> None:
    """Shard ``policy.transformer`` in place with FSDP2: each block (see :func:`block_modules`) is its own
    all-gather / reduce-scatter group, the rest of the transformer (embedders, final norm and projection)
    is the root's group. Gradients of the ranks are summed (see the module doc). Add the LoRA first.

    ``mesh``: a 1-D device mesh over the data-parallel ranks; default: every rank of the default process
    group, on the transformer's device type (``"cpu"`` with gloo; ``"cuda"`` with NCCL, where
    ``torch.cuda.set_device(local_rank)`` must have been called: FSDP uses the current device).
    ``reshard_after_forward=True`` frees the gathered weights after each block's forward (and gathers them
    again in backward); keep it True when ``policy.reference()`` is used, since peft toggles the LoRA's
    ``requires_grad`` on the registered parameters, which must then be the sharded ones.
    """
    transformer = policy.transformer
    if any(isinstance(m, FSDPModule) for m in transformer.modules()):
        raise ValueError("the policy's transformer is already sharded")
    if not any(p.requires_grad for p in transformer.parameters()):
        raise ValueError("the transformer has no trainable parameters: add the LoRA before sharding")
    mesh = mesh if mesh is not None else _default_mesh(transformer)
    if mesh.ndim != 1:
        raise ValueError(f"shard_policy expects a 1-D data-parallel mesh, got {mesh.ndim} dims")
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in block_modules(transformer):
        fully_shard(block, **kwargs)
    fully_shard(transformer, **kwargs)
    for module in fsdp_modules(policy):
        # Sum, not mean, and with plain SUM collectives (no AVG / PREMUL_SUM): gloo supports only those.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def fsdp_modules(policy: FlowPolicy) -> list[FSDPModule]:
    """The FSDP modules of the transformer, root first (empty when it is not sharded)."""
    return [m for m in policy.transformer.modules() if isinstance(m, FSDPModule)]


def is_sharded(policy: FlowPolicy) -> bool:
    return isinstance(policy.transformer, FSDPModule)


def set_gradient_sync(policy: FlowPolicy, enabled: bool) -> None:
    """Whether the next backwards reduce-scatter their gradients. With ``False`` each rank accumulates its
    (unsharded, LoRA-only) gradients locally; the first backward after setting ``True`` again reduces the
    accumulated sum. Gradient accumulation is also correct without this (each backward reduces and adds
    to the sharded gradient); it only saves communication. No-op on an unsharded policy."""
    root = policy.transformer
    if isinstance(root, FSDPModule):
        root.set_requires_gradient_sync(enabled, recurse=True)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank must call it); a plain tensor as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with whole, plain CPU tensors in place of DTensors (e.g. a LoRA snapshot taken with
    ``policy.lora_state_dict()`` of a sharded policy). Collective when it holds DTensors: every rank must
    call it, with the same keys in the same order."""
    return {k: full_tensor(v).detach().to("cpu", copy=True) for k, v in state.items()}


def full_lora_state(policy: FlowPolicy, adapter: str = "default") -> dict[str, Tensor]:
    """``policy.lora_state_dict()`` with whole, plain CPU tensors (the keys of the unsharded policy).

    Collective on a sharded policy: every rank must call it (one all-gather per LoRA tensor). On an
    unsharded policy it is a plain copy, so a learner can call it either way."""
    return full_state(policy.lora_state_dict(adapter))


def load_full_lora_state(policy: FlowPolicy, state: dict[str, Tensor], adapter: str = "default") -> None:
    """Load whole LoRA tensors (keys of :meth:`lora_state_dict`) into the policy; each rank of a sharded
    policy keeps its own slice (no communication: every rank must pass the same tensors). DTensors (a
    sharded ``lora_state_dict()``, e.g. a snapshot) load as they are; on an unsharded policy it is
    ``load_lora_state_dict``. (This torch's DTensor ``copy_`` also takes the local slice of a plain tensor,
    so ``policy.load_lora_state_dict`` of whole tensors works on a sharded policy; this makes it explicit.)"""
    current = policy.lora_state_dict(adapter)
    unexpected = [k for k in state if k not in current]
    if unexpected:
        raise ValueError(f"LoRA state has keys this model does not: {unexpected[:5]}")
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        ref = current[key]
        if isinstance(ref, DTensor) and not isinstance(value, DTensor):
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(f"LoRA tensor {key}: shape {tuple(value.shape)}, the model has {tuple(ref.shape)}")
            value = _shard_like(value, ref)
        converted[key] = value
    policy.load_lora_state_dict(converted, adapter)


def _shard_like(full: Tensor, ref: DTensor) -> DTensor:
    """This rank's slice of ``full`` as a DTensor placed like ``ref`` (local split, no communication)."""
    local = full.detach().to(device=ref.device, dtype=ref.dtype)
    return distribute_tensor(local, ref.device_mesh, ref.placements, src_data_rank=None)


def flat_grad(params: Iterable[nn.Parameter]) -> Tensor:
    """The whole gradients of ``params`` flattened into one plain tensor (zeros where a grad is None).
    Collective when the parameters are sharded."""
    parts = [full_tensor(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    return torch.cat(parts)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` returning the total norm as a plain tensor.

    With DTensor parameters the torch function already computes the norm over the whole (sharded)
    gradients, an all-reduce every rank must join, and scales each rank's shard by the same factor; it
    returns the norm as a replicated DTensor, unwrapped here."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.to_local() if isinstance(norm, DTensor) else norm


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole, plain CPU tensors in place of DTensor states (e.g. AdamW's
    ``exp_avg``): the same layout a single process saves. Collective: every rank must call it."""
    sd = optimizer.state_dict()
    state: dict[Any, dict[str, Any]] = {}
    for idx in sorted(sd["state"]):
        entry = sd["state"][idx]
        state[idx] = {
            k: (full_tensor(v).detach().to("cpu", copy=True) if isinstance(v, Tensor) else v)
            for k, v in sorted(entry.items())
        }
    return {**sd, "state": state}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a state dict of whole tensors (from :func:`full_optimizer_state` or a single process): each
    state tensor shaped like its DTensor parameter is sliced like it (local, no communication)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def place(value: Any, param: Tensor) -> Any:
        whole = isinstance(value, Tensor) and not isinstance(value, DTensor) and value.dim() > 0
        if isinstance(param, DTensor) and whole and tuple(value.shape) == tuple(param.shape):
            return _shard_like(value, param)
        return value

    state = {idx: {k: place(v, params[int(idx)]) for k, v in entry.items()} for idx, entry in sd["state"].items()}
    optimizer.load_state_dict({**sd, "state": state})
