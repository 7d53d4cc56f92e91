"""The validated run configuration. Unknown keys and bad values fail before any work, naming the key.

A config is YAML; ``--set a.b=value`` overrides are applied before validation (values parsed as YAML).
What validation cannot see (the files a config names, the machine's devices) :func:`check_inputs` checks
before any work; what a resumed run may change, :func:`check_resume`.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args

import torch
import yaml
from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from rlflow.algos import ALGORITHMS
from rlflow.algos.base import AlgoSection
from rlflow.models import MODEL_FAMILIES
from rlflow.redact import is_secret_key
from rlflow.schema import ConfigError
from rlflow.schema import Section as _Section
from rlflow.tasks import read_prompts

__all__ = [
    "Config", "ConfigError", "load_config", "validate", "apply_overrides", "to_dict", "check_inputs", "check_resume",
    "check_run_name",
]

RUN_NAME_RULE = "1 to 128 of the characters A-Z a-z 0-9 . _ -, the first a letter, a digit or '_'"
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SEED_RANGE = "an integer with 0 <= seed < 2**32 (numpy's seed range)"
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_run_name(name: str, key: str = "name") -> str:
    """``name`` if it is one safe folder name (a run folder is ``output_dir/<name>-<time>``), else a
    :class:`ConfigError` naming ``key``: no ``/``, ``\\``, ``..``, NUL or leading ``-`` can reach a path."""
    if not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"{key} {name!r}: a run name must be {RUN_NAME_RULE} (it names a folder in output_dir)")
    return name


def _ray_gpus(v: float) -> float:
    if v > 1 and not v.is_integer():
        raise ValueError(f"Ray shares a GPU only in fractions below 1; above 1 it takes whole GPUs, not {v}")
    return v


# Ray's GPU request of one actor: 0, a fraction below 1, or a whole number
Gpus = Annotated[float, Field(ge=0), AfterValidator(_ray_gpus)]


class LoraConfig(_Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )


class ModelConfig(_Section):
    family: str = Field("sd3", description="a registered model family (rlflow.models.MODEL_FAMILIES)")
    path: str = Field("builtin:shapes", min_length=1, description="diffusers folder, hub id, or builtin:shapes")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description=f"a torch device of type {', '.join(DEVICE_TYPES)}; on Ray, 'cuda' "
                        "needs ray.sampler.num_gpus and ray.learner.num_gpus (see check_inputs)")
    lora: LoraConfig = LoraConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            kind = torch.device(v).type
        except (RuntimeError, TypeError):
            raise ValueError(f"{v!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')") from None
        if kind not in DEVICE_TYPES:
            raise ValueError(f"device type {kind!r} cannot run a model; use one of {', '.join(DEVICE_TYPES)}")
        return v

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {v!r}; registered: {', '.join(MODEL_FAMILIES.names())}")
        return v


class DataConfig(_Section):
    source: Literal["shapes", "file"] = "shapes"
    train_file: str | None = Field(None, min_length=1, description="one prompt per line (source: file)")
    eval_file: str | None = Field(None, min_length=1, description="one prompt per line (source: file)")
    eval_per_kind: int = Field(128, ge=1, description="shapes world: held-out images per prompt kind (4 kinds)")
    eval_seeds: int = Field(1, ge=1, description="file prompts: images per eval prompt")

    @model_validator(mode="after")
    def _files(self) -> DataConfig:
        if self.source == "file" and not self.train_file:
            raise ValueError("data.train_file is required when data.source is 'file'")
        if self.source != "file" and (self.train_file or self.eval_file):
            raise ValueError(f"data.train_file and data.eval_file are read only when data.source is 'file' "
                             f"(data.source is {self.source!r})")
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


class RewardServerConfig(_Section):
    """One reward and its server pool (Ray runtime: ``replicas`` actors, each scoring batches of at most
    ``max_batch_size`` images; a call that takes longer than ``timeout_s`` is retried ``retries`` times)."""

    name: str = Field("shapes_geneval", min_length=1,
                      description="a registered reward name or 'package.module:callable'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(64, ge=1)
    timeout_s: float = Field(300.0, gt=0)
    retries: int = Field(2, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: Gpus = 0.0
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="a Ray runtime_env for the reward's actors")


SERVER_KEYS = tuple(RewardServerConfig.model_fields)


class PanelMember(RewardServerConfig):
    """A reward of a panel (``reward.panel``): a reward server of its own, with its ``weight`` in the fusion
    and its ``label``, the name its score is logged under (default: the reward's name)."""

    weight: float = Field(1.0, ge=0, description="the member's weight w_i in the fusion (ALGORITHMS.md 7)")
    label: str | None = Field(None, min_length=1, description="the component name (default: name); unique")

    @property
    def component(self) -> str:
        return self.label or self.name


class RewardConfig(RewardServerConfig):
    """The reward: one reward server (the keys above), or a panel of them (``panel``) fused at the reward or
    the advantage level (``fusion``, ALGORITHMS.md 7). A config without a panel is a panel of one; with one,
    the reward-server keys go on each member (the top-level ones are not read)."""

    panel: list[PanelMember] | None = Field(
        None, min_length=1, description="several rewards, each with its own weight and server pool")
    fusion: Literal["reward", "advantage"] = Field(
        "reward", description="reward: A = normalise(sum_i w_i r_i); advantage: A = sum_i w_i normalise(r_i)")

    @model_validator(mode="after")
    def _panel(self) -> RewardConfig:
        if self.panel is None:
            return self
        if stray := [k for k in SERVER_KEYS if k in self.model_fields_set]:
            keys = ", ".join(f"reward.{k}" for k in stray)
            raise ValueError(f"{keys}: with reward.panel set, set {'these' if len(stray) > 1 else 'it'} on each "
                             "panel member (reward.panel[i]." + stray[0] + ")")
        seen: dict[str, int] = {}
        for i, m in enumerate(self.panel):
            if m.component in seen:
                raise ValueError(f"reward.panel[{i}] and reward.panel[{seen[m.component]}] are both labelled "
                                 f"{m.component!r}: give each member a unique label (reward.panel[{i}].label)")
            seen[m.component] = i
        if not any(m.weight > 0 for m in self.panel):
            raise ValueError("reward.panel: every weight is 0; give at least one member a weight above 0")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """A panel's dump leaves out the unread top-level server keys, so it validates again."""
        out: dict[str, Any] = handler(self)
        if self.panel is not None:
            for k in SERVER_KEYS:
                out.pop(k, None)
        return out

    @property
    def is_panel(self) -> bool:
        return self.panel is not None

    def members(self) -> list[tuple[str, PanelMember]]:
        """``(key, member)`` of every reward: ``("reward.panel[i]", member)`` of a panel, or
        ``("reward", the single reward as a member of weight 1)``; ``key`` prefixes the member's config keys
        in messages."""
        if self.panel is not None:
            return [(f"reward.panel[{i}]", m) for i, m in enumerate(self.panel)]
        return [("reward", PanelMember(**{k: getattr(self, k) for k in SERVER_KEYS}))]

    @property
    def labels(self) -> list[str]:
        return [m.component for _, m in self.members()]


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
    keep_checkpoints: int = Field(
        0, ge=0, description="keep only the newest N sound checkpoints in the run folder; 0 keeps all (each LoRA "
        "also reaches MLflow)"
    )
    log_images_every: int = Field(25, ge=0)
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")


class Resources(_Section):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: Gpus = 0.0


class RayConfig(_Section):
    """The Ray runtime: actors, their placement, and the pipeline."""

    address: str | None = Field(None, min_length=1, description="None: embedded local Ray (inside a Ray job: the job's cluster)")
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
    tracking_uri: str | None = Field(None, min_length=1, description="None: sqlite store in output_dir")
    experiment: str = Field("rlflow", min_length=1)


class Config(_Section):
    name: str = Field("run", description=f"the run folder is output_dir/<name>-<time>: {RUN_NAME_RULE}")
    seed: int = Field(0, description=SEED_RANGE)
    output_dir: str = Field("runs", min_length=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    reward: RewardConfig = RewardConfig()
    algo: AlgoConfig = Field(default_factory=lambda: _ALGOS["dppo"]())  # type: ignore[call-arg]
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _RUN_NAME.fullmatch(v):
            raise ValueError(f"a run name must be {RUN_NAME_RULE} (it names a folder in output_dir)")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < 2**32:
            raise ValueError(f"the seed must be {SEED_RANGE}")
        return v

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
        node: Any = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = _item(node, p, key) if isinstance(node, list) else node.setdefault(p, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            why = getattr(err, "problem", None) or " ".join(str(err).split())
            raise ConfigError(f"--set {key}: {value!r} is not valid YAML ({why})") from None
        if isinstance(node, list):
            _item(node, parts[-1], key)
            node[int(parts[-1])] = parsed
        else:
            node[parts[-1]] = parsed
    return out


def _item(node: list[Any], part: str, key: str) -> Any:
    """Item ``part`` of a list in a ``--set`` key (``reward.panel.1.replicas=4``)."""
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: '{part}' is not an index of a list of {len(node)} items")
    return node[int(part)]


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section that holds ``loc`` (``loc`` may carry an algo tag)."""
    model: Any = Config
    for part in loc[:-1]:
        if part == "algo" or isinstance(part, int):
            continue  # a tagged union: the next part of loc is the algorithm's name; a list: its item
        if part in _ALGOS:
            model = _ALGOS[part]
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = _section_of(field.annotation) if field is not None else None
        if inner is None:
            return []
        model = inner
    return sorted(model.model_fields)


def _section_of(annotation: Any) -> Any:
    """The section class an annotation holds: itself, or the item of ``list[Section] | None``."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in get_args(annotation):
        if (found := _section_of(arg)) is not None:
            return found
    return None


def _key(loc: tuple[Any, ...]) -> str:
    """``reward.panel[1].weight`` for the location ``("reward", "panel", 1, "weight")``."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in _ALGOS)
        key = _key(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (allowed here: {', '.join(_allowed_keys(tuple(e['loc'])))})")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    if len(lines) == 1:  # the common case reads as one line
        return f"invalid config {source}: {lines[0].strip()}"
    return f"invalid config {source}:\n" + "\n".join(lines)


def validate(raw: dict[str, Any], source: str = "") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def read_config_text(path: str | Path) -> tuple[str, str]:
    """``(yaml_text, source)`` of a config file, or of an environment variable when ``path`` is ``env:NAME``
    (a config without secrets only: a Ray job's env vars are public, see :func:`rlflow.jobs.submit`)."""
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


# --------------------------------------------------------------------------- checks before any work


def check_inputs(cfg: Config, *, on_ray: bool) -> None:
    """What validation cannot see, checked by ``rlflow train`` before any work (a :class:`ConfigError` naming
    the key): the prompt files hold prompts, ``output_dir`` can hold run folders, and ``model.device`` exists
    where the model runs (:func:`check_device`). Not part of :func:`validate`: a run folder's ``config.yaml``
    must still load (``rlflow sample``) after its prompt files moved, or on a machine without its GPUs."""
    if cfg.data.source == "file":
        read_prompts(cfg.data.train_file or "", "data.train_file")
        if cfg.data.eval_file:
            read_prompts(cfg.data.eval_file, "data.eval_file")
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {cfg.output_dir}: exists and is not a folder")
    nearest = next(p for p in (out, *out.parents) if p.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {cfg.output_dir}: cannot make folders in {nearest}")
    check_device(cfg, on_ray=on_ray)


def check_device(cfg: Config, *, on_ray: bool) -> None:
    """``model.device`` against the resources the run asks for. On Ray (``on_ray``) the sampler and learner
    actors run the model: Ray hides every GPU from an actor that asks for none and shows one that asks for
    some as ``cuda:0``, so ``cuda`` needs ``ray.sampler.num_gpus`` and ``ray.learner.num_gpus`` above 0, takes
    no device index, and a GPU asked for with another device would sit idle. In this process: the machine's."""
    device = torch.device(cfg.model.device)
    got = f"model.device {cfg.model.device!r}"
    if on_ray:
        gpus = {"ray.sampler.num_gpus": cfg.ray.sampler.num_gpus, "ray.learner.num_gpus": cfg.ray.learner.num_gpus}
        if device.type == "cuda" and device.index is not None:
            raise ConfigError(f"{got}: a Ray actor sees only the GPUs it is given, always from cuda:0; use 'cuda'")
        if device.type == "cuda" and (none := [k for k, v in gpus.items() if v == 0]):
            raise ConfigError(f"{got} with {' and '.join(none)} 0: Ray hides every GPU from an actor that asks for "
                              "none; give both GPUs (e.g. 0.5 each to share one) or use model.device 'cpu'")
        if device.type != "cuda" and (asked := [k for k, v in gpus.items() if v > 0]):
            raise ConfigError(f"{got} leaves the GPUs of {' and '.join(asked)} idle: set them to 0 or use "
                              "model.device 'cuda'")
    elif device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (device.index or 0):
            raise ConfigError(f"{got}: this machine has {count} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{got}: MPS is not available on this machine")


# A resumed run may change how long it runs and how it is executed, tracked and checkpointed, and rotate
# credentials; anything else (seed, model, data, sampling, reward maths, algo, optimizer, eval) would make it
# another run than the one its checkpoints belong to. A panel member's keys (``reward.panel.<i>.<key>``) are
# judged as the same key of a single reward (``reward.<key>``): its pool may change, its weight may not.
RESUMABLE = (
    "output_dir", "train.steps", "train.eval_every", "train.checkpoint_every", "train.log_images_every",
    "train.threads", "tracking", "ray", "reward.replicas", "reward.max_batch_size", "reward.timeout_s",
    "reward.retries", "reward.num_cpus", "reward.num_gpus",
)
NOT_RESUMABLE = ("ray.pipeline",)  # one_step_off trains on rollouts one policy version old: other maths
# Keys that name code to import or packages to install: on resume they change only when --set names them.
CODE_KEYS = ("reward.name", "reward.runtime_env")
_MEMBER = re.compile(r"^reward\.panel\.\d+\.")


def _under(key: str, prefixes: tuple[str, ...], *, member_as_reward: bool = True) -> bool:
    if member_as_reward:
        key = _MEMBER.sub("reward.", key)  # a panel member's key counts as the single reward's
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, list) and node and prefix == "reward.panel.":  # members by index: reward.panel.1.weight
        node = {str(i): m for i, m in enumerate(node)}
    if isinstance(node, dict) and node:
        return {k: v for name, sub in node.items() for k, v in _leaves(sub, f"{prefix}{name}.").items()}
    return {prefix[:-1]: node}


def _panel_shape(cfg: Config) -> list[str] | None:
    return None if cfg.reward.panel is None else cfg.reward.labels


def check_resume(original: Config, resumed: Config, overrides: list[str], run_dir: str) -> None:
    """Refuse a resume whose ``--set`` ``overrides`` change the run: a key outside :data:`RESUMABLE` (a
    string under a secret-looking key of ``reward.kwargs``, e.g. ``api_key``, may change: a rotated
    credential), or a key of :data:`CODE_KEYS` changed by any ``--set`` but one naming it (or a key below
    it), e.g. ``--set reward={...}``. A reward panel's members (their number and labels), weights and
    ``reward.fusion`` are the run's maths; each member's pool keys may change (``--set reward.panel.1.replicas=4``)."""
    if _panel_shape(original) != _panel_shape(resumed):
        raise ConfigError(
            f"--resume {run_dir}: reward.panel would change from {_panel_shape(original)} to "
            f"{_panel_shape(resumed)} (the members of a reward panel are the run's reward: start a new run)"
        )
    before, after = _leaves(to_dict(original)), _leaves(to_dict(resumed))
    named = [o.partition("=")[0].strip() for o in overrides]
    changed = [k for k in sorted(before.keys() | after.keys()) if before.get(k, ()) != after.get(k, ())]
    # a --set names k when it names k, a section above it, or (k an emptied section) a key below it
    code = [k for k in changed if _under(k, CODE_KEYS) and not any(
        _under(n, CODE_KEYS) and (_under(k, (n,), member_as_reward=False) or _under(n, (k,), member_as_reward=False))
        for n in named)]
    if code:
        raise ConfigError(
            f"--resume {run_dir}: {', '.join(code)} would differ from the run's config.yaml; it names code to import "
            "or packages to install, so a resumed run changes it only when --set names it (--set reward.name=...)"
        )
    rotated = [k for k in changed if _under(k, ("reward.kwargs",)) and is_secret_key(k.rsplit(".", 1)[-1])
               and isinstance(before.get(k), str) and isinstance(after.get(k), str)]
    other = [k for k in changed if not _under(k, CODE_KEYS) and k not in rotated
             and (not _under(k, RESUMABLE) or _under(k, NOT_RESUMABLE))]
    if other:
        allowed = ", ".join(f"{k}.*" if k in ("tracking", "ray") else k for k in RESUMABLE)
        raise ConfigError(
            f"--resume {run_dir}: {', '.join(other)} cannot change on resume (a different run: start a new one); "
            f"a resumed run may change {allowed} (not {', '.join(NOT_RESUMABLE)}; a panel member's too, as "
            "reward.panel.<i>.replicas) and credentials in reward.kwargs"
        )
