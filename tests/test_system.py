"""keep_freed_memory: freed tensor memory stays mapped for the next step (fewer page faults)."""

import os
import subprocess
import sys

import pytest

from rlflow.system import keep_freed_memory

_PROBE = """
import resource, sys
import torch
from rlflow.system import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
def step():  # a step's activations: many 1 MiB buffers, touched, then all freed
    bufs = [torch.empty(1 << 18).fill_(1.0) for _ in range(32)]
    del bufs
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    # glibc's default mmap threshold (128 KiB) is dynamic: after a few frees of same-sized buffers it rises and
    # a default process stops refaulting, so its count here was 16k or 8k faults or, after more warm-up, 0.
    # Pinning the default threshold gives the behaviour the sampler's varied activations hit (~50k faults/s
    # measured) in every run; keep_freed_memory's mallopt overrides it.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_refaulting_freed_buffers():
    applied, on = _faults("on")
    _, off = _faults("off")
    assert applied == "True"
    # 5 steps x 32 MiB: with the default threshold every 1 MiB buffer is mmapped and faulted in again (~41k)
    assert off > 5 * 2000, off
    assert on < off / 10, (on, off)


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RLFLOW_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
