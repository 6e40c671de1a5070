"""Printing generated text for a person: rows of a batch in order, each as its text arrives."""

from __future__ import annotations

import sys
from typing import Callable, Iterable, List, Optional, TextIO

from llama.text_stream import StreamChunk


def print_in_order(
    chunks: Iterable[StreamChunk], n_rows: int, before: Callable[[int], str], after: Callable[[int], str], out: Optional[TextIO] = None
) -> None:
    """Print row 0's text as its chunks come, then row 1's, ...: a later row's chunks wait until the rows before it end.

    ``before(i)`` and ``after(i)`` frame row i's text.
    """
    out = out or sys.stdout
    pending: List[str] = [""] * n_rows
    finished = [False] * n_rows
    current = 0
    if n_rows:
        out.write(before(0))
    for chunk in chunks:
        i = chunk["index"]
        if i == current:
            out.write(chunk["text"])
        else:
            pending[i] += chunk["text"]
        finished[i] = finished[i] or chunk["finish_reason"] is not None
        while current < n_rows and finished[current]:
            out.write(after(current))
            current += 1
            if current < n_rows:
                out.write(before(current) + pending[current])
        out.flush()


def as_chunks(texts: Iterable[str]) -> List[StreamChunk]:
    """Whole texts (a non-streamed result) as one final chunk per row."""
    return [{"index": i, "text": text, "finish_reason": "stop"} for i, text in enumerate(texts)]
