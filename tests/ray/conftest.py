"""Ray tests on this 2-core machine: small local clusters and the tiny generated bge-m3.

No `__init__.py` here on purpose: a package `tests/ray` would shadow Ray itself for these modules
(pytest puts `tests/` on sys.path). Helpers live in `deadlines.py`; every test runs under a deadline,
and module fixtures bound their own set-up with `deadline(...)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from deadlines import TEST_DEADLINE_S, deadline

# No usage reports from this network-less machine (Ray Data's also query a Prometheus that is not there).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _test_deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    with deadline(TEST_DEADLINE_S, request.node.name):
        yield


def pytest_configure(config: pytest.Config) -> None:
    # Ray's own pydantic models warn when Ray Serve is imported: Ray's to fix, noise in our summary.
    config.addinivalue_line("filterwarnings", r"ignore::DeprecationWarning:ray\..*")
