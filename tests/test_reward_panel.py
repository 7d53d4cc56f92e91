"""A reward panel (``reward.panel``): several rewards, each with its weight and its own server pool, fused at
the reward or the advantage level (ALGORITHMS.md section 7), every member logged; a config without a panel is
a panel of one and behaves as before."""

import math

import numpy as np
import pytest
import ray
import torch

from rewards import PanelReward, RewardError, build_panel, build_reward
from rlflow.algos import group_advantages
from rlflow.config import ConfigError, apply_overrides, check_resume, validate
from rlflow.panel import fuse_outputs, panel_advantages
from rlflow.redact import redact
from rlflow.trainer import Trainer
from rlflow.types import Conditions, Media, RewardOutput
from rlflow.worlds.shapes.scene import parse_prompt, render, sample_scene
from tests.helpers import metric_history, tiny_config, tiny_run
from workers.driver import RayExecutor, RayTrainer
from workers.reward_server import RewardServerError

BRIGHT = "tests.plugins.my_rewards:brightness"
PANEL = {
    "panel": [
        {"name": "shapes_geneval", "label": "geneval", "timeout_s": 120},
        {"name": BRIGHT, "label": "bright", "weight": 0.5, "kwargs": {"scale": 2.0}, "timeout_s": 120,
         "num_cpus": 0.5, "runtime_env": {"env_vars": {"RLFLOW_PANEL_MEMBER": "bright"}}},
    ],
    "fusion": "advantage",
}
TINY = tiny_run(train={"steps": 2}, reward=PANEL, ray={"sampler": {"num_cpus": 0.5}, "learner": {"num_cpus": 0.5}})


def _reward(**section):
    return validate({"reward": section}, "test.yaml").reward


# ---------------------------------------------------------------------------------------------- the maths

# two groups of two; member a scores R_a, member b scores R_b, weights 1 and 0.5
GROUPS = torch.tensor([0, 0, 1, 1])
R_A = torch.tensor([1.0, 0.0, 1.0, 1.0])
R_B = torch.tensor([0.0, 2.0, 2.0, 4.0])
TWO = {"panel": [{"name": "shapes_geneval", "label": "a"}, {"name": BRIGHT, "label": "b", "weight": 0.5}]}


def _fused(fusion="reward"):
    cfg = _reward(**TWO, fusion=fusion)
    out_a = RewardOutput(R_A, {"partial": R_A / 2, "strict": R_A})
    out_b = RewardOutput(R_B, {"b": R_B})  # a plain-form reward names its one component after itself
    return cfg, fuse_outputs(cfg, [out_a, out_b])


