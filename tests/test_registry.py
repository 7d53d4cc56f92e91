"""Registries for what users plug in: the config schema is built from them, duplicates raise, and an unknown
name is a config error that lists the registered ones."""

from pathlib import Path

import pytest

from rlflow.algos import ALGORITHMS, build_algorithm, register_algorithm
from rlflow.algos.grpo import GRPOConfig
from rlflow.config import ConfigError, load_config, validate
from rlflow.models import MODEL_FAMILIES
from rlflow.registry import Registry

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_algorithm_registry_builds_the_schema_and_the_objects():
    assert ALGORITHMS.names() == ["dppo", "grpo", "nft"]
    for name in ALGORITHMS:
        cfg = validate({"algo": {"name": name}})
        algo = build_algorithm(cfg.algo)
        assert algo.name == name and type(cfg.algo) is ALGORITHMS.get(name).config
    assert build_algorithm(validate({"algo": {"name": "nft"}}).algo).policies.sample_with == "old"
    assert build_algorithm(validate({"algo": {"name": "dppo"}}).algo).policies.anchors
    assert build_algorithm(validate({"algo": {"name": "grpo", "beta": 0.1}}).algo).policies.reference


def test_unknown_and_duplicate_names():
    with pytest.raises(ConfigError, match=r"algo: Input tag 'rsm' .* expected tags: 'dppo', 'grpo', 'nft'"):
        validate({"algo": {"name": "rsm"}})
    with pytest.raises(ConfigError, match=r"algo.kl_threshold: unknown key \(allowed here: adv_clip, beta"):
        validate({"algo": {"name": "nft", "kl_threshold": 1e-5}})
    with pytest.raises(ConfigError, match="algo.name 'rsm': unknown algorithm; registered: dppo, grpo, nft"):
        ALGORITHMS.get("rsm")
    with pytest.raises(ValueError, match="algorithm 'grpo' is already registered"):
        register_algorithm("grpo", GRPOConfig, lambda c: c)
    with pytest.raises(ValueError, match="model family 'sd3' is already registered"):
        MODEL_FAMILIES.add("sd3", "somewhere:Else")
    reg: Registry[int] = Registry("widget", "x.widget")
    reg.add("a", 1)
    reg.add("a", 1)  # the same entry again is fine (a module imported twice)
    assert reg.get("a") == 1 and "a" in reg and reg.names() == ["a"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_builds_its_algorithm(path):
    cfg = load_config(path)
    assert build_algorithm(cfg.algo).name == cfg.algo.name == path.stem.rsplit("_", 1)[1]
