"""The worker that owns the engine: admits requests between steps, steps, and hands each request its text chunks.

One thread per process runs it. On rank 0 requests arrive from the HTTP event loop through a bounded FIFO queue, and
each step's changes (new sequences, cancellations) go to every other rank first, so that all ranks step alike.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from llama import distributed, engine
from llama.errors import DistributedError
from llama.generation import Llama
from llama.rows import Row
from llama.text_stream import TextStream

logger = logging.getLogger(__name__)

Key = Tuple[int, int]  # (job id, choice index): names a sequence on every rank
HEARTBEAT_S = 1.0  # idle rank 0 tells the other ranks it is alive this often (they wait in a collective meanwhile)


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """One sequence to generate, as every rank receives it: plain values only (it is pickled to the other ranks)."""

    index: int  # of its choice in the response
    prompt: List[int]
    max_len: int  # prompt plus generated tokens at most
    sampling: Dict[str, Any]  # engine.Sampling's fields
    stop: List[str]
    echo: bool = False


@dataclasses.dataclass
class Orders:
    """What every rank does next: add these, cancel those, then step (or not, when idle), or shut down."""

    new: List[Tuple[Key, SequenceSpec]] = dataclasses.field(default_factory=list)
    cancel: List[Key] = dataclasses.field(default_factory=list)
    step: bool = False
    shutdown: bool = False


@dataclasses.dataclass
class Finished:
    """The last event of a job that ran to its end: every row's generated-token count, for usage."""

    completion_tokens: int


@dataclasses.dataclass
class Failed:
    """The last event of a job the server could not finish (a failed rank, a bug): what to tell the client."""

    message: str


def make_sampling(fields: Dict[str, Any]) -> engine.Sampling:
    """``engine.Sampling`` of these fields; a field this engine lacks raises TypeError (schemas turn it into a 400)."""
    return engine.Sampling(**fields)


class Job:
    """A request's sequences, and the asyncio queue (of the HTTP loop) that receives its chunks and its end."""

    def __init__(self, specs: List[SequenceSpec], loop: asyncio.AbstractEventLoop, logprobs: bool, top_logprobs: int) -> None:
        self.specs = specs
        self.loop = loop
        self.events: "asyncio.Queue[Any]" = asyncio.Queue()
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.id = -1  # set by submit
        self.remaining = len(specs)  # rows not finished yet (worker thread only)
        self.completion_tokens = 0
        self.done = False  # its last event was sent (or it was cancelled)

    def send(self, event: Any) -> None:
        """From the worker thread: put an event on the job's queue, in its loop's thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass


class QueueFull(Exception):
    """No room for a request's sequences in the queue right now."""


class Unavailable(Exception):
    """The scheduler is not running: still loading, failed, or stopped."""


@dataclasses.dataclass
class _Active:
    job: Optional[Job]  # None on ranks other than 0
    row: Row


