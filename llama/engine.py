"""The decode engine: a batch whose rows are sequences with their own positions, joining and leaving between steps.

Knows token ids and tensors, not text or dialogs. Each ``step`` runs one decode step for the rows already decoding
and at most one prefill chunk for a group of joining prompts, so a long prompt is prefilled over several steps
while the running rows keep getting a token per step. Prompts that join together are prefilled together, one
forward per chunk, whatever their lengths.

How the KV-cache rows are laid out (every forward reads a contiguous block of rows):
- rows [0, len(decoding)) hold the decoding sequences, ``decoding[i]`` in row i, so a decode step reads the first
  rows, as the compiled step expects; when one finishes, the last decoding row moves into its row;
- the group being prefilled holds rows [prefill_row, prefill_row + len(prefilling)), above the decoding rows,
  shortest prompt first: the rows still inside their prompt at any chunk are then the group's last ones, a
  contiguous block. A row whose prompt is done joins the decoding block (moved down to row len(decoding) when
  decoding rows left meanwhile); the rows in between are free.

On CUDA (``overlap``) a decode step's tokens are read on the host one step late: step N+1 is launched with step N's
tokens as they lie on the device, and only then are step N's copied tokens read, appended and checked for stops, so
the GPU never waits for the host between steps. A row that step N finishes was given one more step, whose token is
dropped; its KV write lands in its own row before anything else takes it (one stream).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence as Seq, Tuple

import torch

from llama import distributed
from llama.decode_step import DecodeStep, attention_span
from llama.model import Transformer
from llama.sampling import apply_penalties, next_token, token_logprobs, top_logprobs

PREFILL_CHUNK = 512  # default prompt positions per prefill forward: bounds activation and logits memory, and a step's time
MAX_TOP_LOGPROBS = 20  # as OpenAI's API

@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a sequence picks its tokens: temperature 0 is greedy; logprobs scores each token it returns.

    Log-probabilities (``logprobs``, ``top_logprobs``) are the model's own: log_softmax of its logits, before
    penalties and temperature. ``top_logprobs`` (0 to 20): also keep the k most likely tokens at each generated
    position. ``presence_penalty``, ``frequency_penalty``: OpenAI's, over the tokens generated so far (not the
    prompt): ``logits[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t]`` before temperature
    and top-p. ``seed``: the sequence draws from a generator of its own seeded with it, so its tokens do not depend
    on the other rows of the batch; without one it draws from the engine's generator.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int):
            raise TypeError(f"Sampling.top_logprobs must be an int, got {type(self.top_logprobs).__name__} {self.top_logprobs!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"Sampling.top_logprobs={self.top_logprobs} is out of range; expected 0 to {MAX_TOP_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Sampling.{name} must be a finite number, got {value!r}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise TypeError(f"Sampling.seed must be an int or None, got {type(self.seed).__name__} {self.seed!r}")
            if not -(2**63) <= self.seed < 2**64:
                raise ValueError(f"Sampling.seed={self.seed} is out of range; expected -2**63 <= seed < 2**64")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


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
    # "stop" (a stop token, not kept in tokens, or stop_check), "length", or "cancelled" (Engine.cancel)
    finish_reason: Optional[str] = None
    row: int = -1  # its KV-cache row while it holds one (prefilling or decoding)
    # With sampling.top_logprobs = k: per generated token, the k (token id, log-probability) most likely, most likely first.
    top_logprobs: List[List[Tuple[int, float]]] = dataclasses.field(default_factory=list)

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
        del self.top_logprobs[n:]


@dataclasses.dataclass(eq=False)
class _Choice:
    """One forward's chosen tokens for a batch of rows: on the device, and copied (or being copied) to the host."""

    batch: List[Sequence]
    chosen: torch.Tensor  # (bsz,) on the device
    scored: List[int]  # rows whose host["scores"] holds their token's log-probability
    asking: List[int]  # rows whose host["top_ids"], host["top_values"] hold their top log-probabilities
    host: Dict[str, torch.Tensor]
    copied: Optional[torch.cuda.Event]  # when the host copies are done; None when they already are


