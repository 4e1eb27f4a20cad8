"""Text out of tokens, a step at a time: incremental detokenization and stop strings.

The whole output is decoded again as tokens arrive (cheap next to a step, and always right across merged tokens);
text is released only up to where it can no longer change: not a trailing incomplete character (U+FFFD from a
partial multi-byte sequence), and not the last characters that could still begin a stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = 0  # characters released so far
        self.stopped = False  # a stop string was found: the text ends before it

    def add(self, tokens: list[int]) -> str:
        """The new text that is final after `tokens`; after a stop string, the text up to it."""
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [text.find(stop, max(0, self.sent - len(stop) + 1)) for stop in self.stop]
        hits = [hit for hit in hits if hit >= 0]
        if hits:
            self.stopped = True
            return self._release(text[: min(hits)], len(text[: min(hits)]))
        end = len(text)
        while end > self.sent and text[end - 1] == REPLACEMENT:
            end -= 1
        held = max((len(stop) - 1 for stop in self.stop), default=0)  # could begin a stop string
        return self._release(text, max(self.sent, end - held))

    def rest(self) -> str:
        """Everything not released yet, once generation has ended."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        new, self.sent = text[self.sent : upto], max(self.sent, upto)
        return new
