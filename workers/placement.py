"""Placement of samplers and learners through one Ray placement group.

colocated:      bundle i holds sampler i and learner i (they share a node, and a GPU when each asks for a
                fraction of one): the layout of a single-node run where rollout and update alternate.
disaggregated:  one bundle per sampler, then one per learner: separate pools that can run at the same time
                (the one-step-off pipeline's layout on a cluster).
Reward servers are not in the group: they get their own resources (``reward.num_cpus`` / ``num_gpus``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlflow.config import ConfigError, RayConfig


@dataclass(frozen=True)
class PlacementPlan:
    """``bundles``: the resource dicts; ``sampler[i]`` / ``learner[r]``: the bundle index of each actor."""

    bundles: list[dict[str, float]]
    sampler: list[int]
    learner: list[int]

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def _res(num_cpus: float, num_gpus: float) -> dict[str, float]:
    return {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}


def plan(cfg: RayConfig) -> PlacementPlan:
    s, lr = _res(cfg.sampler.num_cpus, cfg.sampler.num_gpus), _res(cfg.learner.num_cpus, cfg.learner.num_gpus)
    ns, nl = cfg.num_samplers, cfg.num_learners
    if cfg.placement == "colocated":
        bundles = []
        for i in range(max(ns, nl)):
            b: dict[str, float] = {}
            for part, n in ((s, ns), (lr, nl)):
                if i < n:
                    for k, v in part.items():
                        b[k] = b.get(k, 0.0) + v
            bundles.append(b or {"CPU": 0.01})
        return PlacementPlan(bundles, list(range(ns)), list(range(nl)))
    bundles = [s or {"CPU": 0.01} for _ in range(ns)] + [lr or {"CPU": 0.01} for _ in range(nl)]
    return PlacementPlan(bundles, list(range(ns)), list(range(ns, ns + nl)))


class Placement:
    """The reserved placement group; :meth:`strategy` places an actor in its bundle."""

    def __init__(self, cfg: RayConfig, *, name: str, timeout: float = 120.0):
        self.plan = plan(cfg)
        need, have = self.plan.total(), ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
        if short:
            detail = ", ".join(f"{k}: needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
            raise ConfigError(
                f"ray: the {cfg.placement} placement of {cfg.num_samplers} sampler(s) and {cfg.num_learners} "
                f"learner(s) does not fit the cluster ({detail}); lower ray.sampler / ray.learner resources "
                "or the actor counts"
            )
        self.group: PlacementGroup = placement_group(self.plan.bundles, strategy="PACK", name=name)
        ready, _ = ray.wait([self.group.ready()], timeout=timeout)
        if not ready:
            remove_placement_group(self.group)
            raise ConfigError(
                f"ray: the placement group {self.plan.bundles} was not scheduled within {timeout:g}s "
                "(resources held by other jobs?)"
            )

    def strategy(self, role: str, index: int) -> Any:
        bundle = (self.plan.sampler if role == "sampler" else self.plan.learner)[index]
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=False,
        )

    def remove(self) -> None:
        remove_placement_group(self.group)


GpuSlot = tuple[str, tuple[str, ...]]  # (node id, the GPU ids Ray gave the actor)


def gpu_slot() -> GpuSlot:
    """The calling actor's GPUs: its node and the ids Ray assigned (several actors asking for fractions of a
    GPU may be given the same one)."""
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", []))


def shared_gpus(slots: dict[str, GpuSlot]) -> list[str]:
    """Pairs of actors (``slots``: label -> :func:`gpu_slot`) that hold the same GPU of the same node, as
    ``"learner 0 and sampler 1 share GPU 0 of node 3f2a..."``. NCCL refuses two ranks of a group on one GPU."""
    out = []
    labels = list(slots)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            (node_a, gpus_a), (node_b, gpus_b) = slots[a], slots[b]
            common = sorted(set(gpus_a) & set(gpus_b)) if node_a == node_b else []
            if common:
                out.append(f"{a} and {b} share GPU {','.join(common)} of node {node_a[:8]}")
    return out
