"""Turn a validated :class:`rlflow.config.Config` into the plain objects of a run (flat arguments)."""

from __future__ import annotations

from pathlib import Path

import torch

from rlflow.algos import Algorithm, build_algorithm
from rlflow.config import Config, ConfigError, DataConfig, ModelConfig, SamplingConfig, TrainConfig
from rlflow.learner import Learner, LearnerSettings
from rlflow.models import load_policy
from rlflow.models.base import FlowPolicy
from rlflow.policy_step import StepSettings
from rlflow.sampler import Sampler, SamplerSettings
from rlflow.tasks import PromptFileTask, ShapesTask, Task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_path(path: str) -> str:
    if path == "builtin:shapes":
        from rlflow.worlds.shapes import BASE_DIR

        return str(BASE_DIR)
    if path.startswith("builtin:"):
        raise ConfigError(f"model.path '{path}': the only builtin model is 'builtin:shapes'")
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model.path '{path}': no such folder (a diffusers-format folder or a hub id is expected)")
    return path


def build_policy(m: ModelConfig, seed: int) -> FlowPolicy:
    """Load the model and attach a fresh LoRA (its init is seeded by ``seed``)."""
    policy = load_policy(m.family, model_path(m.path), dtype=DTYPES[m.dtype], device=m.device)
    torch.manual_seed(seed)
    policy.add_lora(m.lora.rank, m.lora.alpha, m.lora.target_modules)
    return policy


def build_algo(cfg: Config) -> Algorithm:
    return build_algorithm(cfg.algo)


def step_settings(s: SamplingConfig) -> StepSettings:
    return StepSettings(noise_level=s.noise_level, kind=s.kind, guidance_scale=s.guidance_scale)


def sampler_settings(s: SamplingConfig) -> SamplerSettings:
    return SamplerSettings(
        height=s.height, width=s.width, num_steps=s.num_steps, sde_steps=s.sde_steps, sde_lo=s.sde_range[0],
        sde_hi=s.sde_range[1], contiguous=s.contiguous, chunk_size=s.chunk_size, shared_noise=s.shared_noise,
        step=step_settings(s),
    )


def learner_settings(t: TrainConfig, s: SamplingConfig) -> LearnerSettings:
    return LearnerSettings(
        lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip, minibatches=t.minibatches, micro_batch=s.chunk_size
    )


def build_task(d: DataConfig) -> Task:
    if d.source == "shapes":
        return ShapesTask(d.eval_per_kind)
    assert d.train_file is not None
    return PromptFileTask(d.train_file, d.eval_file, d.eval_seeds)


def build_sampler(policy: FlowPolicy, cfg: Config, *, adapter: str = "default") -> Sampler:
    """A sampler of ``policy`` recording what the configured algorithm asks for, with LoRA ``adapter``."""
    return Sampler(policy, sampler_settings(cfg.sampling), build_algo(cfg).rollout, adapter=adapter)


def build_learner(policy: FlowPolicy, cfg: Config, *, rank: int = 0, world_size: int = 1) -> Learner:
    return Learner(policy, build_algo(cfg), learner_settings(cfg.train, cfg.sampling), step_settings(cfg.sampling),
                   rank=rank, world_size=world_size)
