"""keep_freed_memory: freed tensor memory stays mapped for the next step (fewer page faults)."""

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
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_refaulting_freed_buffers():
    applied, on = _faults("on")
    _, off = _faults("off")
    assert applied == "True"
    # 5 steps x 32 MiB: by default glibc trims the freed heap, so each step faults thousands of pages in again
    assert off > 5 * 2000, off
    assert on < off / 10, (on, off)


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RLFLOW_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