class Scheduler:
    """Runs the engine in its own thread; ``submit`` and ``cancel`` may be called from any thread."""

    def __init__(self, max_queue: int, prefill_chunk: Optional[int] = None) -> None:
        """``prefill_chunk``: prompt tokens prefilled per step (the engine's default when None)."""
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.llama: Optional[Llama] = None
        self.error: Optional[str] = None  # why it stopped serving, once it has
        self._cond = threading.Condition()
        self._pending: Deque[Tuple[Job, SequenceSpec]] = collections.deque()  # rows waiting for a free row, FIFO
        self._to_cancel: List[Job] = []
        self._stopping = False
        self._ids = itertools.count()
        self._rows: Dict[Key, _Active] = {}  # admitted and not finished (worker thread only)
        self._jobs: Dict[int, Job] = {}  # rank 0: jobs with admitted rows, by id (worker thread only)
        self._engine: Optional[engine.Engine] = None

    # ---- any thread ----

    @property
    def ready(self) -> bool:
        return self.llama is not None and self.error is None

    def load(self) -> Dict[str, int]:
        """Sequences holding a batch row, and those waiting for one (read without the lock: a snapshot)."""
        return {"running": len(self._rows), "queued": len(self._pending)}

    @property
    def capacity(self) -> int:
        """The most sequences that can be running or queued at once."""
        assert self.llama is not None
        return self.llama.model.params.max_batch_size + self.max_queue

    def submit(self, job: Job) -> None:
        """Queue a job's sequences (FIFO); ``QueueFull`` when the queue has no room for them, ``Unavailable`` when not serving."""
        with self._cond:
            if not self.ready or self._stopping:
                raise Unavailable(self.error or "the model is still loading")
            free_rows = self.llama.model.params.max_batch_size - len(self._rows)
            if len(self._pending) + len(job.specs) > self.max_queue + max(free_rows, 0):
                raise QueueFull(f"{len(self._pending)} sequences already wait for a row (at most --max_queue {self.max_queue})")
            job.id = next(self._ids)
            self._pending.extend((job, spec) for spec in job.specs)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (its client has gone) at the next step, wherever its sequences are."""
        with self._cond:
            if not job.done and job.id >= 0:
                job.done = True
                self._to_cancel.append(job)
                self._cond.notify()

    def stop(self) -> None:
        """Finish the worker's loop (after telling the other ranks to stop too)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # ---- the worker thread ----

    def run(self, llama: Llama, on_fatal: Callable[[str], None] = lambda message: None) -> None:
        """Serve until ``stop`` (rank 0) or rank 0's shutdown order (other ranks); on an error, fail every job and
        call ``on_fatal`` with the reason. Holds the Llama's lock throughout: it owns the KV caches."""
        with llama._lock, distributed.using(llama.group):
            self._engine = _new_engine(llama, self.prefill_chunk)
            self.llama = llama
            leader = llama.group.rank == 0
            try:
                with distributed.peer_failures("serving requests"):
                    while True:
                        orders = distributed.broadcast_object(self._orders() if leader else None)
                        assert isinstance(orders, Orders)
                        if orders.shutdown:
                            return
                        self._apply(orders)
                        stepped = self._engine.step() if orders.step else []
                        if leader:
                            self._publish(stepped)
                        else:
                            self._forget_finished()
            except BaseException as e:  # noqa: B036 - every job must hear of it, whatever it is
                self._fail(e, on_fatal)
                if not isinstance(e, Exception):
                    raise

    def _orders(self) -> Orders:
        """Rank 0: wait for work (or a heartbeat's time), then take cancellations and as many queued rows as fit."""
        orders = Orders()
        with self._cond:
            while not (self._pending or self._to_cancel or self._rows or self._stopping):
                if not self._cond.wait(HEARTBEAT_S):
                    return orders  # idle: the other ranks hear from us all the same, before their timeout
            if self._stopping:
                orders.shutdown = True
                return orders
            cancelled = {job.id for job in self._to_cancel}
            self._to_cancel.clear()
            if cancelled:
                self._pending = collections.deque((job, spec) for job, spec in self._pending if job.id not in cancelled)
                orders.cancel = [key for key in self._rows if key[0] in cancelled]
                for job_id in cancelled:
                    self._jobs.pop(job_id, None)
            free = self.llama.model.params.max_batch_size - (len(self._rows) - len(orders.cancel))
            while self._pending and free > 0:
                job, spec = self._pending.popleft()
                orders.new.append(((job.id, spec.index), spec))
                self._jobs[job.id] = job
                free -= 1
        orders.step = len(self._rows) - len(orders.cancel) + len(orders.new) > 0
        return orders

    def _apply(self, orders: Orders) -> None:
        """Every rank: cancel and add the sequences the orders name, in the same order."""
        assert self._engine is not None and self.llama is not None
        for key in orders.cancel:
            active = self._rows.pop(key)
            self._engine.cancel(active.row.sequence)
        decode = self.llama.tokenizer.decode
        for key, spec in orders.new:
            sampling = make_sampling(spec.sampling)
            sequence = engine.Sequence(spec.prompt, spec.max_len, sampling, score_prompt=sampling.logprobs and spec.echo)
            stream = TextStream(decode, spec.stop, context=spec.prompt if spec.echo else ())
            sequence.stop_check = stream
            job = self._jobs.get(key[0]) if self.llama.group.rank == 0 else None
            self._rows[key] = _Active(job, Row(spec.index, sequence, stream, spec.echo))  # type: ignore[arg-type]
            self._engine.add(sequence)

    def _forget_finished(self) -> None:
        for key in [key for key, active in self._rows.items() if active.row.sequence.finished]:
            del self._rows[key]

    def _publish(self, stepped: List[engine.Sequence]) -> None:
        """Rank 0: each stepped (or finished) row's new text to its job; a job whose rows all ended gets ``Finished``."""
        assert self.llama is not None
        stepped_ids = {id(sequence) for sequence in stepped}
        decode = self.llama.tokenizer.decode
        for key, active in list(self._rows.items()):
            sequence = active.row.sequence
            if id(sequence) not in stepped_ids and not sequence.finished:
                continue
            job, row = active.job, active.row
            first = 0 if row.echo and not row.prompt_sent else len(sequence.prompt) + row.stream.sent_tokens
            chunk = row.chunk(job.logprobs, decode)
            if chunk is not None and not job.done:
                if job.top_logprobs and "tokens" in chunk:
                    top = getattr(sequence, "top_logprobs", [])
                    positions = range(first, first + len(chunk["tokens"]))
                    n_prompt = len(sequence.prompt)
                    chunk["top_logprobs"] = [  # type: ignore[typeddict-unknown-key]
                        [(decode([t]), lp) for t, lp in top[i - n_prompt]] if n_prompt <= i < n_prompt + len(top) else None
                        for i in positions
                    ]
                job.send(chunk)
            if sequence.finished:
                del self._rows[key]
                job.completion_tokens += len(sequence.generated)
                job.remaining -= 1
                if job.remaining == 0:
                    self._jobs.pop(job.id, None)
                    if not job.done:
                        job.done = True
                        job.send(Finished(job.completion_tokens))

    def _fail(self, error: BaseException, on_fatal: Callable[[str], None]) -> None:
        """Stop serving: every waiting and running job hears why, and so does ``on_fatal``."""
        rank = distributed.rank()
        if isinstance(error, DistributedError):
            message = f"the server stopped: {error}"
        else:
            message = f"the server stopped: rank {rank} failed while generating: {type(error).__name__}: {error}"
        logger.error("%s", message, exc_info=not isinstance(error, DistributedError))
        with self._cond:
            self.error = message
            jobs = {id(job): job for job, _ in self._pending}
            jobs.update({id(active.job): active.job for active in self._rows.values() if active.job is not None})
            self._pending.clear()
            self._rows.clear()
        for job in jobs.values():
            if not job.done:
                job.done = True
                job.send(Failed(message))
        on_fatal(message)


def _new_engine(llama: Llama, prefill_chunk: Optional[int]) -> engine.Engine:
    return engine.Engine(llama.model, llama.tokenizer.stop_ids, llama.generator, llama._decode, prefill_chunk)
