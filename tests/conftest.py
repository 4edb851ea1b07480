"""Shared test configuration: hypothesis profiles, chosen with ``HYPOTHESIS_PROFILE``.

- ``ci`` (the default, what CI runs): 200 examples per property.  The ``fuzz``-marked targets
  run too, so CI fuzzes every change for a bounded time (a few seconds per target).
- ``dev``: 50 examples, for a quick local loop.
- ``thorough``: 5,000 examples per property.
- ``fuzz``: 20,000 examples, meant for the fuzz targets alone (about ten minutes each):
  ``HYPOTHESIS_PROFILE=fuzz pytest -m fuzz``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
