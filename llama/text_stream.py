"""A sequence's generated text as it grows: released only once final, and cut at stop strings.

Text is final when it holds whole UTF-8 characters (a character split across byte-fallback tokens waits for
its last byte) and cannot turn out to be the start of a stop string. Decoding is incremental: each new token is
decoded with the tokens before it since the last whole character as context, so that word-boundary spaces come
out as a decode of the whole sequence gives them.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, TypedDict

Decode = Callable[[List[int]], str]
REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that do not (yet) form a character


class StreamChunk(TypedDict, total=False):
    """New text of one row of a streamed completion; the row's last chunk has its ``finish_reason``."""

    index: int  # the prompt or dialog it continues
    text: str
    finish_reason: Optional[str]  # None while it runs, then "stop" (stop token or string) or "length"
    tokens: List[str]  # with logprobs: the tokens whose text is complete in this chunk
    logprobs: List[float]


class TextStream:
    """The text of one sequence's generated tokens, fed as they grow; also the engine's stop check for it.

    ``context`` (the prompt, when the text continues an echoed prompt) is decoded before the generated tokens,
    so that the text starts as it does after the prompt (a leading space kept) instead of as a text of its own.
    """

    def __init__(self, decode: Decode, stop: Sequence[str] = (), context: Sequence[int] = ()) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.text = ""  # decoded so far: whole characters, cut before the first stop string once one appears
        self.sent = 0  # characters of text already taken
        self.sent_tokens = 0  # generated tokens whose text is wholly taken
        self.stopped_at: Optional[int] = None  # generated tokens kept, once a stop string has ended the text
        self.finished = False
        self._context = list(context[-1:])  # one token is context enough: decoding joins pieces
        self._context_text = decode(self._context) if self._context else ""
        self._tokens: List[int] = list(self._context)
        self._prefix = 0  # _tokens[_prefix:_read] is context whose text is already in self.text
        self._read = len(self._context)

    def __call__(self, generated: List[int]) -> Optional[int]:
        """Feed the tokens generated so far; the number of them to keep if a stop string has appeared, else None."""
        self._tokens = self._context + generated
        if self.stopped_at is not None:
            return self.stopped_at
        context = self.decode(self._tokens[self._prefix : self._read])
        window = self.decode(self._tokens[self._prefix :])
        if len(window) <= len(context) or window.endswith(REPLACEMENT):
            return None  # no whole new character yet
        searched = len(self.text)
        self.text += window[len(context) :]
        self._prefix, self._read = self._read, len(self._tokens)
        return self._find_stop(searched)

    def finish(self) -> None:
        """The sequence ended (stop token or length): what is left is final, incomplete bytes included."""
        if self.stopped_at is None:
            searched = len(self.text)
            context = self.decode(self._tokens[self._prefix : self._read])
            self.text += self.decode(self._tokens[self._prefix :])[len(context) :]
            self._prefix = self._read = len(self._tokens)
            self._find_stop(searched)
        self.finished = True

    def take(self) -> str:
        """The final text not taken yet; ``sent_tokens`` moves up to the tokens whose text is all taken."""
        done = self.finished or self.stopped_at is not None
        end = len(self.text) if done else len(self.text) - self._held_back()
        new = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        n_generated = len(self._tokens) - len(self._context)
        if self.stopped_at is not None:
            self.sent_tokens = self.stopped_at
        elif done or (end == len(self.text) and self._read == len(self._tokens)):
            self.sent_tokens = n_generated
        return new

    def _find_stop(self, searched: int) -> Optional[int]:
        """Cut the text at the first stop string that ends past ``searched``; the tokens to keep, or None."""
        start = max(0, searched - max((len(s) for s in self.stop), default=0) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return None
        self.text = self.text[: min(hits)]
        self.stopped_at = self._tokens_within_text()
        return self.stopped_at

    def _tokens_within_text(self) -> int:
        """The most generated tokens whose text is a prefix of ``self.text`` (searched from the end, where the cut is)."""
        generated = self._tokens[len(self._context) :]
        for k in range(len(generated), -1, -1):
            decoded = self.decode(self._context + generated[:k])[len(self._context_text) :]
            if len(decoded) <= len(self.text) and self.text.startswith(decoded):
                return k
        return 0

    def _held_back(self) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
