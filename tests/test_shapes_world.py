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
        spec = specs[i % 24 * 16] if i % 2 else specs[int(rng.integers(len(specs)))]
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
        # shape ok, colour no, count of blue circles no, one object ok, clean ok
        ([Obj("red", "circle", 10, 10, 10)], "a blue circle", 3 / 5, 0.0),
        ([Obj("red", "circle", 10, 10, 10)], "a square", 2 / 4, 0.0),  # one object and clean hold
        ([Obj("red", "square", 10, 10, 10)], "a photo of a square", 1.0, 1.0),
        # oversized: not a circle of the world, and not "one object" either (only clean holds)
        ([Obj("red", "circle", 12, 12, 18)], "a circle", 1 / 4, 0.0),
        ([Obj("red", "square", 12, 12, 13)], "a circle", 2 / 4, 0.0),  # a large square is not a circle (one valid object)
        ([Obj("red", "circle", 12, 12, 10), Obj("red", "circle", 18, 12, 10)], "two circles", 1 / 4, 0.0),  # merged: one blob
        ([Obj("red", "circle", 8, 8, 10), Obj("green", "circle", 24, 24, 10)], "two circles", 1.0, 1.0),
        ([Obj("red", "circle", 8, 8, 10)], "two circles", 2 / 4, 0.0),
        ([Obj("red", "circle", 8, 8, 10), Obj("blue", "square", 24, 24, 4)], "a circle", 3 / 4, 0.0),  # extra small
        ([Obj("red", "circle", 8, 8, 10), Obj("blue", "square", 24, 8, 10)], "a red circle left of a blue square", 1.0, 1.0),
        ([Obj("red", "circle", 24, 8, 10), Obj("blue", "square", 8, 8, 10)], "a red circle left of a blue square", 4 / 5, 0.0),
        (
            [Obj("red", "circle", 8, 8, 10), Obj("blue", "square", 24, 8, 10), Obj("green", "square", 16, 24, 10)],
            "a red circle left of a blue square",
            4 / 5,
            0.0,
        ),
    ],
)
def test_scores_of_constructed_images(objects, prompt, partial, strict):
    p, s = score_image(render(objects), prompt)
    assert p == pytest.approx(partial) and s == strict


def test_faint_noise_and_a_speck_are_tolerated_but_stray_pixels_and_small_objects_are_not():
    img = render([Obj("green", "square", 16, 16, 10)])
    img[:, 1, 1:3] = np.array([0.9, 0.15, 0.15])[:, None]  # a 2-pixel red speck
    img += np.random.default_rng(0).normal(0, 0.05, img.shape).astype(np.float32)
    assert score_image(np.clip(img, 0, 1), "a green square") == (1.0, 1.0)
    specks = img.copy()
    for y, x in [(1, 28), (28, 1), (28, 28), (1, 14)]:  # four more 2-pixel specks: 10 stray pixels
        specks[:, y, x : x + 2] = np.array([0.9, 0.15, 0.15])[:, None]
    assert score_image(np.clip(specks, 0, 1), "a green square") == (4 / 5, 0.0)
    small = img.copy()
    small[:, 1:4, 1:4] = np.array([0.9, 0.15, 0.15])[:, None, None]  # a 3x3 red object: counted, not valid
    assert score_image(np.clip(small, 0, 1), "a green square") == (4 / 5, 0.0)


def test_constructed_images_clean_pass_and_every_defect_fails():
    """The README's checker figures, on fewer images: clean renders pass, each kind of wrong image fails."""
    from rlflow.worlds.shapes.validate import DEFECTS, validate

    rates = validate(n=200, seed=1)
    assert rates["clean"]["pass_rate"] >= 0.99 and rates["clean_blurred"]["pass_rate"] >= 0.99
    for defect in DEFECTS:
        assert rates[defect]["fail_rate"] >= 0.99, (defect, rates[defect])


def test_mislabel_changes_exactly_one_asked_for_attribute_and_fails_the_prompt():
    from dataclasses import asdict

    from rlflow.worlds.shapes.scene import all_contents, mislabel

    rng = np.random.default_rng(0)
    for spec in all_contents()[:: 7]:
        wrong = mislabel(spec, rng)
        changed = [k for k, v in asdict(spec).items() if asdict(wrong)[k] != v]
        assert len(changed) == 1, (spec, wrong)
        assert wrong.color is None or wrong.color != wrong.color2
        assert score_image(render(sample_scene(wrong, rng)), spec.prompt)[1] == 0.0, (spec.prompt, wrong)


