"""Session-wide pytest hooks.

Why this exists: after the integration tier, the pytest process has crashed with SIGSEGV
during interpreter teardown (exit 139) although every test had passed and the summary was
printed. The crash comes from native threads that Ray and torch leave behind, which outlive
the Python objects they touch once the interpreter starts finalising. The results are final
by then, so the process leaves with pytest's own exit status instead of running that teardown.
"""

from __future__ import annotations

import os
import sys

import pytest

_STATUS: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _STATUS["exit"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if "exit" not in _STATUS:  # --help, collection-only runs and the like: leave normally
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_STATUS["exit"])
