import numpy as np
import pytest
import torch

from rewards import NamedReward, build_reward, register, registered
from rlflow.config import ConfigError
from rlflow.types import Conditions, Media, RewardOutput
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
    with pytest.raises(ValueError, match=r"reward 'tests.plugins.my_rewards:too_short' returned a score of shape \(2,\), expected \(3,\)"):
        _score(fn, _images(3), ["a"] * 3)
    with pytest.raises(ValueError, match=r"reward 'tests.plugins.my_rewards:brightness': 2 samples but 3 conditions"):
        _score(build_reward("tests.plugins.my_rewards:brightness"), _images(2), ["a"] * 3)
    with pytest.raises(ValueError, match=r"reward 'tests.plugins.my_rewards:words' returned str, expected"):
        _score(build_reward("tests.plugins.my_rewards:words"), _images(3), ["a"] * 3)


def test_async_rewards_are_awaited():
    import asyncio

    @register("tests_async_reward")
    async def brightness_later(images, prompts):
        await asyncio.sleep(0.01)
        return images.mean(dim=(1, 2, 3)) * 3

    class AsyncJudge:
        def __init__(self, offset):
            self.offset = offset

        async def __call__(self, media, conditions):
            await asyncio.sleep(0)
            s = torch.tensor([float(len(p)) + self.offset for p in conditions.prompts])
            return RewardOutput(score=s, components={"length": s})

    imgs = _images()
    out = _score(build_reward("tests_async_reward"), imgs, ["a"] * 3)
    torch.testing.assert_close(out.score, imgs.mean(dim=(1, 2, 3)) * 3)
    judged = NamedReward("judge", AsyncJudge(0.5))(Media(images=imgs), Conditions.of(["a", "bb", "ccc"]))
    assert judged.score.tolist() == [1.5, 2.5, 3.5]

    async def inside_a_loop():  # an async caller (e.g. an async actor) already runs an event loop
        return NamedReward("judge", AsyncJudge(0.0))(Media(images=imgs), Conditions.of(["a", "bb", "ccc"]))

    assert asyncio.run(inside_a_loop()).score.tolist() == [1.0, 2.0, 3.0]


def test_wrong_signature_dtype_or_component_shape_is_an_error_naming_the_reward():
    def three_args(images, prompts, extra):
        return [0.0] * len(prompts)

    with pytest.raises(ConfigError, match=r"reward 'bad': a reward takes two arguments.*three_args\(images, prompts, extra\)"):
        NamedReward("bad", three_args)
    with pytest.raises(ConfigError, match=r"reward 'bad': a reward takes two arguments"):
        NamedReward("bad", lambda images: images)
    NamedReward("fine", lambda images, prompts, scale=1.0: [scale] * len(prompts))  # extra defaults are fine
    ints = NamedReward("ints", lambda i, p: RewardOutput(score=torch.ones(len(p), dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"reward 'ints' returned a score of torch.int64, expected a float tensor"):
        ints(Media(images=_images()), Conditions.of(["a"] * 3))
    short = NamedReward("short", lambda i, p: RewardOutput(score=torch.ones(3), components={"c": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"reward 'short' returned a component 'c' of shape \(2,\), expected \(3,\)"):
        short(Media(images=_images()), Conditions.of(["a"] * 3))
    # plain lists of numbers (ints, bools) are scores: coerced to fp32
    out = NamedReward("flags", lambda i, p: [True, False, 1])(Media(images=_images()), Conditions.of(["a"] * 3))
    assert out.score.dtype == torch.float32 and out.score.tolist() == [1.0, 0.0, 1.0]


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


def test_a_differentiable_reward_gives_the_pixel_gradient():
    class Brightness:
        differentiable = True

        def __call__(self, images, prompts):
            return RewardOutput(score=images.mean(dim=(1, 2, 3)) * 2, components={"b": images.mean(dim=(1, 2, 3))})

    class Served:
        """Returns its gradient itself (as a reward computed elsewhere would)."""

        differentiable = True

        def __call__(self, media, conditions):
            return media.images.sum(dim=(1, 2, 3))

        def gradient(self, media, conditions):
            return media.images.sum(dim=(1, 2, 3)), torch.ones_like(media.images) * 3

    imgs = _images(2)
    out, grad = NamedReward("bright", Brightness()).score_and_grad(Media(images=imgs), Conditions.of(["a", "b"]))
    torch.testing.assert_close(out.score, imgs.mean(dim=(1, 2, 3)) * 2)
    assert not out.score.requires_grad and grad.shape == imgs.shape
    torch.testing.assert_close(grad, torch.full_like(imgs, 2 / (3 * 8 * 8)))  # d(2 mean)/dx = 2/(C H W)
    video = torch.rand(2, 3, 3, 4, 4)
    _, vgrad = NamedReward("bright", Brightness()).score_and_grad(Media(video=video), Conditions.of(["a", "b"]))
    middle = torch.zeros_like(video)
    middle[:, 1] = 2 / (3 * 4 * 4)  # a plain reward sees the middle frame only
    torch.testing.assert_close(vgrad, middle)
    sout, sgrad = NamedReward("served", Served()).score_and_grad(Media(images=imgs), Conditions.of(["a", "b"]))
    torch.testing.assert_close(sout.score, imgs.sum(dim=(1, 2, 3)))
    assert sgrad.eq(3).all()

    with pytest.raises(TypeError, match="reward 'plain' is not differentiable"):
        NamedReward("plain", lambda i, p: i.mean(dim=(1, 2, 3))).score_and_grad(Media(images=imgs), Conditions.of(["a"] * 2))

    class Numpy:
        differentiable = True

        def __call__(self, images, prompts):
            return images.detach().numpy().mean(axis=(1, 2, 3))  # computed outside torch

    with pytest.raises(ValueError, match="reward 'np' declares itself differentiable, but its score has no gradient"):
        NamedReward("np", Numpy()).score_and_grad(Media(images=imgs), Conditions.of(["a"] * 2))


def test_a_reward_server_returns_the_gradient_in_batches():
    """The server-side path (what a reward actor runs): batches of max_batch_size, the same gradient."""
    from workers.messages import from_wire, to_wire
    from workers.reward_server import RewardServer, RewardServerError

    server = RewardServer("tests.plugins.my_rewards:soft_brightness", {}, max_batch_size=2)
    imgs = _images(5)
    out, grad = server.score_and_grad(to_wire(Media(images=imgs)), to_wire(Conditions.of(["a"] * 5)))
    torch.testing.assert_close(from_wire(out).score, imgs.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(grad, torch.full_like(imgs, 1 / (3 * 8 * 8)))
    plain = RewardServer("tests.plugins.my_rewards:brightness", {}, max_batch_size=2)
    with pytest.raises(RewardServerError, match=r"failed on samples 0..1: TypeError: reward .* is not differentiable"):
        plain.score_and_grad(to_wire(Media(images=imgs)), to_wire(Conditions.of(["a"] * 5)))