def test_fused_score_and_components():
    _, out = _fused()
    assert out.score.tolist() == [1.0, 1.0, 2.0, 3.0]  # 1 * R_a + 0.5 * R_b
    assert sorted(out.components) == ["a", "a/partial", "a/strict", "b"]
    assert out.components["a"].tolist() == R_A.tolist() and out.components["b"].tolist() == R_B.tolist()
    assert out.components["a/partial"].tolist() == [0.5, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("global_std", [False, True])
def test_reward_level_fusion_normalises_the_weighted_sum(global_std):
    cfg, out = _fused("reward")
    adv = panel_advantages(cfg, out, GROUPS, global_std=global_std)
    # R = [1, 1, 2, 3]: group means 1 and 2.5, centred [0, 0, -0.5, 0.5]
    if global_std:  # batch std of R: mean 1.75, variance (0.5625 + 0.5625 + 0.0625 + 1.5625) / 4 = 0.6875
        s = math.sqrt(0.6875) + 1e-4
        expected = [0.0, 0.0, -0.5 / s, 0.5 / s]
    else:  # group stds 0 and 0.5
        expected = [0.0, 0.0, -0.5 / 0.5001, 0.5 / 0.5001]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("global_std", [False, True])
def test_advantage_level_fusion_weights_each_normalised_member(global_std):
    cfg, out = _fused("advantage")
    adv = panel_advantages(cfg, out, GROUPS, global_std=global_std)
    # R_a centred in its groups [0.5, -0.5, 0, 0]; R_b centred [-1, 1, -1, 1]
    if global_std:  # batch std of R_a: sqrt(0.1875); of R_b: sqrt(2)
        sa, sb = math.sqrt(0.1875) + 1e-4, math.sqrt(2.0) + 1e-4
        expected = [0.5 / sa - 0.5 / sb, -0.5 / sa + 0.5 / sb, -0.5 / sb, 0.5 / sb]
    else:  # group stds of R_a: 0.5 and 0; of R_b: 1 and 1
        expected = [0.5 / 0.5001 - 0.5 / 1.0001, -0.5 / 0.5001 + 0.5 / 1.0001, -0.5 / 1.0001, 0.5 / 1.0001]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # and not the reward-level answer
    assert not torch.allclose(adv, panel_advantages(_fused("reward")[0], out, GROUPS, global_std=global_std))


# ---------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("section,message", [
    ({"panel": [{"name": "shapes_geneval"}, {"name": "shapes_geneval"}]},
     r"reward.panel\[1\] and reward.panel\[0\] are both labelled 'shapes_geneval'"),
    ({"panel": [{"name": "shapes_geneval", "label": "x"}, {"name": BRIGHT, "label": "x"}]}, "both labelled 'x'"),
    ({"name": "shapes_geneval", "kwargs": {}, "panel": [{"name": BRIGHT}]},
     "reward.name, reward.kwargs: with reward.panel set, set these on each panel member"),
    ({"replicas": 2, "panel": [{"name": BRIGHT}]}, "reward.replicas: with reward.panel set"),
    ({"panel": [{"name": BRIGHT, "weight": -1}]}, r"reward.panel\[0\].weight: Input should be greater than or equal to 0"),
    ({"panel": [{"name": BRIGHT, "weight": 0}]}, "every weight is 0"),
    ({"panel": [{"name": BRIGHT, "wieght": 1}]}, r"reward.panel\[0\].wieght: unknown key \(allowed here: kwargs, label, "),
    ({"panel": []}, "reward.panel: List should have at least 1 item"),
    ({"panel": [{"name": BRIGHT}], "fusion": "sum"}, "reward.fusion: Input should be 'reward' or 'advantage'"),
])  # fmt: skip
def test_bad_panels_fail_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message) as err:
        _reward(**section)
    assert str(err.value).startswith("invalid config test.yaml: ")


def test_a_panel_config_reloads_from_its_dump():
    """The run folder's config.yaml (a dump) validates again: the unread top-level keys are left out."""
    from rlflow.config import to_dict

    cfg = validate({"reward": PANEL})
    dumped = to_dict(cfg)
    assert set(dumped["reward"]) == {"panel", "fusion"}
    assert validate(dumped) == cfg
    assert to_dict(validate({}))["reward"]["name"] == "shapes_geneval"  # a config without a panel: as before
    shared = redact(dumped)  # what MLflow gets: a member's env vars masked too
    assert shared["reward"]["panel"][1]["runtime_env"] == {"env_vars": {"RLFLOW_PANEL_MEMBER": "***"}}


def test_set_reaches_a_panel_member():
    raw = apply_overrides({"reward": PANEL}, ["reward.panel.1.replicas=3", "reward.panel.0.kwargs.strict_weight=0.5"])
    cfg = validate(raw)
    assert cfg.reward.panel[1].replicas == 3 and cfg.reward.panel[0].kwargs == {"strict_weight": 0.5}
    with pytest.raises(ConfigError, match="--set reward.panel.2.replicas: '2' is not an index of a list of 2 items"):
        apply_overrides({"reward": PANEL}, ["reward.panel.2.replicas=3"])


def _resume(sets):
    original = {"reward": PANEL}
    check_resume(validate(original), validate(apply_overrides(original, sets)), sets, "RUN")


@pytest.mark.parametrize("sets", [
    ["reward.panel.1.replicas=3", "reward.panel.0.timeout_s=10", "reward.panel.1.num_cpus=1"],
    ["reward.panel.1.name=tests.plugins.my_rewards:Constant"],  # named: the user says so
    ["reward.panel.1.runtime_env.env_vars.RLFLOW_PANEL_MEMBER=other"],
])  # fmt: skip
def test_resume_may_change_a_members_pool(sets):
    _resume(sets)


