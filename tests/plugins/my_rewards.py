"""User-style reward functions referenced by dotted path from tests."""

import torch


def brightness(images, prompts, scale=1.0):
    return (images.mean(dim=(1, 2, 3)) * scale).tolist()


def broken(images, prompts):
    out = images.mean(dim=(1, 2, 3))
    out[0] = float("nan")
    return out


class Constant:
    def __init__(self, value):
        self.value = value

    def __call__(self, images, prompts):
        return torch.full((len(prompts),), self.value)


def too_short(images, prompts):
    return [0.0] * (len(prompts) - 1)


def frames_and_sources(media, conditions):
    """The media form: sees the whole video and the conditions' source images and metadata."""
    motion = (media.frames[:, 1:] - media.frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
    src = conditions.source_images.mean(dim=(1, 2, 3, 4))
    bonus = torch.tensor([float(m.get("bonus", 0.0)) for m in conditions.metadata])
    return motion + src + bonus


def words(images, prompts):
    return "high"


def with_secrets(images, prompts, api_key="", endpoint=""):
    """A reward configured with credentials (the redaction test checks they are never logged)."""
    return [0.5] * len(prompts)


class SoftBrightness:
    """A differentiable reward: the mean pixel value, a torch function of the pixels."""

    differentiable = True

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


soft_brightness = SoftBrightness()
