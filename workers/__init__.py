"""The Ray layer (actors wrapping the plain Sampler / Learner / reward classes, and the driver).

Not built yet: the in-process loop in :mod:`rlflow.trainer` is the reference these actors will wrap.
"""
