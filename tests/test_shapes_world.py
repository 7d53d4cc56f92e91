from pathlib import Path

import numpy as np
import pytest
import torch

from rewards import build_reward
from rlflow.types import Conditions, Media
from rlflow.worlds.shapes import accuracy_report, eval_set, split
from rlflow.worlds.shapes.checker import checks, detect, score_image
from rlflow.worlds.shapes.scene import KINDS, Obj, all_specs, parse_prompt, render, sample_scene


def test_rendered_scenes_pass_their_own_prompts():
    rng = np.random.default_rng(0)
    specs = all_specs()
    for i in range(600):
        spec = specs[i % 24] if i % 2 else specs[int(rng.integers(len(specs)))]
        img = render(sample_scene(spec, rng))
        assert score_image(img, spec.prompt) == (1.0, 1.0), spec.prompt


def test_detection_of_constructed_scene():
    img = render([Obj("red", "circle", 8, 8, 10), Obj("blue", "square", 24, 8, 9), Obj("yellow", "triangle", 16, 24, 11)])
    found = sorted((d.color, d.shape) for d in detect(img))
    assert found == [("blue", "square"), ("red", "circle"), ("yellow", "triangle")]


@pytest.mark.parametrize(
    "objects,prompt,partial,strict",
    [
        ([Obj("red", "circle", 10, 10, 10)], "a red circle", 1.0, 1.0),
        ([Obj("red", "circle", 10, 10, 10)], "a blue circle", 2 / 4, 0.0),  # shape ok, colour no, count 0 no, no extra ok
        ([Obj("red", "circle", 10, 10, 10)], "a square", 1 / 3, 0.0),  # only "no extra objects" holds
        ([Obj("red", "circle", 8, 8, 10), Obj("green", "circle", 24, 24, 10)], "two circles", 1.0, 1.0),
        ([Obj("red", "circle", 8, 8, 10)], "two circles", 1 / 3, 0.0),
        ([Obj("red", "circle", 8, 8, 10), Obj("blue", "square", 24, 8, 10)], "a red circle left of a blue square", 1.0, 1.0),
        ([Obj("red", "circle", 24, 8, 10), Obj("blue", "square", 8, 8, 10)], "a red circle left of a blue square", 3 / 4, 0.0),
        (
            [Obj("red", "circle", 8, 8, 10), Obj("blue", "square", 24, 8, 10), Obj("green", "square", 16, 24, 10)],
            "a red circle left of a blue square",
            3 / 4,
            0.0,
        ),
    ],
)
def test_scores_of_constructed_images(objects, prompt, partial, strict):
    p, s = score_image(render(objects), prompt)
    assert p == pytest.approx(partial) and s == strict


def test_small_specks_and_background_noise_are_ignored():
    img = render([Obj("green", "square", 16, 16, 10)])
    img[:, 1:3, 1:3] = np.array([0.9, 0.15, 0.15])[:, None, None]  # a 4-pixel red speck
    img += np.random.default_rng(0).normal(0, 0.05, img.shape).astype(np.float32)
    assert score_image(np.clip(img, 0, 1), "a green square") == (1.0, 1.0)


def test_prompt_sets_are_fixed_disjoint_and_cover_every_kind():
    train, held = split()
    assert not {s.prompt for s in train} & {s.prompt for s in held}
    assert {s.kind for s in held} == set(KINDS) == {s.kind for s in train}
    prompts, seeds = eval_set(8)
    assert len(prompts) == 32 and len(set(seeds)) == 32
    assert eval_set(8) == (prompts, seeds)
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        parse_prompt("a purple hexagon")


def test_accuracy_report_and_reward_plugin():
    specs = [parse_prompt("a red circle"), parse_prompt("two squares")]
    rng = np.random.default_rng(1)
    images = np.stack([render(sample_scene(s, rng)) for s in specs] + [np.zeros((3, 32, 32), np.float32)])
    prompts = [s.prompt for s in specs] + ["a circle"]
    rep = accuracy_report(images, prompts)
    assert rep["accuracy"] == pytest.approx(2 / 3) and rep["accuracy_color"] == 1.0 and rep["accuracy_single"] == 0.0
    assert (rep["accuracy_lo"], rep["accuracy_hi"]) == pytest.approx((0.207655, 0.938517), abs=1e-5)  # Wilson 2/3
    assert (rep["accuracy_single_lo"], rep["accuracy_single_hi"]) == pytest.approx((0.0, 0.793454), abs=1e-5)  # 0/1
    out = build_reward("shapes_geneval")(Media(images=torch.from_numpy(images)), Conditions.of(prompts))
    assert out.score.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert out.components["strict"].tolist() == [1.0, 1.0, 0.0]
    assert checks(specs[0], []) == [False, False, False, False]


@pytest.mark.parametrize("size, message", [
    (64, r"64x64 \(sampling.height x sampling.width\).*at most 32 pixels a side"),
    (30, r"30x30 \(sampling.height x sampling.width\) gives 30x30 latents, not a multiple of the transformer's "
         r"patch_size 4"),
])
def test_shipped_model_rejects_image_sizes_it_cannot_embed(size, message):
    from rlflow import builders
    from rlflow.config import load_config
    from rlflow.sampler import Sampler

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "toy_shapes_dppo.yaml", [f"sampling.height={size}", f"sampling.width={size}"])
    policy = builders.build_policy(cfg.model, cfg.seed)
    with pytest.raises(ValueError, match=message):
        Sampler(policy, builders.sampler_settings(cfg.sampling))