@pytest.mark.parametrize("sets,message", [
    (["reward.panel.1.weight=2"], "reward.panel.1.weight cannot change on resume"),
    (["reward.fusion=reward"], "reward.fusion cannot change on resume"),
    (["reward.panel.1.kwargs.scale=3"], "reward.panel.1.kwargs.scale cannot change on resume"),
    (["reward.panel=[{name: shapes_geneval}]"], "reward.panel would change from ['geneval', 'bright'] to ['shapes_geneval']"),
    (["reward.panel.1.label=light"], "reward.panel would change"),
    ([f"reward.panel=[{{name: shapes_geneval, label: geneval}}, {{name: {BRIGHT}, label: bright}}]"],
     "reward.panel.1.runtime_env, "),  # a --set of the whole panel names no member's code
])  # fmt: skip
def test_resume_refuses_a_different_panel(sets, message):
    with pytest.raises(ConfigError, match="^--resume RUN: ") as err:
        _resume(sets)
    assert message in str(err.value)


def test_resume_refuses_a_panel_in_place_of_the_reward():
    original = {"reward": {"name": "shapes_geneval"}}
    sets = ["reward={panel: [{name: shapes_geneval}]}"]
    with pytest.raises(ConfigError, match=r"reward.panel would change from None to \['shapes_geneval'\]"):
        check_resume(validate(original), validate(apply_overrides(original, sets)), sets, "RUN")


# ---------------------------------------------------------------------------------------------- in-process


def _batch():
    """Two groups of four: rendered scenes of each prompt, half of them blanked (so scores differ in a group)."""
    rng = np.random.default_rng(0)
    prompts = [p for p in ["a red circle", "two squares"] for _ in range(4)]
    images = np.stack([render(sample_scene(parse_prompt(p), rng)) for p in prompts])
    images[1::2] *= np.linspace(0.0, 0.6, 4, dtype=np.float32)[:, None, None, None]
    return Media(images=torch.from_numpy(images)), Conditions.of(prompts), torch.arange(8) // 4


def test_a_panel_of_one_is_the_single_reward():
    media, conditions, groups = _batch()
    single_cfg = _reward(name="shapes_geneval", kwargs={"strict_weight": 0.5})
    single = build_reward("shapes_geneval", {"strict_weight": 0.5})(media, conditions)
    assert len(set(single.score[:4].tolist())) > 1  # scores differ within a group
    # no panel: the reward itself, its output unchanged
    assert type(build_panel(single_cfg)) is type(build_reward("shapes_geneval"))
    plain = build_panel(single_cfg)(media, conditions)
    assert torch.equal(plain.score, single.score) and plain.components.keys() == single.components.keys()
    assert single_cfg.labels == ["shapes_geneval"]
    # an explicit panel of one, weight 1: the same score and advantages; the components under its label
    for fusion in ("reward", "advantage"):
        cfg = _reward(panel=[{"name": "shapes_geneval", "kwargs": {"strict_weight": 0.5}}], fusion=fusion)
        out = build_panel(cfg)(media, conditions)
        assert torch.equal(out.score, single.score)
        expected_components = {"shapes_geneval": single.score,
                               **{f"shapes_geneval/{k}": v for k, v in single.components.items()}}
        assert out.components.keys() == expected_components.keys()
        assert all(torch.equal(out.components[k], v) for k, v in expected_components.items())
        for global_std in (True, False):
            expected = group_advantages(single.score, groups, global_std=global_std)
            assert torch.equal(panel_advantages(cfg, out, groups, global_std=global_std), expected)
            assert torch.equal(panel_advantages(single_cfg, plain, groups, global_std=global_std), expected)


def test_in_process_panel_scores_with_every_member():
    media, conditions, _ = _batch()
    out = build_panel(_reward(**PANEL))(media, conditions)
    geneval = build_reward("shapes_geneval")(media, conditions)
    bright = media.images.mean(dim=(1, 2, 3)) * 2.0
    assert torch.equal(out.components["geneval"], geneval.score)
    assert torch.allclose(out.components["bright"], bright)
    assert torch.allclose(out.score, geneval.score + 0.5 * bright)
    assert {"geneval/partial", "geneval/strict", "geneval/valid_objects", "geneval/objects"} <= out.components.keys()


