"""``rlflow submit|status|logs|stop|jobs``: Ray Jobs API commands (filled in by the jobs work)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the job subcommands to the ``rlflow`` parser's subparsers."""
    del sub


__all__ = ["argparse", "register"]
