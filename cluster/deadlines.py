"""Pure deadline arithmetic for a streamed answer; the caller passes the clock reading."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamDeadlines:
    started_at: float
    request_timeout_s: float
    first_token_timeout_s: float
    idle_timeout_s: float

    def next_wait(self, now: float, last_chunk_at: float | None) -> tuple[float, str]:
        """(seconds the next chunk may take, what that limit is called in the error).

        Before the first chunk the first-token limit applies, after it the idle gap; the
        whole-request limit caps both. A result <= 0 means the deadline has passed.
        """
        total_left = self.started_at + self.request_timeout_s - now
        if last_chunk_at is None:
            step_left, name = self.started_at + self.first_token_timeout_s - now, "first token"
        else:
            step_left, name = last_chunk_at + self.idle_timeout_s - now, "next token"
        if total_left <= step_left:
            return total_left, "whole answer"
        return step_left, name
