"""The narrow seams: Engine, RouterModel and TrafficStore.

Adapters live outside the kernel (engines in ``deployments/engines``, router models in
``router_models``); the kernel only names what they must do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator, Protocol, Sequence, runtime_checkable

from cluster.types import EngineCapabilities, GenerationChunk, GenerationRequest, RouteQuery, RouteScores

if TYPE_CHECKING:
    from cluster.figures import Window
    from cluster.traffic_store import TrafficSnapshot


@runtime_checkable
class Engine(Protocol):
    """One model version's inference engine.

    Contract (checked by ``tests/contract/test_engine_contract.py`` for every adapter):
    - ``start()`` loads the model; it raises a typed error (``ArtifactError``,
      ``EngineError``) rather than leaving a half-started engine.
    - ``generate()`` yields text chunks in order, then exactly one final chunk with
      ``finish_reason`` and ``usage``. Failures are raised as ``SLMError`` subclasses.
    - Closing the iterator early (``aclose()``, or cancelling the consumer) aborts the
      generation: the engine stops spending compute on it.
    - ``check_health()`` raises ``EngineUnavailableError`` when the engine cannot serve.
    """

    capabilities: EngineCapabilities

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def check_health(self) -> None: ...

    async def shutdown(self) -> None: ...


@runtime_checkable
class RouterModel(Protocol):
    """Decides the domain of a request and how much it needs the frontier model.

    ``score`` takes a batch of conversations (``RouteQuery``) or plain prompts (a string is
    a one-turn conversation) and returns one ``RouteScores`` each, in order."""

    name: str

    def load(self) -> None: ...

    def score(self, batch: Sequence[str | RouteQuery]) -> list[RouteScores]: ...


class TrafficStore(Protocol):
    """Holds the per-model traffic splits (model -> version -> weight), promoted current
    versions, shadow settings, rollouts with their command queue, and per-version figures. ``cluster.traffic_store`` has the in-memory and Redis implementations; one
    contract suite (``tests/contract/test_traffic_store.py``) runs both. A store that cannot
    be reached raises ``TrafficStoreUnavailable``."""

    async def snapshot(self) -> "TrafficSnapshot": ...

    async def write_split(self, model: str, weights: dict[str, int]) -> None: ...

    async def clear_split(self, model: str) -> None: ...

    async def set_current(self, model: str, version: str) -> None: ...

    async def set_shadow(self, model: str, version: str, share: float) -> None: ...

    async def clear_shadow(self, model: str) -> None: ...

    async def add_figures(self, entries: "list[tuple[str, str, int, Window]]") -> None: ...

    async def read_figures(self, model: str, version: str, start_s: int, end_s: int) -> "Window": ...

    async def read_rollouts(self) -> dict[str, dict]: ...

    async def write_rollout(self, model: str, rollout: dict) -> None: ...

    async def push_command(self, command: dict) -> None: ...

    async def pop_commands(self) -> list[dict]: ...

    async def close(self) -> None: ...
