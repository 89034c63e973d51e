"""A completion's text as its tokens arrive, cut at stop strings, released so streamed pieces concatenate
to exactly the final text."""

from __future__ import annotations

from jaxlm.data.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what decoding gives for the first bytes of a character split over tokens


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # the text so far, cut at a stop string once one appears
        self.sent = 0  # characters of `text` already released
        self.stopped = False  # a stop string ended the text

    def push(self, token: int) -> str:
        """Adds a token; returns the text now safe to send: nothing that could still turn out to be the start
        of a stop string, and no half of a character."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((text.index(s) for s in self.stops if s in text), default=None)
        if cut is not None:
            self.stopped, self.text = True, text[:cut]
            return self._release(len(self.text))
        self.text = text
        safe = len(text) - self._held(text)
        while safe > self.sent and text[safe - 1] == INCOMPLETE:
            safe -= 1
        return self._release(safe)

    def finish(self) -> str:
        """The rest of the text, once no more tokens come."""
        return self._release(len(self.text))

    def _held(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop string."""
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece
