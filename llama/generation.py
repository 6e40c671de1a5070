"""``Llama``: Meta's public API (``build``, ``generate``, ``text_completion``, ``chat_completion``) over the pieces beside it."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from llama import decode_step, devices, distributed, engine
from llama.chat_format import (
    UNSAFE_ERROR,
    ChatPrediction,
    CompletionPrediction,
    ChatFormat,
    Dialog,
    chat_format_for,
)
from llama.errors import InputError
from llama.loading import load_model
from llama.demo import demo_checkpoint
from llama.memory import parameter_count, reuse_freed_memory
from llama.model import Transformer
from llama.quantize import check_kind
from llama.rows import Row
from llama.text_stream import StreamChunk, TextStream
from llama.tokenizer import BaseTokenizer
from llama.validation import batch_of_token_lists, to_bool, to_float, to_int, to_list, to_stop_strings, to_token_ids

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


class Llama:
    @staticmethod
    def build(
        ckpt_dir: Optional[PathLike] = None,
        tokenizer_path: Optional[PathLike] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        quantize: Optional[str] = None,
        compile: Union[bool, str] = False,
    ) -> "Llama":
        """Load a checkpoint folder (of any shard count) onto this process's model-parallel rank.

        ``ckpt_dir`` None loads the small demo model bundled with the package; ``tokenizer_path`` None, the
        tokenizer in the checkpoint folder. Works under torchrun or from a plain ``python`` process (a group of one). ``device`` defaults to
        ``cuda:LOCAL_RANK``, else ``mps``, else ``cpu``; ``dtype`` to the fastest the device computes well.
        ``quantize`` ("int8", "int4") quantizes the linear weights as they load; a checkpoint written by
        ``python -m llama.quantize`` loads quantized without it. ``compile`` runs the decode step through
        ``torch.compile`` (compiled once, at the first generation; True or "default", or "max-autotune", which
        compiles slower and runs faster on CPUs with AMX; see the README for when each pays).
        """
        if ckpt_dir is None:
            ckpt_dir = demo_checkpoint()
            logger.info("no checkpoint given: running the small demo model bundled with the package (%s)", ckpt_dir)
        ckpt_dir = _path("ckpt_dir", ckpt_dir)
        tokenizer_path = None if tokenizer_path is None else _path("tokenizer_path", tokenizer_path)
        max_seq_len = to_int("max_seq_len", max_seq_len, 1)
        max_batch_size = to_int("max_batch_size", max_batch_size, 1)
        if model_parallel_size is not None:
            model_parallel_size = to_int("model_parallel_size", model_parallel_size, 1)
        compile = decode_step.compile_mode(compile)
        seed = to_int("seed", seed, -(2**63))
        if seed >= 2**64:
            raise InputError(f"seed must be below 2**64, got {seed}")
        quantize = check_kind(quantize)
        start_time = time.time()
        run_device = devices.resolve_device(device)
        run_dtype = devices.resolve_dtype(dtype, run_device)
        distributed.init_process_group(run_device)
        n_ranks = distributed.init_model_parallel(model_parallel_size)
        distributed.silence_stdout_off_rank0()

        error: Optional[BaseException] = None
        try:
            model, tokenizer = load_model(
                ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, n_ranks, run_device, run_dtype, quantize, compile is not None
            )
        except Exception as e:  # every rank must learn of it, or the others wait for this one forever
            error = e
        distributed.raise_if_any_rank_failed(error, "loading the checkpoint", run_device)
        if run_device.type == "cpu":
            reuse_freed_memory()
        params = model.params
        # The largest decode-step tensor: a batch of float32 logits for this rank's share of the vocabulary.
        with distributed.peer_failures("setting up the model-parallel collectives"):
            group = distributed.setup_collectives(run_device, 4 * params.max_batch_size * max(params.dim, params.vocab_size // n_ranks))
        if distributed.rank() == 0:
            logger.info(
                "loaded %s: %s parameters in %s on %s, %d process%s, in %.2f seconds", ckpt_dir, _count(parameter_count(params)),
                str(run_dtype).removeprefix("torch."), run_device, n_ranks, "" if n_ranks == 1 else "es", time.time() - start_time,
            )
        return Llama(model, tokenizer, seed=seed, group=group, compile=compile)

    def __init__(
        self,
        model: Transformer,
        tokenizer: BaseTokenizer,
        seed: int = 1,
        group: Optional[distributed.ModelParallelGroup] = None,
        compile: Union[bool, str, None] = False,
    ) -> None:
        """``group`` defaults to the model-parallel group set up last; ``build`` passes the one it set up for this model.
        ``compile`` runs decode steps through ``torch.compile`` (compiled at the first step), as in ``build``."""
        self.model = model
        # Each Llama keeps its group, so building another of a different model-parallel size leaves this one working.
        self.group = distributed.active_group() if group is None else group
        self.tokenizer = tokenizer
        self.chat_format: ChatFormat = chat_format_for(tokenizer)
        self.device = model.output.weight.device
        # A generator of our own: user code drawing random numbers cannot shift what is sampled.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # The KV caches and the generator are shared state: calls from several threads run one at a time.
        self._lock = threading.RLock()
        mode = decode_step.compile_mode(compile)
        self._decode = None if mode is None else decode_step.compile_decode_step(model, mode)

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to max_gen_len tokens, stopping a row at a stop token (EOS).

        Returns the generated tokens (with the prompt if echo) and, if logprobs, each token's log-probability
        (0.0 for the first token of an echoed prompt, which nothing predicts). More prompts than max_batch_size
        share the batch: a waiting prompt takes the row of one that finished. Calls from several threads run one
        at a time.
        """
        prompt_tokens = _read_once(prompt_tokens)
        with self._call(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo):
            batch = batch_of_token_lists("prompt_tokens", prompt_tokens)
            prompts = [to_token_ids(f"prompt_tokens[{i}]", p, self.model.vocab_size) for i, p in enumerate(batch)]
            rows = self._rows(prompts, max_gen_len, temperature, top_p, logprobs, echo, lambda i: f"prompt_tokens[{i}]")
            self._run_to_end(rows)
            return [row.tokens for row in rows], ([row.logprobs for row in rows] if logprobs else None)

    def _rows(
        self,
        prompts: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        name: Callable[[int], str],
        stop: object = None,
        streaming: bool = False,
    ) -> List[Row]:
        """One row per checked prompt, ready to run; ``name(i)`` says where prompt i came from, for errors."""
        max_gen_len = to_int("max_gen_len", max_gen_len, 0)
        temperature = to_float("temperature", temperature, 0.0, hint=" (0 is greedy)")
        top_p = to_float("top_p", top_p, 0.0, 1.0, above_minimum=True)
        logprobs, echo = to_bool("logprobs", logprobs), to_bool("echo", echo)
        stop_strings = to_stop_strings(stop)
        self._check_prompt_lengths(prompts, name)
        max_seq_len = self.model.params.max_seq_len
        sampling = engine.Sampling(temperature, top_p, logprobs)
        rows = []
        for prompt in prompts:
            sequence = engine.Sequence(prompt, min(max_seq_len, len(prompt) + max_gen_len), sampling, score_prompt=logprobs and echo)
            stream = None
            if stop_strings or streaming:  # text as it grows costs a decode per token: only when asked for
                stream = TextStream(self.tokenizer.decode, stop_strings, context=prompt if echo else ())
                sequence.stop_check = stream
            rows.append(Row(len(rows), sequence, stream, echo))
        return rows

    def _steps(self, rows: List[Row]) -> Iterator[List[Row]]:
        """Run the rows on a fresh engine; after each step, the rows that got a token or finished."""
        by_sequence = {id(row.sequence): row for row in rows}
        runner = engine.Engine(self.model, self.tokenizer.stop_ids, self.generator, self._decode)
        started = time.perf_counter()
        with distributed.peer_failures("generating"):
            for row in rows:
                runner.add(row.sequence)
            yield [row for row in rows if row.sequence.finished]
            while runner.waiting or runner.running:
                yield [by_sequence[id(sequence)] for sequence in runner.step()]
        for row in rows:
            row.finish()
        seconds = time.perf_counter() - started
        if rows and distributed.rank() == 0:
            n_tokens = sum(len(row.sequence.generated) for row in rows)
            logger.info("generated %d tokens in %.2f seconds (%.1f tokens/s)", n_tokens, seconds, n_tokens / max(seconds, 1e-9))

    def _run_to_end(self, rows: List[Row]) -> None:
        for _ in self._steps(rows):
            pass

    def _stream(self, rows: List[Row], logprobs: bool) -> Iterator[StreamChunk]:
        """Chunks of new text per row, as the steps make it."""
        for stepped in self._steps(rows):
            for row in stepped:
                chunk = row.chunk(logprobs, self.tokenizer.decode)
                if chunk is not None:
                    yield chunk

    def _check_prompt_lengths(self, prompts: Sequence[Sequence[int]], name: Callable[[int], str]) -> None:
        max_seq_len = self.model.params.max_seq_len
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise InputError(f"{name(i)} is empty: each prompt needs at least one token (BOS)")
            if len(prompt) > max_seq_len:
                raise InputError(
                    f"{name(i)} has {len(prompt)} tokens, which exceeds max_seq_len={max_seq_len}; "
                    "pass a larger max_seq_len to Llama.build or shorten the prompt"
                )

    @contextlib.contextmanager
    def _call(self, *arguments: object) -> Iterator[None]:
        """One call at a time on this object, on its model-parallel group, after every rank is seen to pass the same arguments.

        Compared before any check, so that a value one rank alone refuses fails every rank at once, not only that one.
        """
        with self._lock, distributed.using(self.group):
            distributed.check_same_inputs("prompts or sampling arguments", _fingerprint(arguments))
            yield

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        stop: Union[str, Sequence[str], None] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt; max_gen_len defaults to max_seq_len - 1.

        ``stop`` strings end a row where its text first holds one; the text ends before it, and the tokens and
        logprobs are those wholly before it.
        """
        prompts = _read_once(prompts)
        with self._call(prompts, temperature, top_p, max_gen_len, logprobs, echo, stop):
            rows = self._completion_rows(prompts, temperature, top_p, max_gen_len, logprobs, echo, stop)
            self._run_to_end(rows)
            predictions: List[CompletionPrediction] = []
            for row in rows:
                prediction: CompletionPrediction = {"generation": row.text(self.tokenizer.decode)}
                if logprobs:
                    prediction["tokens"] = [self.tokenizer.decode([x]) for x in row.tokens]
                    prediction["logprobs"] = row.logprobs
                predictions.append(prediction)
            return predictions

    def stream_text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        stop: Union[str, Sequence[str], None] = None,
    ) -> Iterator[StreamChunk]:
        """``text_completion`` as it is generated: chunks of new text per prompt (see ``StreamChunk``).

        A row's chunks joined are its ``text_completion`` generation. Arguments are checked at the first ``next``;
        the object is busy until the iterator is exhausted or closed, and under torchrun every rank reads it alike.
        """
        prompts = _read_once(prompts)
        with self._call(prompts, temperature, top_p, max_gen_len, logprobs, echo, stop):
            rows = self._completion_rows(prompts, temperature, top_p, max_gen_len, logprobs, echo, stop, streaming=True)
            yield from self._stream(rows, logprobs)

    def _completion_rows(
        self, prompts: object, temperature: float, top_p: float, max_gen_len: Optional[int], logprobs: bool, echo: bool, stop: object,
        streaming: bool = False,
    ) -> List[Row]:
        prompts = to_list("prompts", prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}: {prompt!r:.80}")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self._encode(f"prompts[{i}]", x) for i, x in enumerate(prompts)]
        name = lambda i: f"prompts[{i}] (once encoded)"  # noqa: E731
        return self._rows(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, name, stop, streaming)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        stop: Union[str, Sequence[str], None] = None,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in the checkpoint's chat format; max_gen_len defaults to max_seq_len - 1.

        Llama 2's format ([INST] tags) refuses a dialog that contains its own tags, as the reference does: the dialog is
        not run and gets the reference's refusal text. Llama 3's (header tokens) encodes such text as plain text.
        ``stop`` as in ``text_completion``.
        """
        dialogs = _read_once(dialogs)
        with self._call(dialogs, temperature, top_p, max_gen_len, logprobs, stop):
            rows = self._chat_rows(dialogs, temperature, top_p, max_gen_len, logprobs, stop)
            self._run_to_end([row for row in rows if row is not None])
            predictions: List[ChatPrediction] = []
            for row in rows:
                content = UNSAFE_ERROR if row is None else row.text(self.tokenizer.decode)
                prediction: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
                if logprobs:
                    prediction["tokens"] = [] if row is None else [self.tokenizer.decode([x]) for x in row.tokens]
                    prediction["logprobs"] = [] if row is None else row.logprobs
                predictions.append(prediction)
            return predictions

    def stream_chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        stop: Union[str, Sequence[str], None] = None,
    ) -> Iterator[StreamChunk]:
        """``chat_completion`` as it is generated: chunks of the assistant's new text per dialog, as in
        ``stream_text_completion``. A refused dialog gets its refusal in one chunk."""
        dialogs = _read_once(dialogs)
        with self._call(dialogs, temperature, top_p, max_gen_len, logprobs, stop):
            rows = self._chat_rows(dialogs, temperature, top_p, max_gen_len, logprobs, stop, streaming=True)
            for i, row in enumerate(rows):
                if row is None:
                    yield {"index": i, "text": UNSAFE_ERROR, "finish_reason": "stop"}
            yield from self._stream([row for row in rows if row is not None], logprobs)

    def _chat_rows(
        self, dialogs: object, temperature: float, top_p: float, max_gen_len: Optional[int], logprobs: bool, stop: object,
        streaming: bool = False,
    ) -> List[Optional[Row]]:
        """A row per dialog, None for one the chat format refuses."""
        dialogs = to_list("dialogs", dialogs)
        if dialogs and all(isinstance(m, dict) for m in dialogs):
            raise TypeError("dialogs must be a list of dialogs, got a single dialog (a list of messages); wrap it in a list")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        for i, dialog in enumerate(dialogs):
            self.chat_format.check(dialog, i)
        safe = [i for i, dialog in enumerate(dialogs) if not self.chat_format.refuses(dialog)]
        prompts = [self._encode_dialog(dialogs[i], f"dialogs[{i}]") for i in safe]
        name = lambda k: f"dialogs[{safe[k]}] (once encoded)"  # noqa: E731
        rows: List[Optional[Row]] = [None] * len(dialogs)
        for i, row in zip(safe, self._rows(prompts, max_gen_len, temperature, top_p, logprobs, False, name, stop, streaming)):
            row.index = i
            rows[i] = row
        return rows

    def encode_dialog(self, dialog: Dialog) -> List[int]:
        """The prompt tokens ``chat_completion`` would run for one dialog (its length counts against max_seq_len)."""
        self.chat_format.check(dialog)
        return self._encode_dialog(dialog, "dialog")

    def _encode_dialog(self, dialog: Dialog, name: str) -> List[int]:
        try:
            return self.chat_format.encode(dialog)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None

    def _encode(self, name: str, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        try:
            return self.tokenizer.encode(text, bos=bos, eos=eos)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None


def _count(n: int) -> str:
    """1234567 -> '1.2M'."""
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def _read_once(value: object) -> object:
    """An iterator read into a list (it can be read only once); anything else as it is."""
    return list(value) if isinstance(value, Iterator) else value


def _fingerprint(value: object) -> bytes:
    """The same bytes for the same arguments on every rank: arrays and tensors as lists, containers recursively."""

    def plain(x: object) -> object:
        if hasattr(x, "tolist"):
            return x.tolist()
        if isinstance(x, (list, tuple)):
            return [plain(item) for item in x]
        if isinstance(x, dict):
            return sorted((repr(k), plain(v)) for k, v in x.items())
        return x

    return repr(plain(value)).encode("utf-8", "surrogatepass")


def _path(name: str, value: PathLike) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or pathlib.Path), got {type(value).__name__} {value!r:.80}")
    return Path(value)