def test_prompt_sets_are_fixed_disjoint_and_the_eval_is_balanced():
    from collections import Counter

    train, held = split()
    assert not {s.prompt for s in train} & {s.prompt for s in held}
    assert {s.kind for s in held} == set(KINDS) == {s.kind for s in train}
    # position prompts hold out whole contents: the eval asks for object pairs RL never trained on
    assert not {s.content for s in train if s.kind == "position"} & {s.content for s in held if s.kind == "position"}
    prompts, seeds = eval_set()
    counts = Counter(prompts)
    assert len(prompts) == 512 and len(set(seeds)) == 512
    assert len(counts) >= 128 and max(counts.values()) <= 4
    assert Counter(parse_prompt(p).kind for p in prompts) == {k: 128 for k in KINDS}
    assert eval_set() == (prompts, seeds)
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
    assert out.score.tolist() == pytest.approx([1.0, 1.0, 0.25])  # a blank image: only "clean" holds
    assert out.components["strict"].tolist() == [1.0, 1.0, 0.0]
    assert out.components["objects"].tolist() == [1.0, 2.0, 0.0] and out.components["valid_objects"].tolist() == [1.0] * 3
    halves = build_reward("shapes_geneval", {"strict_weight": 0.5})(Media(images=torch.from_numpy(images)), Conditions.of(prompts))
    assert halves.score.tolist() == pytest.approx([1.0, 1.0, 0.125])
    blob = render([Obj("red", "circle", 12, 12, 18)])[None]  # oversized: detected, not valid
    assert build_reward("shapes_geneval")(Media(images=torch.from_numpy(blob)), Conditions.of(["a circle"])).components["valid_objects"].tolist() == [0.0]
    with pytest.raises(ValueError, match="strict_weight"):
        build_reward("shapes_geneval", {"strict_weight": 2.0})
    assert checks(specs[0], []) == [False, False, False, False, True]
    assert rep["accuracy_circle"] == 0.5 and rep["accuracy_square"] == 1.0
    assert rep["drift_objects"] == pytest.approx(1.0) and rep["drift_stray_pixels"] == 0.0  # 1 + 2 + 0 objects
    assert rep["drift_saturation"] > 0.7
    # colour diversity where the prompt leaves colour free: the "two squares" scene (the red circle names one)
    square_colors = [d.color for d in detect(images[1])]
    assert rep["drift_top_color_share"] == max(square_colors.count(c) for c in square_colors) / 2
    yellow = np.stack([render([Obj("yellow", "circle", 8, 8, 10)]), render([Obj("yellow", "square", 8, 8, 10)]),
                       render([Obj("red", "circle", 8, 8, 10)])])
    assert accuracy_report(yellow, ["a circle", "a square", "a red circle"])["drift_top_color_share"] == 1.0


def test_position_binding_diagnostics():
    prompt = "a red circle left of a blue square"
    images = np.stack([
        render([Obj("red", "circle", 8, 16, 10), Obj("blue", "square", 24, 16, 10)]),  # all right
        render([Obj("red", "square", 24, 16, 10), Obj("blue", "circle", 8, 16, 10)]),  # relation and shapes wrong
        render([Obj("red", "circle", 8, 16, 10), Obj("blue", "circle", 24, 16, 10)]),  # relation right, one shape wrong
        render([Obj("red", "circle", 8, 16, 10)]),  # blue missing: counts only against colours
    ])
    rep = accuracy_report(images, [prompt] * 4)
    assert rep["accuracy_position"] == 0.25
    assert rep["binding_colors"] == 0.75 and rep["binding_relation"] == pytest.approx(2 / 3)
    assert rep["binding_shapes"] == pytest.approx(1 / 3)
    assert "binding_colors" not in accuracy_report(images[:1], ["a circle"])


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


def test_every_prompt_tokenizes_within_the_encoder_without_unknown_words():
    from rlflow.worlds.shapes.model import MAX_TOKENS, build_tokenizer

    tok = build_tokenizer()
    ids = [tok(s.prompt).input_ids for s in all_specs()]
    assert len(ids) == (3 + 12 + 9 + 432) * 16  # every content in every phrasing
    assert max(map(len, ids)) <= MAX_TOKENS
    assert tok.unk_token_id not in {i for row in ids for i in row}
