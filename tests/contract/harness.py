"""What each engine factory hands the contract suite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from cluster.errors import SLMError
from cluster.protocols import Engine


@dataclass
class EngineUnderTest:
    engine: Engine  # started and healthy
    aborted: Callable[[], int]  # generations the engine (or its upstream) saw aborted so far
    broken: Engine  # started; its generate() fails with a typed SLMError
    close: Callable[[], Awaitable[None]]  # shuts everything down
    broken_error: type[SLMError]  # the exact error class broken.generate() raises
    broken_status: int  # and its HTTP status
    long_max_tokens: int = 64  # enough tokens that a stream is still running after 2 chunks
