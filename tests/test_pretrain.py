"""``rlflow pretrain shapes``: deterministic from-scratch training, continued training and guidance distillation."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from rlflow.models.sd3 import SD3Policy
from rlflow.worlds.shapes.model import BASE_DIR
from rlflow.worlds.shapes.pretrain import PretrainSettings, _guided_target, _velocity, pretrain
from rlflow.worlds.shapes.prompts import sample_specs

TINY = {"steps": 3, "batch_size": 8, "eval_every": 100, "eval_per_kind": 1, "warmup": 1}


def _weights(folder):
    return SD3Policy.from_pretrained(str(folder)).transformer.state_dict()


def test_pretraining_is_deterministic_and_saves_a_loadable_model(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    result = pretrain(a, PretrainSettings(**TINY), log=lambda m: None)
    pretrain(b, PretrainSettings(**TINY), log=lambda m: None)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    saved = json.loads((a / "pretrain.json").read_text())
    assert saved["settings"]["steps"] == 3 and saved["result"]["steps"] == 3.0
    assert 0.0 <= result["accuracy"] <= 1.0 and "accuracy_position" in result


def test_guided_target_is_the_teachers_cfg_velocity_and_dropped_prompts_stay_unconditional():
    policy = SD3Policy.from_pretrained(str(BASE_DIR))
    teacher = (policy.transformer.eval(), policy.text_encoder.eval())
    gen = torch.Generator().manual_seed(0)
    xt, t = torch.randn(3, 3, 32, 32, generator=gen), torch.tensor([0.9, 0.5, 0.2])
    prompts = ["a red circle", "", "two squares"]

    with torch.no_grad():  # the model's own velocities, conditional and unconditional
        v_c = _velocity(*teacher, policy.tokenizer, xt, t, prompts)
        v_u = _velocity(*teacher, policy.tokenizer, xt, t, [""] * 3)
    got = _guided_target(teacher, policy.tokenizer, xt, t, prompts, guidance=3.0)
    want = v_u + 3.0 * (v_c - v_u)
    assert torch.allclose(got[[0, 2]], want[[0, 2]], atol=1e-5)
    assert torch.allclose(got[1], v_u[1], atol=1e-5)  # a dropped prompt: the unconditional velocity, unguided
    assert (got[0] - v_c[0]).abs().max() > 1e-3  # guidance changes the target


def test_distillation_needs_a_teacher_and_continues_from_it(tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        pretrain(tmp_path / "x", PretrainSettings(distill_guidance=3.0, **TINY), log=lambda m: None)
    out = tmp_path / "distilled"
    pretrain(out, PretrainSettings(init_from=str(BASE_DIR), distill_guidance=3.0, lr=1e-4, **TINY), log=lambda m: None)
    start, end = _weights(BASE_DIR), _weights(out)
    moved = max(float((start[k] - end[k]).abs().max()) for k in start)
    assert 0 < moved < 0.05  # a few small steps away from the teacher, not a fresh model


def test_kind_weights_set_how_often_each_prompt_kind_is_drawn():
    kinds = Counter(s.kind for s in sample_specs(np.random.default_rng(0), 4000, kind_weights=(1, 1, 0, 2)))
    assert kinds["count"] == 0
    assert kinds["position"] / 4000 == pytest.approx(0.5, abs=0.03) and kinds["single"] / 4000 == pytest.approx(0.25, abs=0.03)
    for bad in ((1, 1, 1), (1, -1, 1, 1), (0, 0, 0, 0)):
        with pytest.raises(ValueError, match="kind_weights"):
            sample_specs(np.random.default_rng(0), 4, kind_weights=bad)


def test_model_depths_are_settings_of_a_from_scratch_model(tmp_path):
    from rlflow.cli import main

    out = tmp_path / "deep"
    assert main(["pretrain", "shapes", "--out", str(out), "--steps", "2", "--eval-every", "100", "--layers", "3",
                 "--text-layers", "3", "--threads", "1"]) == 0
    policy = SD3Policy.from_pretrained(str(out))
    assert len(policy.transformer.transformer_blocks) == 3
    assert len(policy.text_encoder.text_model.encoder.layers) == 3
    assert json.loads((out / "pretrain.json").read_text())["settings"]["text_layers"] == 3


def test_relation_curriculum_draws_one_colour_order_first():
    from rlflow.worlds.shapes.pretrain import make_batch, palette_ordered
    from rlflow.worlds.shapes.scene import parse_prompt

    rng = np.random.default_rng(0)
    _, prompts = make_batch(rng, 400, 0.0, kind_weights=(0, 0, 0, 1), palette_order_only=True)
    specs = [parse_prompt(p) for p in prompts]
    assert {s.kind for s in specs} == {"position"} and all(palette_ordered(s) for s in specs)
    _, mixed = make_batch(rng, 400, 0.0, kind_weights=(0, 0, 0, 1))
    reversed_share = np.mean([not palette_ordered(parse_prompt(p)) for p in mixed])
    assert reversed_share == pytest.approx(0.5, abs=0.07)
    assert palette_ordered(parse_prompt("a blue circle")) and not palette_ordered(parse_prompt("a blue circle above a red square"))


def test_order_curriculum_reaches_the_loop_from_the_cli(tmp_path, monkeypatch):
    """``--order-curriculum 2`` of a 3-step run: steps 1-2 draw palette-ordered batches, step 3 both orders."""
    from rlflow.cli import main
    from rlflow.worlds.shapes import pretrain as pretrain_module

    flags = []
    real = pretrain_module.make_batch

    def spy(*args, palette_order_only=False, **kwargs):
        flags.append(palette_order_only)
        return real(*args, palette_order_only=palette_order_only, **kwargs)

    monkeypatch.setattr(pretrain_module, "make_batch", spy)
    out = tmp_path / "curriculum"
    assert main(["pretrain", "shapes", "--out", str(out), "--steps", "3", "--eval-every", "100", "--order-curriculum", "2",
                 "--kind-weights", "0,0,0,1", "--threads", "1"]) == 0
    assert flags == [True, True, False]
    assert json.loads((out / "pretrain.json").read_text())["settings"]["order_curriculum"] == 2
