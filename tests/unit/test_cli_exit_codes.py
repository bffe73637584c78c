"""slmctl's exit codes for typed errors: bad input is 2 (running it again cannot help), a
service that is down or failing is 1 (retry later), as the README's CLI section says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli.main import EXIT_BAD_CONFIG, EXIT_FAILED, exit_code, main
from cluster.errors import (
    ArtifactError,
    ConfigError,
    EngineTimeoutError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    RateLimitExceededError,
)
from cluster.keys import KeyStoreUnavailable


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (InvalidRequestError("bad flag"), EXIT_BAD_CONFIG),
        (ModelNotFoundError("no such model"), EXIT_BAD_CONFIG),
        (ConfigError("bad config"), EXIT_BAD_CONFIG),  # a 500 by status, but the user's file
        (ArtifactError("corrupt artifact"), EXIT_BAD_CONFIG),
        (KeyStoreUnavailable("redis down"), EXIT_FAILED),  # 503, retryable
        (EngineTimeoutError("slow"), EXIT_FAILED),
        (RateLimitExceededError("later"), EXIT_FAILED),  # a 429 that says "retry"
        (InternalError("our bug"), EXIT_FAILED),
    ],
)
def test_typed_errors_map_to_exit_codes(err: Exception, code: int) -> None:
    assert exit_code(err) == code  # type: ignore[arg-type]


def _config(tmp_path: Path, redis_url: str) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({
        "models": [{"name": "general", "role": "general", "versions": [{"name": "v1", "engine": {"kind": "fake"}}]}],
        "redis": {"url": redis_url, "timeout_s": 0.2},
    }))
    return str(path)


def test_keys_commands_exit_1_when_redis_is_unreachable_and_2_for_bad_input(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, "redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert main(["keys", "list", "--config", cfg]) == EXIT_FAILED
    assert "unreachable" in capsys.readouterr().err
    assert main(["keys", "create", "--name", "a", "--config", cfg]) == EXIT_FAILED
    assert main(["keys", "revoke", "a", "--config", cfg]) == EXIT_FAILED
    capsys.readouterr()
    assert main(["keys", "create", "--name", "a", "--rpm", "0", "--config", cfg]) == EXIT_BAD_CONFIG  # checked before Redis
    assert "--rpm must be at least 1" in capsys.readouterr().err
