"""The decode engine: a batch whose rows are sequences with their own positions, joining and leaving between steps.

Knows token ids and tensors, not text or dialogs. A sequence owns one row of the KV caches while it runs; the
rows in use are always the first ones, so every forward reads a contiguous block of the caches (a finished
sequence's row is filled by moving the last row into it). Prompts that join together are prefilled together in
one forward per chunk, whatever their lengths; each step then advances every running row by one token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Sequence as Seq, Tuple

import torch

from llama import distributed
from llama.model import Transformer
from llama.sampling import next_token, token_logprobs

PREFILL_CHUNK = 512  # prompt positions per prefill forward: bounds activation and logits memory

# (tokens (bsz, 1), positions (bsz,)) -> next-token logits (bsz, vocab): one decode step over the first bsz rows.
DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compile_decode_step(model: Transformer) -> DecodeStep:
    """The decode step under ``torch.compile``: attention over the whole cache, masked per row, so that shapes
    never change but the batch size, which is compiled as dynamic. On a CPU inductor freezes the weights
    (constant-folded and prepacked), the fastest its GEMMs run.
    """
    max_seq_len = model.params.max_seq_len

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model.forward(tokens, positions, kv_len=max_seq_len)[:, -1]

    options = {"freezing": True} if model.output.weight.device.type == "cpu" else None
    return torch.compile(step, dynamic=True, options=options)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a sequence picks its tokens: temperature 0 is greedy; logprobs scores each token it returns."""

    temperature: float = 0.6
    top_p: float = 0.9
    logprobs: bool = False


@dataclasses.dataclass(eq=False)
class Sequence:
    """One prompt being continued: its tokens so far, their scores, and why it stopped."""

    prompt: List[int]
    max_len: int  # total tokens (prompt included) at which it stops: min(max_seq_len, prompt + max_gen_len)
    sampling: Sampling = Sampling()
    score_prompt: bool = False  # also score the prompt's tokens (echo with logprobs)
    tokens: List[int] = dataclasses.field(default_factory=list)  # the prompt, then each generated token
    logprobs: List[float] = dataclasses.field(default_factory=list)  # one per token when sampling.logprobs (0.0 unscored)
    # Called with the generated tokens after each new one: None to go on, or how many of them to keep and stop
    # (a stop string in their text; llama.text_stream.TextStream is one).
    stop_check: Optional[Callable[[List[int]], Optional[int]]] = None
    finish_reason: Optional[str] = None  # "stop" (a stop token, not kept in tokens, or stop_check) or "length"
    row: int = -1  # its KV-cache row while it runs

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        if self.sampling.logprobs:
            self.logprobs = [0.0] * len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated(self) -> List[int]:
        return self.tokens[len(self.prompt) :]

    def keep_generated(self, n: int) -> None:
        """Drop all but the first n generated tokens (and their scores)."""
        del self.tokens[len(self.prompt) + n :]
        del self.logprobs[len(self.prompt) + n :]


