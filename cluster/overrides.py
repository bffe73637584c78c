"""Pure transformations of a config that the CLI offers as flags."""

from __future__ import annotations

from cluster.config import ClusterConfig, RemoteOpenAIEngineConfig
from cluster.errors import ConfigError


def with_remote_frontier(cfg: ClusterConfig, *, base_url: str, model: str, api_key_env: str | None) -> ClusterConfig:
    """Point every version of the frontier model at an OpenAI-compatible endpoint."""
    frontier = cfg.frontier
    if frontier is None:
        raise ConfigError("no frontier model", issues=(("models", "the config has no model with role frontier to point at the endpoint"),))
    engine = RemoteOpenAIEngineConfig(kind="remote_openai", base_url=base_url, model=model, api_key_env=api_key_env)
    versions = tuple(v.model_copy(update={"engine": engine, "system_prompt": None}) for v in frontier.versions)
    models = tuple(m.model_copy(update={"versions": versions}) if m.name == frontier.name else m for m in cfg.models)
    # Re-validate so the result obeys every rule a loaded config does.
    return ClusterConfig.model_validate({**cfg.model_dump(), "models": [m.model_dump() for m in models]})