class Engine:
    """Runs sequences on a model whose KV caches hold ``max_batch_size`` rows of ``max_seq_len`` positions.

    Not thread-safe: call ``add``, ``step`` and ``cancel`` from one thread. Under model parallelism every rank must
    make the same calls in the same order (rank 0's sampled tokens are broadcast; the schedule is not).
    """

    def __init__(
        self,
        model: Transformer,
        stop_ids: Iterable[int],
        generator: Optional[torch.Generator] = None,
        decode: Optional[DecodeStep] = None,
        prefill_chunk: Optional[int] = None,
        overlap: Optional[bool] = None,
    ) -> None:
        """``decode`` replaces the model's eager decode step (``compile_decode_step``); ``prefill_chunk``: prompt
        positions prefilled per step (default ``PREFILL_CHUNK``); ``overlap``: read each decode step's tokens after
        launching the next (default: on CUDA, where the device runs ahead of the host; see the module's docstring)."""
        prefill_chunk = PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive int, got {prefill_chunk!r}")
        self.model = model
        self.decode = decode
        self.stop_ids = frozenset(stop_ids)
        self.generator = generator
        self.prefill_chunk = prefill_chunk
        self.device = model.output.weight.device
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        self.waiting: List[Sequence] = []  # queued, no row yet
        self.decoding: List[Sequence] = []  # decoding[i] owns KV-cache row i
        self.prefilling: List[Sequence] = []  # the joining group, shortest prompt first: prefilling[j] owns row prefill_row + j
        self.prefill_row = 0
        self.prefill_pos = 0  # prompt positions already in the caches of every prefilling row
        self._generators: Dict[Sequence, torch.Generator] = {}  # seeded sequences' own
        self._counts: Dict[Sequence, torch.Tensor] = {}  # penalized sequences' generated-token counts, (vocab,) float32
        self._launched: Optional[_Choice] = None  # with overlap: the last decode step, its tokens not yet read
        self._one = torch.ones(1, device=self.device)  # a count to add

    @property
    def max_batch_size(self) -> int:
        return self.model.params.max_batch_size

    @property
    def running(self) -> List[Sequence]:
        """Every sequence holding a row: those decoding, then those being prefilled."""
        return self.decoding + self.prefilling

    def add(self, sequence: Sequence) -> None:
        """Queue a sequence; it joins the batch at a later ``step`` when a row is free."""
        if not 0 < len(sequence.prompt) <= sequence.max_len <= self.model.params.max_seq_len:
            raise ValueError(f"a sequence needs 0 < prompt ({len(sequence.prompt)}) <= max_len ({sequence.max_len}) <= max_seq_len")
        if len(sequence.prompt) == sequence.max_len and not sequence.score_prompt:
            sequence.finish_reason = "length"  # nothing to generate or score: no forward needed
            return
        sampling = sequence.sampling
        if sampling.seed is not None and sampling.temperature > 0:  # greedy never draws
            self._generators[sequence] = torch.Generator(device=self.device).manual_seed(sampling.seed)
        if sampling.penalized:
            self._counts[sequence] = torch.zeros(self.model.vocab_size, device=self.device)
        self.waiting.append(sequence)

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence now, whether it waits, is being prefilled or decodes (a client gone); its row is free for the next step."""
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        elif sequence in self.decoding:
            self._release(sequence)
        elif sequence in self.prefilling:
            self._drop_prefilling(sequence)
        self._forget(sequence)
        if sequence.finish_reason is None:
            sequence.finish_reason = "cancelled"
        self._drop_finished_launch()

    def run(self, sequences: Iterable[Sequence]) -> None:
        """Run sequences to the end, ``max_batch_size`` at a time; a finished one's row goes to the next waiting."""
        for sequence in sequences:
            self.add(sequence)
        while self.waiting or self.running:
            self.step()

    @torch.inference_mode()
    def step(self) -> List[Sequence]:
        """Advance every decoding row by one token and prefill one chunk of the joining prompts (admitting waiting
        sequences into the free rows when no group is being prefilled).

        Returns the sequences that got a token (or finished) in this step; one still inside its prompt is not among them.
        """
        if not self.prefilling and self.waiting and len(self.decoding) < self.max_batch_size:
            self._admit()
        stepped: List[Sequence] = []
        if self.decoding:
            previous, self._launched = self._launched, self._launch_decode(self._launched)
            if previous is not None:  # read while the step just launched runs
                stepped = self._resolve(previous)
            if not self.overlap and self._launched is not None:
                stepped, self._launched = self._resolve(self._launched), None
        if self.prefilling:
            stepped += self._prefill_step()
        self._drop_finished_launch()
        return stepped

    def _launch_decode(self, previous: Optional[_Choice]) -> Optional[_Choice]:
        """Launch one decode step for every decoding row; a row of ``previous`` (launched, not yet read) takes its
        token from there on the device. None when every row is sure to end with ``previous`` (its length reached)."""
        batch = list(self.decoding)
        chained = {} if previous is None else {id(s): i for i, s in enumerate(previous.batch)}  # last token still on the device
        if chained and all(id(s) in chained and len(s.tokens) + 1 >= s.max_len for s in batch):
            return None
        # A chained row's last token is previous's choice, one past the host's tokens.
        positions = [len(s.tokens) - (id(s) not in chained) for s in batch]
        last = self._last_tokens(batch, previous, chained)[:, None]  # (bsz, 1)
        if self.decode is not None:
            logits = self.decode(last, self._upload(positions), attention_span(max(positions) + 1, self.model.params.max_seq_len))
        else:  # eager: attention reads only the positions written so far
            start = positions[0] if len(set(positions)) == 1 else self._upload(positions)
            logits = self.model.forward(last, start, kv_len=max(positions) + 1)[:, -1]  # (bsz, vocab)
        return self._choose_and_copy(batch, logits)

    def _last_tokens(self, batch: List[Sequence], previous: Optional[_Choice], chained: Dict[int, int]) -> torch.Tensor:
        """Each row's input token (bsz,) on the device: ``previous``'s choice for a chained row, else its last host token."""
        if previous is not None and previous.batch == batch:  # the usual step: the same rows in the same order
            return previous.chosen
        last = self._upload([0 if id(s) in chained else s.tokens[-1] for s in batch])
        pairs = [(row, chained[id(s)]) for row, s in enumerate(batch) if id(s) in chained]
        if pairs:
            assert previous is not None
            rows, sources = zip(*pairs)
            last[self._upload(list(rows))] = previous.chosen[self._upload(list(sources))]
        return last

    def _admit(self) -> None:
        """Give as many waiting sequences as there are free rows the rows above the decoding ones, shortest prompt first."""
        free = self.max_batch_size - len(self.decoding)
        joining, self.waiting = self.waiting[:free], self.waiting[free:]
        joining.sort(key=lambda s: len(s.prompt))  # stable: equal lengths keep their arrival order
        self.prefill_row, self.prefill_pos = len(self.decoding), 0
        for j, sequence in enumerate(joining):
            sequence.row = self.prefill_row + j
        self.prefilling = joining

    def _prefill_step(self) -> List[Sequence]:
        """Prefill the next chunk of the joining prompts; those that end in it sample their first token and join the decoding rows."""
        group, start = self.prefilling, self.prefill_pos
        lengths = [len(s.prompt) for s in group]  # ascending, each > start
        width = min(self.prefill_chunk, lengths[-1] - start)
        chunk = torch.zeros(len(group), width, dtype=torch.long)  # past a prompt's end: padding, never attended to
        for i, sequence in enumerate(group):
            piece = sequence.prompt[start : start + width]
            chunk[i, : len(piece)] = torch.tensor(piece)
        ends = [min(length - start, width) - 1 for length in lengths]  # last prompt token in this chunk
        rows = slice(self.prefill_row, self.prefill_row + len(group))
        last_logits = self._prefill(self._upload(chunk), start, rows, self._upload(ends))  # (n, vocab)
        self.prefill_pos = start + width
        done = sum(1 for length in lengths if length <= self.prefill_pos)  # a prefix: shortest first
        finishing, self.prefilling = group[:done], group[done:]
        self.prefill_row += done
        for sequence in finishing:  # into the decoding block, which ends at or below their rows
            row = len(self.decoding)
            if sequence.row != row:
                self._move_row(sequence.row, row, len(sequence.prompt))
                sequence.row = row
            self.decoding.append(sequence)
        to_generate = [i for i, s in enumerate(finishing) if len(s.tokens) < s.max_len]
        if to_generate:
            batch = [finishing[i] for i in to_generate]
            self._resolve(self._choose_and_copy(batch, last_logits[self._upload(to_generate)]))
        for sequence in finishing:
            if not sequence.finished and len(sequence.tokens) >= sequence.max_len:  # scored its prompt, nothing to generate
                sequence.finish_reason = "length"
                self._release(sequence)
        return finishing

    def _prefill(self, chunk: torch.Tensor, start: int, rows: slice, ends: torch.Tensor) -> torch.Tensor:
        """Write one chunk (n, width) of the prefilling prompts at ``start`` into their rows; the logits (n, vocab) at ``ends``."""
        scoring = [i for i, s in enumerate(self.prefilling) if s.score_prompt]
        if not scoring:
            return self.model.forward(chunk, start, rows=rows, logits_at=ends)[:, 0]
        logits = self.model.forward(chunk, start, rows=rows)  # (n, width, vocab)
        self._score_prompts(scoring, chunk, logits, start)
        return logits[torch.arange(chunk.shape[0], device=self.device), ends]

    def _score_prompts(self, scoring: List[int], chunk: torch.Tensor, logits: torch.Tensor, chunk_start: int) -> None:
        """Log-probability of each prompt token after the first, from the chunk's logits (the last one's next is in the next chunk)."""
        width = chunk.shape[1]
        for i in scoring:
            sequence = self.prefilling[i]
            # Logits at chunk position j predict prompt token chunk_start + j + 1.
            targets = sequence.prompt[chunk_start + 1 : chunk_start + width + 1]
            if not targets:
                continue
            target = self._upload([targets])
            scores = token_logprobs(logits[i : i + 1, : len(targets)], target, ignore_index=-1)[0].tolist()
            sequence.logprobs[chunk_start + 1 : chunk_start + 1 + len(scores)] = scores

    def _choose_and_copy(self, batch: List[Sequence], logits: torch.Tensor) -> _Choice:
        """Choose each row's next token and score it on the device, and start copying both to the host.
        logits: (bsz, vocab), the model's own."""
        chosen = distributed.broadcast_tokens(self._choose(batch, logits))
        on_device: Dict[str, torch.Tensor] = {"chosen": chosen}
        scored = [i for i, s in enumerate(batch) if s.sampling.logprobs]
        if scored:
            rows = self._upload(scored)
            on_device["scores"] = token_logprobs(logits[rows][:, None], chosen[rows][:, None], ignore_index=-1)[:, 0]
        asking = [i for i, s in enumerate(batch) if s.sampling.top_logprobs]
        if asking:
            k = min(max(batch[i].sampling.top_logprobs for i in asking), logits.shape[-1])
            on_device["top_values"], on_device["top_ids"] = top_logprobs(logits[self._upload(asking)], k)
        for i, sequence in enumerate(batch):
            counts = self._counts.get(sequence)
            if counts is not None:  # a stop token counted too is harmless: its row ends
                counts.index_add_(0, chosen[i : i + 1], self._one)
        return _Choice(batch, chosen, scored, asking, *self._copy_to_host(on_device))

    def _copy_to_host(self, tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[torch.cuda.Event]]:
        """Start copying tensors to the host; with an event to wait on where the copy runs behind (CUDA)."""
        if self.device.type != "cuda":
            return {name: t.cpu() for name, t in tensors.items()}, None
        host = {name: t.to("cpu", non_blocking=True) for name, t in tensors.items()}
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))  # the model's device, which need not be the current one
        return host, copied

    def _resolve(self, choice: _Choice) -> List[Sequence]:
        """Read a launched choice on the host: append each row's token and score, and stop rows that end.
        Rows finished meanwhile (cancelled, or ended by the step before) are skipped; returns the others."""
        if choice.copied is not None:
            choice.copied.synchronize()  # this choice's copy only, not the steps launched after it
        host = choice.host
        scores = dict(zip(choice.scored, host["scores"].tolist())) if choice.scored else {}
        tops: Dict[int, List[Tuple[int, float]]] = {}
        if choice.asking:
            for i, row_ids, row_values in zip(choice.asking, host["top_ids"].tolist(), host["top_values"].tolist()):
                n = choice.batch[i].sampling.top_logprobs
                tops[i] = list(zip(row_ids[:n], row_values[:n]))
        stepped = []
        for i, (sequence, token) in enumerate(zip(choice.batch, host["chosen"].tolist())):
            if sequence.finished:
                continue
            stepped.append(sequence)
            if token in self.stop_ids:
                sequence.finish_reason = "stop"
                continue
            sequence.tokens.append(token)
            if sequence.sampling.logprobs:
                sequence.logprobs.append(scores[i])
            if i in tops:
                sequence.top_logprobs.append(tops[i])
            keep = None if sequence.stop_check is None else sequence.stop_check(sequence.generated)
            if keep is not None:
                sequence.keep_generated(keep)
                sequence.finish_reason = "stop"
            elif len(sequence.tokens) >= sequence.max_len:
                sequence.finish_reason = "length"
        for sequence in [s for s in stepped if s.finished]:
            self._release(sequence)
        return stepped

    def _drop_finished_launch(self) -> None:
        """Forget a launched step all of whose rows have ended: nothing is left to read from it."""
        if self._launched is not None and all(s.finished for s in self._launched.batch):
            self._launched = None

    def _choose(self, batch: List[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """(bsz,) next tokens: penalties applied where asked, then one draw per group of rows that sample alike
        (from the engine's generator), or per row for a seeded row (from its own)."""
        penalized = [i for i, s in enumerate(batch) if s in self._counts]
        if penalized:
            rows = self._upload(penalized)
            counts = torch.stack([self._counts[batch[i]] for i in penalized])  # (n, vocab)
            presence = self._upload([batch[i].sampling.presence_penalty for i in penalized], torch.float32)
            frequency = self._upload([batch[i].sampling.frequency_penalty for i in penalized], torch.float32)
            logits = logits.clone()  # the scores stay the model's own
            logits[rows] = apply_penalties(logits[rows], counts, presence, frequency)
        groups = self._groups(batch)
        if len(groups) == 1:  # the usual case: every row samples alike, and no rows need gathering
            sampling, generator, _ = groups[0]
            return next_token(logits, sampling.temperature, sampling.top_p, generator)
        chosen = torch.empty(len(batch), dtype=torch.long, device=self.device)
        for sampling, generator, index in groups:
            rows = self._upload(index)
            chosen[rows] = next_token(logits[rows], sampling.temperature, sampling.top_p, generator)
        return chosen

    def _groups(self, batch: Seq[Sequence]) -> List[Tuple[Sampling, Optional[torch.Generator], List[int]]]:
        """Rows that sample alike, each group once, with the generator it draws from: a seeded row is a group of its own."""
        groups: Dict[object, Tuple[Sampling, Optional[torch.Generator], List[int]]] = {}
        for i, sequence in enumerate(batch):
            own = self._generators.get(sequence)
            key: object = (sequence.sampling.temperature, sequence.sampling.top_p) if own is None else ("seeded", i)
            groups.setdefault(key, (sequence.sampling, self.generator if own is None else own, []))[2].append(i)
        return list(groups.values())

    def _upload(self, values: object, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Numbers (a list, nested lists or a CPU tensor) as a tensor on the device. On CUDA the copy goes from pinned
        memory, so the host does not wait for the device's queued work, as a copy from pageable memory does."""
        tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _release(self, sequence: Sequence) -> None:
        """Free a decoding sequence's row: the last decoding row moves into it, so the decoding rows stay the first ones."""
        row = self.decoding.index(sequence)
        last = self.decoding.pop()
        if last is not sequence:
            self.decoding[row] = last
            self._move_row(last.row, row, len(last.tokens))
            last.row = row
        sequence.row = -1
        self._forget(sequence)

    def _drop_prefilling(self, sequence: Sequence) -> None:
        """Free a prefilling sequence's row: the group's shorter prompts before it move up one row, so the rows still
        inside their prompt stay contiguous and shortest first."""
        j = self.prefilling.index(sequence)
        for other in reversed(self.prefilling[:j]):
            self._move_row(other.row, other.row + 1, self.prefill_pos)
            other.row += 1
        del self.prefilling[j]
        self.prefill_row += 1
        sequence.row = -1

    def _forget(self, sequence: Sequence) -> None:
        self._generators.pop(sequence, None)
        self._counts.pop(sequence, None)

    def _move_row(self, src: int, dst: int, length: int) -> None:
        for layer in self.model.layers:
            cache = layer.attention.cache
            cache.k[dst, :, :length] = cache.k[src, :, :length]
            cache.v[dst, :, :length] = cache.v[src, :, :length]
