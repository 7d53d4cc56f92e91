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
