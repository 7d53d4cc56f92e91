"""The validated run configuration. Unknown keys and bad values fail before any work, naming the key.

A config is YAML; ``--set a.b=value`` overrides are applied before validation (values parsed as YAML).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from rlflow.algos import ALGORITHMS
from rlflow.algos.base import AlgoSection
from rlflow.models import MODEL_FAMILIES
from rlflow.schema import ConfigError
from rlflow.schema import Section as _Section

__all__ = ["Config", "ConfigError", "load_config", "validate", "apply_overrides", "to_dict"]


class LoraConfig(_Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: tuple[str, ...] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )


class ModelConfig(_Section):
    family: str = Field("sd3", description="a registered model family (rlflow.models.MODEL_FAMILIES)")
    path: str = Field("builtin:shapes", description="diffusers folder, hub id, or builtin:shapes")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    lora: LoraConfig = LoraConfig()

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {v!r}; registered: {', '.join(MODEL_FAMILIES.names())}")
        return v


class DataConfig(_Section):
    source: Literal["shapes", "file"] = "shapes"
    train_file: str | None = Field(None, description="one prompt per line (source: file)")
    eval_file: str | None = None
    eval_per_kind: int = Field(128, ge=1, description="shapes world: held-out images per prompt kind (4 kinds)")
    eval_seeds: int = Field(1, ge=1, description="file prompts: images per eval prompt")

    @model_validator(mode="after")
    def _files(self) -> DataConfig:
        if self.source == "file" and not self.train_file:
            raise ValueError("data.train_file is required when data.source is 'file'")
        return self


class SamplingConfig(_Section):
    height: int = Field(32, ge=8)
    width: int = Field(32, ge=8)
    num_steps: int = Field(10, ge=2, description="rollout grid steps K")
    noise_level: float = Field(0.7, ge=0.0, le=2.0)
    kind: Literal["sde", "cps"] = "sde"
    sde_steps: int = Field(3, ge=1, description="stochastic, trained steps per rollout")
    sde_range: tuple[int, int] = Field((0, 5), description="[lo, hi): indices the trained steps are drawn from")
    contiguous: bool = False
    shared_noise: bool = Field(False, description="a group starts from one initial noise (Flow-GRPO-Fast branching)")
    guidance_scale: float = Field(1.0, ge=1.0)
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2)
    chunk_size: int = Field(32, ge=1, description="samples per forward; the learner micro-batch too")

    @model_validator(mode="after")
    def _window(self) -> SamplingConfig:
        lo, hi = self.sde_range
        if not 0 <= lo < hi <= self.num_steps - 1:
            raise ValueError(
                f"sampling.sde_range {list(self.sde_range)} must satisfy 0 <= lo < hi <= num_steps - 1 "
                f"= {self.num_steps - 1} (the last step is never trained)"
            )
        if self.sde_steps > hi - lo:
            raise ValueError(f"sampling.sde_steps {self.sde_steps} exceeds the {hi - lo} steps of sde_range")
        return self


class RewardConfig(_Section):
    """The reward and its server pool (Ray runtime: ``replicas`` actors, each scoring batches of at most
    ``max_batch_size`` images; a call that takes longer than ``timeout_s`` is retried ``retries`` times)."""

    name: str = Field("shapes_geneval", description="a registered reward name or 'package.module:callable'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(64, ge=1)
    timeout_s: float = Field(300.0, gt=0)
    retries: int = Field(2, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="a Ray runtime_env for the reward's actors")


# The algorithm section is a tagged union of the registered algorithms' sections (rlflow/algos/*.py).
_ALGOS: dict[str, type[AlgoSection]] = {name: ALGORITHMS.get(name).config for name in ALGORITHMS}
if TYPE_CHECKING:
    AlgoConfig = AlgoSection
else:
    AlgoConfig = Annotated[Union[tuple(_ALGOS.values())], Field(discriminator="name")]  # noqa: UP007


class TrainConfig(_Section):
    steps: int = Field(100, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    minibatches: int = Field(2, ge=1, description="optimizer steps per rollout batch")
    eval_every: int = Field(25, ge=0, description="0 disables periodic eval (first and last still run)")
    eval_steps: int = Field(40, ge=1, description="ODE steps of the eval sampler")
    checkpoint_every: int = Field(25, ge=1)
    log_images_every: int = Field(25, ge=0)
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")


class Resources(_Section):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class RayConfig(_Section):
    """The Ray runtime: actors, their placement, and the pipeline."""

    address: str | None = Field(None, description="None: embedded local Ray (inside a Ray job: the job's cluster)")
    num_samplers: int = Field(1, ge=1)
    num_learners: int = Field(1, ge=1, description="data-parallel learner ranks (one torch.distributed group)")
    placement: Literal["colocated", "disaggregated"] = Field(
        "colocated", description="colocated: sampler i and learner i share a bundle (GPU); disaggregated: separate pools"
    )
    pipeline: Literal["sequential", "sync", "one_step_off"] = Field(
        "sync",
        description="sequential: score after the whole rollout; sync: each finished chunk is scored while the "
        "next one samples; one_step_off: also the rollout of step k+1 overlaps the update of step k (lag 1)",
    )
    sampler: Resources = Resources()
    learner: Resources = Resources()
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")
    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="learner data parallelism: ddp (every rank holds the model, gradients all-reduced) "
        "or fsdp2 (weights, gradients and optimizer state sharded over the ranks, for models too big for one "
        "device)")
    weight_sync: Literal["lora", "full"] = Field("lora", description="what rank 0 publishes to the samplers")
    weight_transport: Literal["auto", "object_store", "collective"] = Field(
        "auto", description="how weights reach the samplers: the Ray object store, or a broadcast in a process "
        "group of learner rank 0 and the samplers (NCCL on GPUs, gloo on CPUs); auto: collective when the "
        "samplers and learners have GPUs of their own (disaggregated)")
    max_restarts: int = Field(3, ge=0, description="restarts of a dead sampler or reward actor")
    max_chunk_retries: int = Field(3, ge=0, description="redos of a rollout chunk lost with its sampler")

    @property
    def on_gpus(self) -> bool:
        return self.sampler.num_gpus > 0 and self.learner.num_gpus > 0

    @model_validator(mode="after")
    def _transport(self) -> RayConfig:
        if self.weight_transport == "collective" and self.on_gpus and self.placement == "colocated":
            raise ValueError(
                "ray.weight_transport 'collective' with ray.placement 'colocated' puts learner 0 and sampler 0 of "
                "the NCCL broadcast group on one GPU, which NCCL refuses: use weight_transport 'object_store' "
                "(or 'auto') or placement 'disaggregated'"
            )
        return self


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="None: sqlite store in output_dir")
    experiment: str = "rlflow"


class Config(_Section):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    reward: RewardConfig = RewardConfig()
    algo: AlgoConfig = Field(default_factory=lambda: _ALGOS["dppo"]())  # type: ignore[call-arg]
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _chunks(self) -> Config:
        n = self.sampling.prompts_per_step * self.sampling.group_size
        if n % self.sampling.chunk_size:
            raise ValueError(
                f"sampling.chunk_size {self.sampling.chunk_size} must divide prompts_per_step * group_size = {n}"
            )
        return self


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` applied to a nested dict (values parsed as YAML scalars/lists)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section that holds ``loc`` (``loc`` may carry an algo tag)."""
    model: Any = Config
    for part in loc[:-1]:
        if part == "algo":
            continue  # a tagged union: the next part of loc is the algorithm's name
        if part in _ALGOS:
            model = _ALGOS[part]
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not hasattr(field.annotation, "model_fields"):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in _ALGOS)
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (allowed here: {', '.join(_allowed_keys(tuple(e['loc'])))})")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def validate(raw: dict[str, Any], source: str = "") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def read_config_text(path: str | Path) -> tuple[str, str]:
    """``(yaml_text, source)`` of a config file, or of an environment variable when ``path`` is ``env:NAME``
    (how ``rlflow submit`` hands a job the exact config it validated)."""
    if str(path).startswith("env:"):
        name = str(path)[4:]
        if name not in os.environ:
            raise ConfigError(f"config {path}: environment variable {name} is not set")
        return os.environ[name], str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return p.read_text(), str(p)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read YAML (a file, or ``env:NAME``), apply ``--set`` overrides, validate."""
    text, source = read_config_text(path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {source} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {source} must hold a mapping at the top level")
    return validate(apply_overrides(raw, overrides or []), source)


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
