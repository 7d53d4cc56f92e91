"""Bad input through the real command line: every bad value of a config is a one-line error naming the key
(exit status 2) before any work: no run folder, no MLflow store or run. And what ``--resume`` may change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types as at
import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from rlflow.algos import ALGORITHMS
from rlflow.cli import main
from rlflow.config import Config, ConfigError, apply_overrides, check_resume, validate

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "toy_shapes_dppo.yaml")
# a run of seconds, should a bad value get through
TINY = [
    "sampling.prompts_per_step=2", "sampling.group_size=4", "sampling.chunk_size=4", "sampling.num_steps=6",
    "sampling.sde_range=[0, 4]", "data.eval_per_kind=2", "train.steps=1", "train.eval_steps=4", "train.eval_every=0",
    "train.log_images_every=0", "train.checkpoint_every=1", "train.threads=1",
]  # fmt: skip


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _train(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlflow: error: "), err
    return lines[0]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------- every field of the schema


def _sections(model: type[BaseModel], prefix: str = "") -> typing.Iterator[tuple[str, str, typing.Any]]:
    """``(key, set_prefix, field)`` of every leaf field; an algorithm's fields come with their section tag."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if name == "algo" and model is Config:
            for algo in ALGORITHMS:
                for key, _, sub in _sections(ALGORITHMS.get(algo).config, "algo."):
                    if key != "algo.name":
                        yield key, algo, sub
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _sections(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", "", field


def _bad_values(field: typing.Any) -> list[str]:
    """YAML values each outside the field's declared range or choices."""
    ann, out = field.annotation, []
    for m in field.metadata:
        if isinstance(m, at.Ge):
            out.append(str(m.ge - 1))
        elif isinstance(m, at.Gt):
            out.append(str(m.gt))
        elif isinstance(m, at.Le):
            out.append(str(m.le + 1))
        elif isinstance(m, at.Lt):
            out.append(str(m.lt))
        elif isinstance(m, at.MinLen):
            out.append("[]" if typing.get_origin(ann) is tuple else '""')
    if ann is float:
        out += [".nan", ".inf"]
    if typing.get_origin(ann) is typing.Literal:
        out.append("bogus")
    return out


def _set(key: str, algo: str, value: str) -> str:
    if algo:  # the algo section is a tagged union: replace it whole, tag and bad value
        return f"algo={{name: {algo}, {key.split('.', 1)[1]}: {value}}}"
    return f"{key}={value}"


SCHEMA_CASES = [(key, _set(key, algo, v)) for key, algo, field in _sections(Config) for v in _bad_values(field)]
SCHEMA_CASES += [
    *[("name", f"name={v}") for v in ["../../evil", '""', ".", "..", "a/b", "a\\b", '"a\\0b"', "-rf", "x" * 129]],
    ("seed", "seed=-1"), ("seed", f"seed={2**32}"), ("seed", "seed=1.5"),
    ("ray.sampler.num_gpus", "ray.sampler.num_gpus=1.5"), ("reward.num_gpus", "reward.num_gpus=2.5"),
    ("model.device", "model.device=gpu"), ("model.device", "model.device=meta"), ("model.device", "model.device=cuda:-1"),
    ("model.family", "model.family=sdxl"), ("sampling.sde_range", "sampling.sde_range=[3, 2]"),
    ("sampling.chunk_size", "sampling.chunk_size=3"), ("data.train_file", "data.source=file"),
    ("data.train_file", "data.train_file=prompts.txt"), ("train.bogus", "train.bogus=1"),
    ("train.steps", "train.steps=[1, 2"),  # not YAML
]  # fmt: skip


def test_the_sweep_covers_every_numeric_field_with_a_range():
    """Every int or float field of the schema declares its range (so the sweep below feeds it a bad value);
    ``seed`` has a validator of its own."""
    bounds = (at.Ge, at.Gt, at.Le, at.Lt)
    unranged = [key for key, _, f in _sections(Config)
                if f.annotation in (int, float) and not any(isinstance(m, bounds) for m in f.metadata)]
    assert unranged == ["seed"]
    keys = {k for k, _ in SCHEMA_CASES}
    assert {"train.lr", "reward.timeout_s", "ray.learner.num_gpus", "algo.decay_max", "algo.clip_range"} <= keys


@pytest.mark.parametrize("key,item", SCHEMA_CASES, ids=[s for _, s in SCHEMA_CASES])
def test_a_bad_value_is_one_line_naming_the_key_and_makes_nothing(tmp_path, capsys, key, item):
    out = tmp_path / "a" / "b" / "runs"  # name=../../evil would land in tmp_path/a
    flag = [] if key == "output_dir" else ["--output-dir", str(out)]  # the flag would override the bad value
    code, err = _train(capsys, CONFIG, "--in-process", *_sets([*TINY, item]), *flag)
    assert code == 2, err
    line = _one_line_error(err)
    assert key in line and "Traceback" not in line
    assert _files(tmp_path) == []  # no run folder, and no MLflow store (it would be runs/mlflow.db)


def test_the_rlflow_command_refuses_an_escaping_run_name(tmp_path):
    out = tmp_path / "a" / "runs"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "rlflow"), "train", CONFIG, "--set", "name=../../evil", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = _one_line_error(done.stderr)
    assert line.startswith("rlflow: error: invalid config ") and "name: " in line and "'../../evil'" in line
    assert "A-Z a-z 0-9 . _ -" in line
    assert _files(tmp_path) == []


