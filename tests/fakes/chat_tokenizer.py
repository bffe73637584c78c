"""A word-level stand-in for a Hugging Face chat tokenizer, shared by the engine fakes.

It has the slice of the tokenizer API the GPU adapters use (``apply_chat_template`` with
``tokenize=False``, ``encode`` with ``add_special_tokens``, ``decode``) and is deliberately not
thread-safe in the way fast tokenizers are not: a call that overlaps another raises
``RuntimeError("Already borrowed")``, so an adapter that tokenises from several threads at once
fails here as it would with the real library.
"""

from __future__ import annotations

import threading
import time


class TemplateError(Exception):
    """Named like jinja2's, which the adapters match by name."""


class FakeChatTokenizer:
    eos_token_id = 0

    def __init__(self, *, encode_delay_s: float = 0.0) -> None:
        self._ids: dict[str, int] = {"<eos>": 0}
        self._words: list[str] = ["<eos>"]
        self._busy = threading.Lock()
        self._encode_delay_s = encode_delay_s
        self.calls_on_threads: set[str] = set()

    def apply_chat_template(self, conversation: list[dict[str, str]], *, tokenize: bool = True, add_generation_prompt: bool = False) -> str:
        if tokenize:
            raise AssertionError("the adapters render text, then encode it without special tokens")
        roles = [m["role"] for m in conversation if m["role"] != "system"]
        if any(a == b for a, b in zip(roles, roles[1:])):
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
        text = " ".join(f"<|{m['role']}|> {m['content']}" for m in conversation)
        return text + (" <|assistant|>" if add_generation_prompt else "")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("Already borrowed")
        try:
            self.calls_on_threads.add(threading.current_thread().name)
            if self._encode_delay_s:
                time.sleep(self._encode_delay_s)
            ids = [self.token_id(word) for word in text.split()]
            return ([1] if add_special_tokens else []) + ids
        finally:
            self._busy.release()

    def token_id(self, word: str) -> int:
        if word not in self._ids:
            self._ids[word] = len(self._words)
            self._words.append(word)
        return self._ids[word]

    def token_text(self, token_id: int) -> str:
        """How the token reads inside a detokenised answer (words after the first get a space)."""
        return " " + self._words[token_id]

    def decode(self, token_ids: list[int], **_: object) -> str:
        return "".join(self.token_text(i) for i in token_ids if i != self.eos_token_id)


# The fake models' answers are drawn from these words, seeded by the prompt.
ANSWER_WORDS = (
    "two three five seven eleven thirteen seventeen nineteen are primes and so is twenty-three "
    "which follows nineteen in the list of small primes that every student learns early"
).split()


def answer_ids(tokenizer: FakeChatTokenizer, prompt_ids: list[int], n: int, seed: int | None = None) -> list[int]:
    """The first ``n`` tokens of the deterministic answer to ``prompt_ids``."""
    start = (sum(prompt_ids) * 31 + len(prompt_ids) + (seed or 0)) % len(ANSWER_WORDS)
    return [tokenizer.token_id(ANSWER_WORDS[(start + i) % len(ANSWER_WORDS)]) for i in range(n)]
