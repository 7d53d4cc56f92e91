"""The typed messages: conditions, media, rollouts, and their wire form between actors."""

import pytest
import torch

from rlflow.types import Conditions, Media, Rollout, StepRecord
from workers.messages import Wire, from_wire, to_wire


def test_conditions_index_repeat_cat_and_checks():
    c = Conditions(("a", "b"), source_images=torch.arange(2.0).reshape(2, 1, 1, 1, 1).expand(2, 1, 3, 2, 2),
                   metadata=({"k": 1}, {"k": 2}))
    g = c.repeat(3)
    assert g.prompts == ("a",) * 3 + ("b",) * 3 and [m["k"] for m in g.metadata] == [1, 1, 1, 2, 2, 2]
    assert g.source_images[:, 0, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    joined = Conditions.cat([g.index(slice(0, 2)), g.index([5])])
    assert joined.prompts == ("a", "a", "b") and joined.source_images[:, 0, 0, 0, 0].tolist() == [0, 0, 1]
    assert Conditions.of(["x"]).metadata == ({},)
    with pytest.raises(ValueError, match="Conditions.source_images has 1 rows for 2 prompts"):
        Conditions(("a", "b"), source_images=torch.zeros(1, 1, 3, 2, 2))
    with pytest.raises(ValueError, match="only some carry"):
        Conditions.cat([c, Conditions.of(["z"])])


def test_media_images_or_video():
    video = torch.rand(2, 5, 3, 4, 4)
    m = Media(video=video, fps=8)
    assert m.is_video and m.num_samples == 2 and torch.equal(m.stills, video[:, 2])
    im = Media(images=video[:, 0])
    assert not im.is_video and im.frames.shape == (2, 1, 3, 4, 4)
    assert torch.equal(Media.cat([m.index(slice(1, 2)), m.index([0])]).video, video[[1, 0]])
    with pytest.raises(ValueError, match="exactly one of images"):
        Media()
    with pytest.raises(ValueError, match=r"Media.video must be \[B, T, 3, H, W\]"):
        Media(video=torch.rand(2, 3, 4, 4))


def _rollout(n=4, offset=0):
    steps = StepRecord(x=torch.rand(n, 2, 3), x_next=torch.rand(n, 2, 3), mean=torch.rand(n, 2, 3),
                       log_prob=torch.rand(n, 2), t=torch.tensor([1.0, 0.5]), t_next=torch.tensor([0.5, 0.2]),
                       step_index=torch.tensor([0, 1]), t_max=0.9)
    return Rollout(Conditions.of([f"p{i}" for i in range(n)]), torch.arange(n), torch.rand(n, 3),
                   Media(images=torch.rand(n, 3, 2, 2)), torch.tensor([1.0, 0.5, 0.2, 0.0]), steps, offset, 7)


def test_rollout_slices_keep_their_offset_and_join_back():
    r = _rollout()
    parts = [r.index(slice(0, 2)), r.index(slice(2, 4))]
    assert [p.offset for p in parts] == [0, 2] and parts[1].conditions.prompts == ("p2", "p3")
    back = Rollout.cat(parts)
    assert torch.equal(back.steps.x, r.steps.x) and torch.equal(back.final, r.final) and back.offset == 0
    with pytest.raises(ValueError, match="policy version"):
        Rollout.cat([parts[0], _rollout(2, 2).__class__(**{**parts[1].__dict__, "policy_version": 8})])


def test_wire_form_round_trips_without_torch_tensors():
    r = _rollout()
    r = Rollout(**{**r.__dict__, "final": r.final.to(torch.bfloat16)})
    wire = to_wire(r)
    assert isinstance(wire.final, Wire) and wire.final.dtype == "bfloat16"
    assert isinstance(wire.steps.x, Wire) and isinstance(wire.media.images, Wire)
    back = from_wire(wire)
    assert back.final.dtype == torch.bfloat16 and torch.equal(back.final, r.final)
    assert torch.equal(back.steps.log_prob, r.steps.log_prob) and back.conditions == r.conditions
    assert back.policy_version == 7 and back.steps.t_max == 0.9
