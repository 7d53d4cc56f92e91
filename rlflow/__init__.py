"""rlflow: reinforcement-learning fine-tuning of flow-matching generators.

The core package (this one) never imports Ray; the Ray layer lives in ``workers/``.
"""

__version__ = "0.1.0"
