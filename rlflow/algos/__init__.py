"""Learners: pure losses, advantages, and one file per algorithm family, each registered by name.

Adding an algorithm: one file here with its config section, its object (:class:`rlflow.algos.base.Algorithm`)
and a ``register_algorithm`` call, plus its import below; the config schema, the sampler, the learner and both
executors read its declarations.
"""

from rlflow.algos import dppo, grpo, nft  # noqa: F401  (registers the built-in algorithms)
from rlflow.algos.advantages import group_advantages
from rlflow.algos.base import ALGORITHMS, Algorithm, build_algorithm, register_algorithm
from rlflow.algos.losses import dppo_loss, grpo_loss, nft_loss

__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm", "register_algorithm", "group_advantages", "grpo_loss",
           "dppo_loss", "nft_loss"]