# --------------------------------------------------------------------------- what the config names


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BLANK = "  \n\n\t\n"
PATH_CASES = {
    "train_file missing": lambda d: (["data.source=file", f"data.train_file={d / 'nope.txt'}"],
                                     f"data.train_file: prompt file not found: {d / 'nope.txt'}"),
    "train_file empty": lambda d: (["data.source=file", f"data.train_file={_write(d / 'p.txt', '')}"],
                                   f"data.train_file: {d / 'p.txt'} holds no prompts"),
    "train_file blank": lambda d: (["data.source=file", f"data.train_file={_write(d / 'p.txt', BLANK)}"],
                                   f"data.train_file: {d / 'p.txt'} holds no prompts"),
    "eval_file empty": lambda d: (["data.source=file", f"data.train_file={_write(d / 'p.txt', 'a circle')}",
                                   f"data.eval_file={_write(d / 'e.txt', chr(10))}"],
                                  f"data.eval_file: {d / 'e.txt'} holds no prompts"),
    "model folder missing": lambda d: ([f"model.path={d / 'model'}"], f"model.path '{d / 'model'}': no such folder"),
    "output_dir a file": lambda d: ([f"output_dir={_write(d / 'runs', 'x')}"],
                                    f"output_dir {d / 'runs'}: exists and is not a folder"),
    "output_dir below a file": lambda d: ([f"output_dir={_write(d / 'f', 'x')}/runs"],
                                          f"output_dir {d / 'f'}/runs: cannot make folders in {d / 'f'}"),
    "reward not registered": lambda d: (["reward.name=nope"], "reward.name 'nope' is not registered"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_what_the_config_names_is_checked_before_any_work(tmp_path, capsys, case):
    inputs = tmp_path / "in"
    sets, message = PATH_CASES[case](inputs)
    given = _files(tmp_path)
    out = [] if any(s.startswith("output_dir=") for s in sets) else ["--output-dir", str(tmp_path / "runs")]
    code, err = _train(capsys, CONFIG, "--in-process", *_sets([*TINY, *sets]), *out)
    assert code == 2, err
    assert message in _one_line_error(err)
    assert _files(tmp_path) == given


GPUS = ["ray.sampler.num_gpus=0.5", "ray.learner.num_gpus=0.5"]
DEVICE_CASES = [
    (["model.device=cuda"], "model.device 'cuda' with ray.sampler.num_gpus and ray.learner.num_gpus 0: Ray hides"),
    (["model.device=cuda", GPUS[0]], "model.device 'cuda' with ray.learner.num_gpus 0"),
    (["model.device=cuda:1", *GPUS], "model.device 'cuda:1': a Ray actor sees only the GPUs it is given"),
    (["ray.learner.num_gpus=1"], "model.device 'cpu' leaves the GPUs of ray.learner.num_gpus idle"),
]


@pytest.mark.parametrize("sets,message", DEVICE_CASES, ids=["no-gpus", "no-learner-gpu", "index", "idle-gpu"])
def test_the_device_is_checked_against_the_ray_resources(tmp_path, capsys, sets, message):
    code, err = _train(capsys, CONFIG, *_sets([*TINY, *sets]), "--output-dir", str(tmp_path / "runs"))
    assert code == 2, err
    assert message in _one_line_error(err)
    assert _files(tmp_path) == []


def test_the_device_is_checked_against_this_machine_in_process(tmp_path, capsys):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = "cuda" if count == 0 else f"cuda:{count}"
    code, err = _train(capsys, CONFIG, "--in-process", *_sets([*TINY, f"model.device={device}"]),
                       "--output-dir", str(tmp_path / "runs"))
    assert code == 2, err
    assert f"model.device '{device}': this machine has {count} CUDA GPU(s)" in _one_line_error(err)
    assert _files(tmp_path) == []


# --------------------------------------------------------------------------- resume


def _runs(db: Path) -> list[str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return sorted(r.info.run_id for r in client.search_runs(exps))


def _state(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_resume_refuses_a_set_that_changes_the_run(tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = _train(capsys, CONFIG, "--in-process", *_sets([*TINY, "name=tiny"]), "--output-dir", str(out))
    assert code == 0, err
    (run_dir,) = out.glob("tiny-*")
    files, runs = _state(out), _runs(out / "mlflow.db")
    assert len(runs) == 1
    refused = [
        (["seed=5"], "seed cannot change on resume"),
        (["train.lr=0.1", "sampling.num_steps=8"], "sampling.num_steps, train.lr cannot change on resume"),
        (["name=other"], "name cannot change on resume"),
        (["ray.pipeline=one_step_off"], "ray.pipeline cannot change on resume"),
        (["reward={name: tests.plugins.my_rewards:brightness}"],
         "reward.name would differ from the run's config.yaml; it names code to import"),
    ]
    for sets, message in refused:
        code, err = _train(capsys, "--resume", str(run_dir), "--in-process", *_sets(sets))
        assert code == 2, (sets, err)
        line = _one_line_error(err)
        assert f"--resume {run_dir}: {message}" in line, line
    assert _state(out) == files and _runs(out / "mlflow.db") == runs  # nothing touched, no MLflow run
    # restating a value, extending the run and changing how it is executed are fine
    code, err = _train(capsys, "--resume", str(run_dir), "--in-process",
                       *_sets(["seed=0", "train.steps=2", "train.threads=1", "ray.num_samplers=2"]))
    assert code == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert _runs(out / "mlflow.db") == runs


def _resume(original: dict[str, typing.Any], sets: list[str]) -> None:
    check_resume(validate(original), validate(apply_overrides(original, sets)), sets, "RUN")


@pytest.mark.parametrize("sets", [
    ["train.steps=500", "train.eval_every=5", "output_dir=/elsewhere", "tracking.tracking_uri=http://m:5000"],
    ["ray.num_samplers=4", "ray.strategy=fsdp2", "reward.replicas=3", "reward.timeout_s=10"],
    ["reward.name=tests.plugins.my_rewards:brightness"],  # named: the user says so
    ["reward.runtime_env={pip: [judge==1.0]}"], ["reward.runtime_env.env_vars.TOKEN=new"],
    ["reward.kwargs.api_key=rotated"],  # a credential, not the maths
    ["seed=0", "sampling.num_steps=10"],  # the same values
])  # fmt: skip
def test_resume_accepts_what_leaves_the_run_the_same(sets):
    _resume({"reward": {"name": "shapes_geneval", "kwargs": {"api_key": "old", "max_tokens": 5}}}, sets)


@pytest.mark.parametrize("sets,key", [
    (["reward={name: tests.plugins.my_rewards:brightness}"], "reward.name would differ"),
    (["reward={runtime_env: {pip: [evil]}}"], "reward.runtime_env.pip would differ"),
    (["reward.kwargs.max_tokens=9"], "reward.kwargs.max_tokens cannot change"),  # secret-looking, but a number
    (["reward.kwargs={api_key: old, max_tokens: 5, judge: other}"], "reward.kwargs.judge cannot change"),
    (["algo={name: nft}"], "algo.name"), (["model.lora.rank=4"], "model.lora.rank cannot change"),
    (["train.eval_steps=8"], "train.eval_steps cannot change"), (["data.eval_per_kind=3"], "data.eval_per_kind"),
])  # fmt: skip
def test_resume_refuses_what_makes_another_run(sets, key):
    with pytest.raises(ConfigError, match="^--resume RUN: ") as err:
        _resume({"reward": {"name": "shapes_geneval", "kwargs": {"api_key": "old", "max_tokens": 5}}}, sets)
    assert key in str(err.value) and "\n" not in str(err.value)
