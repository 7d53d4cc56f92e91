"""Redaction of secrets before anything leaves the process for a shared place (MLflow params and artifacts):
values under keys that look like secrets, credentials inside URIs, and every environment variable value of
a ``runtime_env``. The run folder's own ``config.yaml`` stays complete (``--resume`` needs it)."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|apikey|credential|auth|private[_-]?key)",
                         re.IGNORECASE)
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<cred>[^/@\s]+)@")


def is_secret_key(key: str) -> bool:
    """Whether values under ``key`` are treated as secrets (``api_key``, ``token``, ``password``, ...)."""
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://***@host``."""
    return _URI_CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def redact(value: Any, key: str = "") -> Any:
    """A copy of a nested config with secret-looking values masked (see the module docstring)."""
    if isinstance(value, dict):
        if key == "env_vars":
            return {k: MASK for k in value}
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v, key) for v in value)
    if key and is_secret_key(key) and isinstance(value, str) and value:
        return MASK  # secrets are strings (a number under "max_tokens" is not one)
    if isinstance(value, str):
        return redact_text(value)
    return value
