"""Rewards that misbehave on purpose, for the Ray runtime's fault tests (they run inside reward actors).

The killers are real failures, not mocks: they ``ray.kill`` another actor of the same run by its name while
the run is in flight. A marker file makes each kill happen once.
"""

import os
import time
from pathlib import Path

import ray
import torch

from rewards.shapes import ShapesGenEval

_geneval = ShapesGenEval()


def raises(images, prompts):
    raise RuntimeError("the judge exploded")


def hangs(images, prompts, seconds=3600.0):
    time.sleep(seconds)
    return torch.zeros(len(prompts))


def nan(images, prompts):
    out = images.mean(dim=(1, 2, 3))
    out[1] = float("nan")
    return out


def env_value(images, prompts, name="RLFLOW_TEST_VALUE"):
    return torch.full((len(prompts),), float(os.environ.get(name, "-1")))


def _kill_once(marker, suffix, calls_before=0, restart=True):
    """Kill the run's actor whose name ends with ``suffix`` on the ``calls_before + 1``-th call."""
    counter = Path(marker + ".calls")
    calls = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(calls + 1))
    if calls != calls_before or Path(marker).exists():
        return
    Path(marker).write_text("killed")
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].endswith(suffix):
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=not restart)


def kill_sampler_once(images, prompts, marker):
    """Scores like shapes_geneval; on its first call kills sampler 0 (Ray restarts it) while it still has
    chunks of the step to sample."""
    _kill_once(marker, "-sampler-0")
    return _geneval(images, prompts)


def kill_learner_once(images, prompts, marker, calls_before=0):
    """Scores like shapes_geneval; on call ``calls_before + 1`` kills learner rank 0 for good."""
    _kill_once(marker, "-learner-0", calls_before, restart=False)
    return _geneval(images, prompts)


def exits_once(images, prompts, marker):
    """Scores like shapes_geneval, but its process dies on the first call (Ray restarts the reward actor)."""
    if not Path(marker).exists():
        Path(marker).write_text("exited")
        os._exit(1)
    return _geneval(images, prompts)