def test_a_failing_member_is_named():
    media, conditions, _ = _batch()
    panel = build_panel(_reward(panel=[{"name": "shapes_geneval"}, {"name": "tests.plugins.my_rewards:broken",
                                                                    "label": "judge"}]))
    with pytest.raises(RewardError, match=r"reward.panel\[1\] 'judge': ValueError: reward "
                                          r"'tests.plugins.my_rewards:broken' returned 1 non-finite"):
        panel(media, conditions)
    with pytest.raises(ConfigError, match=r"reward.panel\[1\].name 'nope' is not registered"):
        PanelReward(_reward(panel=[{"name": "shapes_geneval"}, {"name": "nope"}]))


def test_in_process_run_refuses_a_reward_that_is_not_its_panel(tmp_path):
    cfg = tiny_config(TINY, tmp_path)
    with pytest.raises(ConfigError, match=r"reward.panel \['geneval', 'bright'\]: the run was given a reward"):
        Trainer(cfg, build_reward("shapes_geneval"), tmp_path / "run")


# ---------------------------------------------------------------------------------------------- on Ray


def test_panel_on_ray_gives_each_member_its_actors_and_logs_every_component(tmp_path, ray_cluster):
    """Each member is served by its own actors (its own runtime_env); MLflow gets every member's metrics; the
    in-process run of the same config computes the same rewards and update, bit for bit."""
    remote = RayTrainer(tiny_config(TINY, tmp_path), tmp_path / "ray")
    ex = remote.executor
    geneval, bright = ex.rewards.pools
    assert [p.label for p in ex.rewards.pools] == ["geneval", "bright"]
    for pool in (geneval, bright):
        assert ray.get_actor(f"{ex.prefix}-reward-{pool.label}-0")._actor_id == pool.actors[0]._actor_id
    pids = {ray.get(p.actors[0].pid.remote()) for p in (geneval, bright)}
    assert len(pids) == 2
    assert ray.get(bright.actors[0].env.remote("RLFLOW_PANEL_MEMBER")) == "bright"
    assert ray.get(geneval.actors[0].env.remote("RLFLOW_PANEL_MEMBER")) is None
    remote.run()

    local = Trainer(tiny_config(TINY, tmp_path), build_panel(tiny_config(TINY, tmp_path).reward), tmp_path / "local")
    local.run()
    keys = ["reward/mean", "reward/geneval_mean", "reward/bright_mean", "reward/geneval/partial_mean",
            "reward/bright_std", "train/kl_mean"]
    for key in keys:
        got = metric_history(remote, key)
        assert len(got) == 2, key
        assert got == metric_history(local, key), key
    mean, geneval_mean, bright_mean = (metric_history(remote, k) for k in keys[:3])
    assert mean == pytest.approx([g + 0.5 * b for g, b in zip(geneval_mean, bright_mean, strict=True)], abs=1e-6)


def test_panel_resources_are_counted_together(tmp_path, ray_cluster):
    reward = {"panel": [{"name": "shapes_geneval", "num_cpus": 2}, {"name": BRIGHT, "num_cpus": 2, "replicas": 1}]}
    with pytest.raises(ConfigError, match=r"reward.panel\[0\].replicas=1 x reward.panel\[0\].num_cpus=2 \+ "
                                          r"reward.panel\[1\].replicas=1 x reward.panel\[1\].num_cpus=2 does not fit"):
        RayExecutor(tiny_config(TINY, tmp_path, reward=reward))


def test_a_failing_member_on_ray_fails_the_step_naming_it(tmp_path, ray_cluster):
    reward = {"panel": [{"name": "shapes_geneval", "timeout_s": 120},
                        {"name": "tests.plugins.faults:raises", "label": "judge", "num_cpus": 0.5}]}
    trainer = RayTrainer(tiny_config(TINY, tmp_path, reward=reward), tmp_path / "run")
    try:
        with pytest.raises(RewardServerError, match=r"reward.panel\[1\] 'judge' \(replica 0\) failed on samples "
                                                    r"0..3: RuntimeError: the judge exploded"):
            trainer.train_step()
    finally:
        trainer.executor.shutdown()