class Engine:
    """Runs sequences on a model whose KV caches hold ``max_batch_size`` rows of ``max_seq_len`` positions."""

    def __init__(
        self, model: Transformer, stop_ids: Iterable[int], generator: Optional[torch.Generator] = None, decode: Optional[DecodeStep] = None
    ) -> None:
        """``decode`` replaces the model's eager decode step (``compile_decode_step``)."""
        self.model = model
        self.decode = decode
        self.stop_ids = frozenset(stop_ids)
        self.generator = generator
        self.device = model.output.weight.device
        self.running: List[Sequence] = []  # running[i] owns KV-cache row i
        self.waiting: List[Sequence] = []

    @property
    def max_batch_size(self) -> int:
        return self.model.params.max_batch_size

    def add(self, sequence: Sequence) -> None:
        """Queue a sequence; it joins the batch at a later ``step`` when a row is free."""
        if not 0 < len(sequence.prompt) <= sequence.max_len <= self.model.params.max_seq_len:
            raise ValueError(f"a sequence needs 0 < prompt ({len(sequence.prompt)}) <= max_len ({sequence.max_len}) <= max_seq_len")
        if len(sequence.prompt) == sequence.max_len and not sequence.score_prompt:
            sequence.finish_reason = "length"  # nothing to generate or score: no forward needed
            return
        self.waiting.append(sequence)

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence now, whether it waits or runs (a client gone); its row is free for the next step."""
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        elif sequence in self.running:
            self._release(sequence)
        if sequence.finish_reason is None:
            sequence.finish_reason = "cancelled"

    def run(self, sequences: Iterable[Sequence]) -> None:
        """Run sequences to the end, ``max_batch_size`` at a time; a finished one's row goes to the next waiting."""
        for sequence in sequences:
            self.add(sequence)
        while self.waiting or self.running:
            self.step()

    @torch.inference_mode()
    def step(self) -> List[Sequence]:
        """Admit waiting sequences into free rows (prefilling them), else advance every running row by one token.

        Returns the sequences that got a token (or finished) in this step.
        """
        if self.waiting and len(self.running) < self.max_batch_size:
            return self._admit()
        if not self.running:
            return []
        batch = list(self.running)
        last = torch.tensor([[s.tokens[-1]] for s in batch], dtype=torch.long, device=self.device)  # (bsz, 1)
        positions = [len(s.tokens) - 1 for s in batch]
        if self.decode is not None:
            logits = self.decode(last, self._index(positions))
        else:  # eager: attention reads only the positions written so far
            start = positions[0] if len(set(positions)) == 1 else self._index(positions)
            logits = self.model.forward(last, start, kv_len=max(positions) + 1)[:, -1]  # (bsz, vocab)
        self._sample_and_append(batch, logits)
        return batch

    def _admit(self) -> List[Sequence]:
        """Prefill as many waiting sequences as there are free rows, in one forward per chunk; sample their first token."""
        free = self.max_batch_size - len(self.running)
        joining, self.waiting = self.waiting[:free], self.waiting[free:]
        # Longest first: the rows still inside their prompt at any chunk are then a prefix of the new rows.
        joining.sort(key=lambda s: len(s.prompt), reverse=True)
        first_row = len(self.running)
        for i, sequence in enumerate(joining):
            sequence.row = first_row + i
        self.running.extend(joining)
        last_logits = self._prefill(joining, first_row)
        to_generate = [i for i, s in enumerate(joining) if len(s.tokens) < s.max_len]
        if to_generate:
            index = self._index(to_generate)
            self._sample_and_append([joining[i] for i in to_generate], last_logits[index])
        for sequence in joining:
            if not sequence.finished and len(sequence.tokens) >= sequence.max_len:
                sequence.finish_reason = "length"
                self._release(sequence)
        return joining

    def _prefill(self, joining: List[Sequence], first_row: int) -> torch.Tensor:
        """Write the joining prompts into their rows' caches; the logits (n, vocab) of each prompt's last token."""
        lengths = [len(s.prompt) for s in joining]
        last_logits = torch.empty(len(joining), self.model.vocab_size, device=self.device)
        for chunk_start in range(0, lengths[0], PREFILL_CHUNK):
            n = sum(1 for length in lengths if length > chunk_start)  # a prefix: longest first
            width = min(PREFILL_CHUNK, lengths[0] - chunk_start)
            chunk = torch.zeros(n, width, dtype=torch.long)  # past a prompt's end: padding, never attended to
            for i, sequence in enumerate(joining[:n]):
                piece = sequence.prompt[chunk_start : chunk_start + width]
                chunk[i, : len(piece)] = torch.tensor(piece)
            chunk = chunk.to(self.device)
            rows = slice(first_row, first_row + n)
            ends = [min(lengths[i] - chunk_start, width) - 1 for i in range(n)]  # last prompt token in this chunk
            scoring = [i for i in range(n) if joining[i].score_prompt]
            if scoring:
                logits = self.model.forward(chunk, chunk_start, rows=rows)  # (n, width, vocab)
                self._score_prompts(joining, scoring, chunk, logits, chunk_start)
                last = logits[torch.arange(n, device=self.device), self._index(ends)]
            else:
                last = self.model.forward(chunk, chunk_start, rows=rows, logits_at=self._index(ends))[:, 0]
            ending = [i for i in range(n) if lengths[i] <= chunk_start + width]
            last_logits[self._index(ending)] = last[self._index(ending)]
        return last_logits

    def _score_prompts(self, joining: List[Sequence], scoring: List[int], chunk: torch.Tensor, logits: torch.Tensor, chunk_start: int) -> None:
        """Log-probability of each prompt token after the first, from the chunk's logits (the last one's next is in the next chunk)."""
        width = chunk.shape[1]
        for i in scoring:
            sequence = joining[i]
            # Logits at chunk position j predict prompt token chunk_start + j + 1.
            targets = sequence.prompt[chunk_start + 1 : chunk_start + width + 1]
            if not targets:
                continue
            target = torch.tensor([targets], device=self.device)
            scores = token_logprobs(logits[i : i + 1, : len(targets)], target, ignore_index=-1)[0].tolist()
            sequence.logprobs[chunk_start + 1 : chunk_start + 1 + len(scores)] = scores

    def _sample_and_append(self, batch: List[Sequence], logits: torch.Tensor) -> None:
        """Choose each row's next token (one draw per group of rows that sample alike), score it, and stop rows that end."""
        groups = _groups(batch)
        if len(groups) == 1:  # the usual case: every row samples alike, and no rows need gathering
            sampling = groups[0][0]
            chosen = next_token(logits, sampling.temperature, sampling.top_p, self.generator)
        else:
            chosen = torch.empty(len(batch), dtype=torch.long, device=self.device)
            for sampling, index in groups:
                rows = self._index(index)
                chosen[rows] = next_token(logits[rows], sampling.temperature, sampling.top_p, self.generator)
        chosen = distributed.broadcast_tokens(chosen)
        scored = [i for i, s in enumerate(batch) if s.sampling.logprobs]
        scores: Dict[int, float] = {}
        if scored:
            rows = self._index(scored)
            values = token_logprobs(logits[rows][:, None], chosen[rows][:, None], ignore_index=-1)[:, 0].tolist()
            scores = dict(zip(scored, values))
        for i, (sequence, token) in enumerate(zip(batch, chosen.tolist())):
            if token in self.stop_ids:
                sequence.finish_reason = "stop"
            else:
                sequence.tokens.append(token)
                if sequence.sampling.logprobs:
                    sequence.logprobs.append(scores[i])
                keep = None if sequence.stop_check is None else sequence.stop_check(sequence.generated)
                if keep is not None:
                    sequence.keep_generated(keep)
                    sequence.finish_reason = "stop"
                elif len(sequence.tokens) >= sequence.max_len:
                    sequence.finish_reason = "length"
        for sequence in [s for s in batch if s.finished]:
            self._release(sequence)

    def _index(self, indices: List[int]) -> torch.Tensor:
        return torch.tensor(indices, dtype=torch.long, device=self.device)

    def _release(self, sequence: Sequence) -> None:
        """Free a sequence's row: the last running row moves into it, so the rows in use stay the first ones."""
        row = self.running.index(sequence)
        last = self.running.pop()
        if last is not sequence:
            self.running[row] = last
            self._move_row(last.row, row, len(last.tokens))
            last.row = row
        sequence.row = -1

    def _move_row(self, src: int, dst: int, length: int) -> None:
        for layer in self.model.layers:
            cache = layer.attention.cache
            cache.k[dst, :, :length] = cache.k[src, :, :length]
            cache.v[dst, :, :length] = cache.v[src, :, :length]


def _groups(batch: Seq[Sequence]) -> List[Tuple[Sampling, List[int]]]:
    """Rows that sample alike, each group once: one draw from the generator per group and step."""
    groups: Dict[Tuple[float, float], Tuple[Sampling, List[int]]] = {}
    for i, sequence in enumerate(batch):
        key = (sequence.sampling.temperature, sequence.sampling.top_p)
        groups.setdefault(key, (sequence.sampling, []))[1].append(i)
    return list(groups.values())
