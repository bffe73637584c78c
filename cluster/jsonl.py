"""Read JSON-lines files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from cluster.errors import InvalidRequestError


def json_lines(path: str | Path) -> Iterator[tuple[str, object]]:
    """(``file:line`` for messages, parsed value) for each non-blank line; a line that is not
    JSON, or a file that cannot be read, raises ``InvalidRequestError`` naming it."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InvalidRequestError(f"{path}:{n}: not JSON ({err})") from None
                yield f"{path}:{n}", obj
    except OSError as err:
        raise InvalidRequestError(f"cannot read {path}: {err.strerror}") from None
