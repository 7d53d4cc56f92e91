"""The base of every config section and the config error (no heavy imports: the CLI loads it first)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A bad config: the message names the key(s) and what is allowed."""


class Section(BaseModel):
    """A config section: unknown keys are errors, values are frozen after validation, and no float is NaN or
    infinite (``lr: .inf`` or ``timeout_s: .nan`` would pass a bare range check or defeat it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
