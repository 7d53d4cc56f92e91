"""The differentiable shapes surrogate (``shapes_soft``): high on clean renders, low on wrong images, ranked
like the exact checker, with a finite pixel gradient whose ascent helps the checker and cannot fake it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rewards import NamedReward
from rewards.shapes_soft import ShapesSoft
from rlflow.types import Conditions, Media
from rlflow.worlds.shapes import checker, scene

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reward() -> ShapesSoft:
    return ShapesSoft()


def _kind_specs(kind: str) -> list[scene.Spec]:
    return [s for s in scene.all_contents() if s.kind == kind]


def _clean(rng: np.random.Generator, n_per_kind: int) -> list[tuple[np.ndarray, scene.Spec]]:
    out = []
    for kind in scene.KINDS:
        specs = _kind_specs(kind)
        for _ in range(n_per_kind):
            spec = specs[int(rng.integers(len(specs)))]
            out.append((scene.render(scene.sample_scene(spec, rng)), spec))
    return out


def _score(reward: ShapesSoft, imgs: list[np.ndarray], prompts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return reward(torch.from_numpy(np.stack(imgs)), prompts).score.numpy()


def _recolour(img: np.ndarray, old: str, new: str) -> np.ndarray:
    out = img.copy()
    hit = np.all(np.abs(img - np.asarray(scene.COLORS[old], dtype=np.float32)[:, None, None]) < 1e-4, axis=0)
    out[:, hit] = np.asarray(scene.COLORS[new], dtype=np.float32)[:, None]
    return out


def test_high_on_clean_renders_and_lower_on_wrong_images(reward):
    rng = np.random.default_rng(0)
    clean = _clean(rng, 6)
    good = _score(reward, [i for i, _ in clean], [s.prompt for _, s in clean])
    assert good.min() > 0.6 and np.median(good) > 0.85, good
    for kind in scene.KINDS:
        k = [g for g, (_, s) in zip(good, clean, strict=True) if s.kind == kind]
        assert np.mean(k) > 0.8, (kind, k)
    # the same images under a prompt they fail (one attribute changed: shape, colour, count or relation)
    wrong = [scene.mislabel(s, rng) for _, s in clean]
    bad = _score(reward, [i for i, _ in clean], [w.prompt for w in wrong])
    assert np.mean(bad) < 0.35 and np.mean(good - bad) > 0.55, bad
    # constructed wrong images: a blank canvas, the colour changed, the relation reversed
    spec = scene.Spec("position", "circle", "red", relation="left of", shape2="square", color2="blue")
    img = scene.render(scene.sample_scene(spec, rng))
    blank = np.zeros_like(img)
    cases = {
        "blank": (blank, spec.prompt),
        "wrong colour": (_recolour(img, "red", "green"), spec.prompt),
        "reversed": (img, replace(spec, relation="right of").prompt),
        "wrong shape": (img, replace(spec, shape="triangle").prompt),
    }
    right = _score(reward, [img], [spec.prompt])[0]
    scores = {k: _score(reward, [i], [p])[0] for k, (i, p) in cases.items()}
    assert right > 0.8 and all(v < right - 0.4 for v in scores.values()), (right, scores)


def _constructed(rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    """Clean renders under their own prompt, under a mislabelled one, and perturbed renders (a recoloured
    object, an object removed, one added, blurred, noisy)."""
    imgs, prompts = [], []
    for img, spec in _clean(rng, 10):
        imgs.append(img)
        prompts.append(spec.prompt)
        imgs.append(img)
        prompts.append(scene.mislabel(spec, rng).prompt)
        objs = scene.sample_scene(spec, rng)
        pick = int(rng.integers(4))
        if pick == 0:  # drop an object
            pert = scene.render(objs[1:])
        elif pick == 1:  # an extra object (a random one of the world's sizes, anywhere free-ish)
            extra = scene.Obj(scene.choose_other(rng, list(scene.COLORS)), scene.SHAPES[int(rng.integers(3))],
                              float(rng.uniform(6, 26)), float(rng.uniform(6, 26)), int(rng.integers(10, 13)))
            pert = scene.render([*objs, extra])
        elif pick == 2:  # recolour the first object
            o = objs[0]
            pert = scene.render([replace(o, color=scene.choose_other(rng, list(scene.COLORS), o.color)), *objs[1:]])
        else:  # noise over the whole canvas
            pert = np.clip(scene.render(objs) + rng.normal(0, 0.25, size=img.shape).astype(np.float32), 0, 1)
        imgs.append(pert)
        prompts.append(spec.prompt)
    return imgs, prompts


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    greater = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return float(greater)


def test_ranking_agrees_with_the_exact_checker(reward):
    imgs, prompts = _constructed(np.random.default_rng(1))
    _, strict = checker.score_batch(np.stack(imgs), prompts)
    soft = _score(reward, imgs, prompts)
    assert 0.25 < strict.mean() < 0.75, strict.mean()
    auc = _auc(soft, strict)
    print(f"shapes_soft vs strict checker: AUC {auc:.3f} over {len(imgs)} images ({int(strict.sum())} pass)")
    assert auc >= 0.9


def test_the_gradient_exists_and_is_finite():
    rng = np.random.default_rng(2)
    clean = _clean(rng, 1)
    imgs = torch.from_numpy(np.stack([i for i, _ in clean]))
    named = NamedReward("shapes_soft", ShapesSoft())
    assert named.differentiable
    out, grad = named.score_and_grad(Media(images=imgs), Conditions.of([s.prompt for _, s in clean]))
    assert grad.shape == imgs.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert out.score.shape == (len(clean),) and ((out.score >= 0) & (out.score <= 1)).all()
    assert set(out.components) >= {"shape_term", "second_term", "count_term", "relation_term", "color_term", "soft_count"}


def _ascend(reward: ShapesSoft, img: np.ndarray, prompt: str, steps: int = 40, lr: float = 0.05) -> np.ndarray:
    """Normalised gradient ascent on the pixels, clamped to [0, 1]."""
    x = torch.from_numpy(img.copy())[None]
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(reward(x, [prompt]).score.sum(), x)
        x = (x + lr * g / (g.abs().amax() + 1e-12)).clamp(0, 1)
    return x.detach()[0].numpy()


def test_ascent_raises_the_surrogate_and_the_checker_on_a_near_miss(reward):
    rng = np.random.default_rng(3)
    spec = scene.Spec("color", "square", "red")
    img = scene.render(scene.sample_scene(spec, rng))
    near = _recolour(img, "red", "blue")  # right shape, wrong colour
    before = _score(reward, [near], [spec.prompt])[0]
    after_img = _ascend(reward, near, spec.prompt)
    after = _score(reward, [after_img], [spec.prompt])[0]
    p0, _ = checker.score_image(near, spec.prompt)
    p1, s1 = checker.score_image(after_img, spec.prompt)
    print(f"near miss: surrogate {before:.3f} -> {after:.3f}, checker partial {p0:.2f} -> {p1:.2f}, strict {s1}")
    assert after > before + 0.3
    assert p1 > p0

    pos = scene.Spec("position", "circle", "yellow", relation="above", shape2="triangle", color2="green")
    pimg = scene.render(scene.sample_scene(pos, rng))
    pnear = _recolour(pimg, "green", "blue")  # one of two colours wrong
    q0, _ = checker.score_image(pnear, pos.prompt)
    pafter = _ascend(reward, pnear, pos.prompt)
    q1, _ = checker.score_image(pafter, pos.prompt)
    print(f"position near miss: checker partial {q0:.2f} -> {q1:.2f}")
    assert q1 > q0


def test_ascent_from_blank_does_not_fake_the_exact_checker(reward):
    """Painting onto a black canvas raises the surrogate, but not to a strict pass of the exact checker."""
    prompts = [scene.Spec("single", "square").prompt, scene.Spec("color", "circle", "green").prompt,
               scene.Spec("position", "square", "red", relation="left of", shape2="triangle", color2="blue").prompt]
    blank = np.zeros((3, scene.IMAGE_SIZE, scene.IMAGE_SIZE), dtype=np.float32)
    for prompt in prompts:
        before = _score(reward, [blank], [prompt])[0]
        painted = _ascend(reward, blank, prompt)
        after = _score(reward, [painted], [prompt])[0]
        partial, strict = checker.score_image(painted, prompt)
        print(f"blank ascent {prompt!r}: surrogate {before:.3f} -> {after:.3f}, checker partial {partial:.2f}, "
              f"strict {strict}")
        assert after >= before
        assert strict == 0.0
