import numpy as np
import pytest
import torch

from rewards import build_reward, register, registered
from rlflow.config import ConfigError
from rlflow.types import Conditions, Media
from rlflow.worlds.shapes.scene import Obj, render


def _images(n=3):
    return torch.rand(n, 3, 8, 8)


def _score(fn, images, prompts):
    return fn(Media(images=images), Conditions.of(prompts))


def test_dotted_path_function_with_kwargs_and_class():
    imgs = _images()
    out = _score(build_reward("tests.plugins.my_rewards:brightness", {"scale": 2.0}), imgs, ["a"] * 3)
    torch.testing.assert_close(out.score, imgs.mean(dim=(1, 2, 3)) * 2)
    assert set(out.components) == {"tests.plugins.my_rewards:brightness"}
    const = _score(build_reward("tests.plugins.my_rewards:Constant", {"value": 0.5}), imgs, ["a"] * 3)
    assert const.score.tolist() == [0.5, 0.5, 0.5]


def test_non_finite_reward_is_an_error_naming_the_reward():
    with pytest.raises(ValueError, match=r"reward 'tests.plugins.my_rewards:broken' returned 1 non-finite .*\(samples \[0\]\)"):
        _score(build_reward("tests.plugins.my_rewards:broken"), _images(), ["a"] * 3)


def test_unknown_and_bad_names():
    with pytest.raises(ConfigError, match="not registered; known: .*shapes_geneval"):
        build_reward("nope")
    with pytest.raises(ConfigError, match="cannot import"):
        build_reward("no_such_module:f")


def test_register_rejects_duplicates():
    @register("tests_unique_reward")
    def f(images, prompts):
        return [0.0] * len(prompts)

    assert "tests_unique_reward" in registered()
    with pytest.raises(ValueError, match="already registered"):
        register("tests_unique_reward")(lambda i, p: [1.0] * len(p))


def test_wrong_shape_is_an_error():
    fn = build_reward("tests.plugins.my_rewards:too_short")
    with pytest.raises(ValueError, match=r"reward 'tests.plugins.my_rewards:too_short' returned shape \(2,\), expected \(3,\)"):
        _score(fn, _images(3), ["a"] * 3)
    with pytest.raises(ValueError, match=r"reward 'tests.plugins.my_rewards:brightness': 2 samples but 3 conditions"):
        _score(build_reward("tests.plugins.my_rewards:brightness"), _images(2), ["a"] * 3)
    with pytest.raises(ValueError, match=r"reward 'tests.plugins.my_rewards:words' returned str, expected"):
        _score(build_reward("tests.plugins.my_rewards:words"), _images(3), ["a"] * 3)


def test_media_form_reward_sees_video_and_conditions():
    """A reward whose first parameter is ``media`` gets Media and Conditions; a plain one gets the stills."""
    video = torch.zeros(2, 4, 3, 8, 8)
    video[0, ::2] = 1.0  # sample 0 flickers every frame, sample 1 is still
    conds = Conditions(("a", "b"), source_images=torch.full((2, 1, 3, 8, 8), 0.25),
                       metadata=({"bonus": 0.0}, {"bonus": 2.0}))
    out = build_reward("tests.plugins.my_rewards:frames_and_sources")(Media(video=video, fps=8), conds)
    torch.testing.assert_close(out.score, torch.tensor([1.0 + 0.25, 0.0 + 0.25 + 2.0]))
    plain = build_reward("tests.plugins.my_rewards:brightness")(Media(video=video), conds)
    torch.testing.assert_close(plain.score, video[:, 2].mean(dim=(1, 2, 3)))  # the middle frame


def test_color_coverage_reward_hand_values():
    img = render([Obj("red", "square", 8, 8, 10)])  # 10x10 red pixels (+ rasterisation edge) of 1024
    out = _score(build_reward("shapes_color_coverage"), torch.from_numpy(np.stack([img, img])), ["a red square", "a blue square"])
    red_pixels = int((img[0] > 0.5).sum())
    assert out.score[0].item() == pytest.approx(red_pixels / 1024)
    assert out.score[1].item() == 0.0


def test_slow_judge_delays_the_inner_reward():
    import time

    imgs = _images()
    fast = _score(build_reward("tests.plugins.my_rewards:brightness"), imgs, ["a"] * 3)
    slow = build_reward("slow_judge", {"seconds_per_batch": 0.2, "inner": "tests.plugins.my_rewards:brightness"})
    t0 = time.perf_counter()
    out = _score(slow, imgs, ["a"] * 3)
    assert time.perf_counter() - t0 >= 0.2
    assert torch.equal(out.score, fast.score)
    with pytest.raises(ValueError, match="seconds_per_batch must be >= 0"):
        build_reward("slow_judge", {"seconds_per_batch": -1})
