"""A row of a generation call: the engine's sequence for one prompt, with its text as it grows; its final text and
its stream chunks. Shared by ``Llama``'s calls and the server."""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

from llama import engine
from llama.text_stream import StreamChunk, TextStream


@dataclasses.dataclass
class Row:
    """A sequence being generated for one prompt, with its text as it grows when streaming or stop strings need it."""

    index: int  # of its prompt or dialog in the call
    sequence: engine.Sequence
    stream: Optional[TextStream]
    echo: bool
    prompt_sent: bool = False  # echo: the prompt went out with the first chunk

    @property
    def tokens(self) -> List[int]:
        return self.sequence.tokens if self.echo else self.sequence.generated

    @property
    def logprobs(self) -> List[float]:
        return self.sequence.logprobs if self.echo else self.sequence.logprobs[len(self.sequence.prompt) :]

    def finish(self) -> None:
        """After the last step: the stream's last text, and tokens cut to a stop string that only the end completed."""
        if self.stream is not None and not self.stream.finished:
            self.stream.finish()
            if self.stream.stopped_at is not None and len(self.sequence.generated) > self.stream.stopped_at:
                self.sequence.keep_generated(self.stream.stopped_at)
                self.sequence.finish_reason = "stop"

    def text(self, decode: Callable[[List[int]], str]) -> str:
        """The generation's text: the tokens decoded, or the stream's text when a stop string cut it."""
        if self.stream is None:
            return decode(self.tokens)
        return (decode(self.sequence.prompt) if self.echo else "") + self.stream.text

    def chunk(self, logprobs: bool, decode: Callable[[List[int]], str]) -> Optional[StreamChunk]:
        """The row's new text since its last chunk (the prompt first, with echo), or None when it has none and goes on."""
        assert self.stream is not None
        if self.sequence.finished:
            self.finish()
        prompt_len = len(self.sequence.prompt)
        first = 0 if self.echo and not self.prompt_sent else prompt_len + self.stream.sent_tokens
        text = (decode(self.sequence.prompt) if first == 0 else "") + self.stream.take()
        finish_reason = self.sequence.finish_reason if self.stream.finished else None
        if not text and finish_reason is None and first != 0:
            return None
        self.prompt_sent = True
        chunk: StreamChunk = {"index": self.index, "text": text, "finish_reason": finish_reason}
        if logprobs:
            new = slice(first, prompt_len + self.stream.sent_tokens)
            chunk["tokens"] = [decode([x]) for x in self.sequence.tokens[new]]
            chunk["logprobs"] = self.sequence.logprobs[new]
        return chunk
