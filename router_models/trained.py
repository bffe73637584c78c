"""The trained router micro-model behind the ``RouterModel`` seam."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from cluster.types import RouteQuery, RouteScores, as_query
from router_models.artifact import DEFAULT_ARTIFACT, TUNED_PREFIX, RouterArtifact, artifact_error, load_artifact
from router_models.embedder import Embedder
from router_models.heads import predict

log = logging.getLogger(__name__)


def load_with_embedder(path: str | Path, *, threads: int | None = None) -> tuple[RouterArtifact, Embedder]:
    """The artifact and an embedder set up the way it was trained (dtype, max tokens),
    checked against it by fingerprint. Raises ``ArtifactError``."""
    artifact = load_artifact(path)
    spec = artifact.embedder
    head = spec.get("head_tokens")
    embedder = Embedder(threads=threads, dtype=spec.get("dtype", "float32"), max_tokens=int(spec.get("max_tokens", 256)),
                        head_tokens=None if head is None else int(head), context_tokens=int(spec.get("context_tokens", 0)))
    load_artifact(path, expect_fingerprint=embedder.fingerprint)  # refuses a foreign embedder
    embedder.load()
    log.info("router embedder: %s weights multiplied in %s (trained with %s)", embedder.dtype, embedder.compute, spec.get("compute", embedder.dtype))
    if int(spec.get("tuned_layers", 0)):
        try:
            embedder.use_tuned_layers(artifact.arrays, TUNED_PREFIX)
        except ValueError as err:
            raise artifact_error(Path(path), str(err)) from None
    return artifact, embedder


class TrainedRouter:
    """Embeds each text with all-MiniLM-L6-v2 and applies the artifact's heads.

    ``load()`` reads and checks the artifact against the installed embedder and loads the
    embedder, raising ``ArtifactError`` for a missing, corrupt or foreign artifact, so a
    bad artifact fails the deployment at start.
    """

    name = "trained"

    def __init__(self, artifact_path: str | Path | None = None, *, threshold: float | None = None, threads: int | None = None) -> None:
        self.artifact_path = Path(artifact_path) if artifact_path else DEFAULT_ARTIFACT
        self.threshold_override = threshold
        self.threads = threads
        self.embedder: Embedder | None = None
        self.artifact: RouterArtifact | None = None

    def load(self) -> None:
        self.artifact, self.embedder = load_with_embedder(self.artifact_path, threads=self.threads)
        self.embedder.embed(["warm up"])  # the first forward pass is slow; pay it at start
        log.info("router: trained artifact %s (%s)", self.artifact.metadata.get("version"), self.artifact_path)

    @property
    def threshold(self) -> float:
        """The global threshold (an artifact calibrated per domain applies its own per domain)."""
        assert self.artifact is not None, "load() first"
        return self.threshold_override if self.threshold_override is not None else self.artifact.escalation_threshold

    def score(self, batch: Sequence[str | RouteQuery]) -> list[RouteScores]:
        assert self.artifact is not None and self.embedder is not None, "load() first"
        if not batch:
            return []
        queries = [as_query(item) for item in batch]
        # The cheap text features describe the request itself; the context only joins the embedding.
        out = predict(self.artifact.arrays, self.embedder.embed(queries), [q.request for q in queries])
        domains = self.artifact.domains
        result = []
        for probs, esc in zip(out.domain_probs, out.escalation):
            domain_probs = {d: float(p) for d, p in zip(domains, probs)}
            domain = max(domain_probs, key=domain_probs.__getitem__)
            threshold = self.threshold_override if self.threshold_override is not None else self.artifact.threshold_for(domain)
            result.append(
                RouteScores(domain=domain, domain_probs=domain_probs, escalation_score=float(esc), escalation_threshold=threshold)
            )
        return result
