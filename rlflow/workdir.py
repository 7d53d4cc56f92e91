"""What a working dir shipped to a Ray cluster (``rlflow submit``, ``rlflow train --working-dir``) leaves out."""

from __future__ import annotations

# gitignore syntax, relative to the working dir (Ray also honours the working dir's .gitignore). No
# trailing slashes: Ray matches directories by their bare relative path. The toy base model ships as
# safetensors inside the package, which the job imports from its copy of the working dir: keep those.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "mlruns",
    "mlartifacts",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "*.pt",
    "*.ckpt",
    "*.safetensors",
    "!rlflow/**/*.safetensors",
    ".env",
    ".env.*",
    "*.env",
]
