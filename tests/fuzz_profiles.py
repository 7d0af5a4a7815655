"""Hypothesis settings profiles for the architecture fuzzer (tests/test_fuzz.py, the conv
family, and tests/test_fuzz_transformers.py, the transformer family).

Select one with the environment variable ``REPC_FUZZ_PROFILE``:

* ``ci`` (the default): a bounded, derandomized run -- the same networks every time, so CI
  is stable -- of :data:`CI_NETWORKS` networks for the main fuzz test; no example database.
* ``slow``: :data:`SLOW_NETWORKS` networks, randomized, with Hypothesis' example database
  (``.hypothesis/``) so a failure found once is replayed first next time.  For a nightly or a
  pre-release run: ``REPC_FUZZ_PROFILE=slow python -m pytest tests/test_fuzz.py``.

``REPC_FUZZ_NETWORKS=N`` runs N networks under either profile (a shorter slow run).

The profiles are registered under ``repc-fuzz-ci`` and ``repc-fuzz-slow`` and applied as
decorators by :func:`fuzz_settings`; they are not loaded globally, so other tests keep their
own settings.
"""

import os
from typing import Optional

from hypothesis import HealthCheck, settings

CI_NETWORKS = 150
SLOW_NETWORKS = 10_000

_QUIET_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                 HealthCheck.function_scoped_fixture]

settings.register_profile("repc-fuzz-ci", max_examples=CI_NETWORKS, deadline=None, derandomize=True,
                          database=None, suppress_health_check=_QUIET_CHECKS, print_blob=True,
                          report_multiple_bugs=False)
settings.register_profile("repc-fuzz-slow", max_examples=SLOW_NETWORKS, deadline=None,
                          suppress_health_check=_QUIET_CHECKS, print_blob=True, report_multiple_bugs=False)


def profile_name() -> str:
    name = os.environ.get("REPC_FUZZ_PROFILE", "ci")
    if name not in ("ci", "slow"):
        raise ValueError(f"REPC_FUZZ_PROFILE={name!r}: expected ci or slow")
    return name


def fuzz_settings(scale: float = 1.0, ci_networks: Optional[int] = None) -> settings:
    """The selected profile, with ``max_examples`` scaled by ``scale`` (for lighter fuzz tests).

    ``ci_networks``: the count under the ``ci`` profile instead (a family whose networks cost
    more to compile keeps CI at about the same time); the ``slow`` profile keeps its own.
    """
    name = profile_name()
    base = settings.get_profile(f"repc-fuzz-{name}")
    if os.environ.get("REPC_FUZZ_NETWORKS"):  # a shorter (or longer) run of the selected profile
        return settings(base, max_examples=max(1, int(int(os.environ["REPC_FUZZ_NETWORKS"]) * scale)))
    if ci_networks is not None and name == "ci":
        return settings(base, max_examples=max(1, ci_networks))
    return settings(base, max_examples=max(1, int(base.max_examples * scale)))
