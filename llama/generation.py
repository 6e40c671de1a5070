"""``Llama``: Meta's public API (``build``, ``generate``, ``text_completion``, ``chat_completion``) over the pieces beside it."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from llama import devices, distributed, engine
from llama.chat_format import (
    UNSAFE_ERROR,
    ChatPrediction,
    CompletionPrediction,
    Dialog,
    check_dialog,
    encode_dialog,
    has_special_tags,
)
from llama.errors import InputError
from llama.loading import load_model
from llama.memory import reuse_freed_memory
from llama.model import Transformer
from llama.quantize import check_kind
from llama.tokenizer import Tokenizer
from llama.validation import batch_of_token_lists, to_bool, to_float, to_int, to_list, to_token_ids

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


class Llama:
    @staticmethod
    def build(
        ckpt_dir: PathLike,
        tokenizer_path: Optional[PathLike],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        quantize: Optional[str] = None,
        compile: bool = False,
    ) -> "Llama":
        """Load a Meta-format checkpoint of any shard count onto this process's model-parallel rank.

        Works under torchrun or from a plain ``python`` process (a group of one). ``device`` defaults to
        ``cuda:LOCAL_RANK``, else ``mps``, else ``cpu``; ``dtype`` to the fastest the device computes well.
        ``quantize`` ("int8", "int4") quantizes the linear weights as they load; a checkpoint written by
        ``python -m llama.quantize`` loads quantized without it. ``compile`` runs the decode step through
        ``torch.compile`` (compiled once, at the first generation; see the README for when it pays).
        """
        ckpt_dir = _path("ckpt_dir", ckpt_dir)
        tokenizer_path = None if tokenizer_path is None else _path("tokenizer_path", tokenizer_path)
        max_seq_len = to_int("max_seq_len", max_seq_len, 1)
        max_batch_size = to_int("max_batch_size", max_batch_size, 1)
        if model_parallel_size is not None:
            model_parallel_size = to_int("model_parallel_size", model_parallel_size, 1)
        compile = to_bool("compile", compile)
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
        if distributed.rank() == 0:
            logger.info("running on %s in %s", run_device, run_dtype)

        error: Optional[BaseException] = None
        try:
            model, tokenizer = load_model(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, n_ranks, run_device, run_dtype, quantize)
        except Exception as e:  # every rank must learn of it, or the others wait for this one forever
            error = e
        distributed.raise_if_any_rank_failed(error, "loading the checkpoint", run_device)
        if run_device.type == "cpu":
            reuse_freed_memory()
        params = model.params
        # The largest decode-step tensor: a batch of float32 logits for this rank's share of the vocabulary.
        with distributed.peer_failures("setting up the model-parallel collectives"):
            group = distributed.setup_collectives(run_device, 4 * params.max_batch_size * max(params.dim, params.vocab_size // n_ranks))
        logger.info("loaded in %.2f seconds", time.time() - start_time)
        return Llama(model, tokenizer, seed=seed, group=group, compile=compile)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        seed: int = 1,
        group: Optional[distributed.ModelParallelGroup] = None,
        compile: bool = False,
    ) -> None:
        """``group`` defaults to the model-parallel group set up last; ``build`` passes the one it set up for this model.
        ``compile`` runs decode steps through ``torch.compile`` (compiled at the first step)."""
        self.model = model
        # Each Llama keeps its group, so building another of a different model-parallel size leaves this one working.
        self.group = distributed.active_group() if group is None else group
        self.tokenizer = tokenizer
        self.device = model.output.weight.device
        # A generator of our own: user code drawing random numbers cannot shift what is sampled.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # The KV caches and the generator are shared state: calls from several threads run one at a time.
        self._lock = threading.RLock()
        self._decode = engine.compile_decode_step(model) if compile else None

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to max_gen_len tokens, stopping a row at EOS.

        Returns the generated tokens (with the prompt if echo) and, if logprobs, each token's log-probability
        (0.0 for the first token of an echoed prompt, which nothing predicts). More prompts than max_batch_size
        share the batch: a waiting prompt takes the row of one that finished. Calls from several threads run one
        at a time.
        """
        prompt_tokens = _read_once(prompt_tokens)
        with self._call(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo):
            batch = batch_of_token_lists("prompt_tokens", prompt_tokens)
            prompts = [to_token_ids(f"prompt_tokens[{i}]", p, self.model.vocab_size) for i, p in enumerate(batch)]
            return self._generate(prompts, max_gen_len, temperature, top_p, logprobs, echo, lambda i: f"prompt_tokens[{i}]")

    @torch.inference_mode()
    def _generate(
        self,
        prompts: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        name: Callable[[int], str],
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """``generate`` on checked token lists; ``name(i)`` says where prompt i came from, for errors."""
        max_gen_len = to_int("max_gen_len", max_gen_len, 0)
        temperature = to_float("temperature", temperature, 0.0, hint=" (0 is greedy)")
        top_p = to_float("top_p", top_p, 0.0, 1.0, above_minimum=True)
        logprobs, echo = to_bool("logprobs", logprobs), to_bool("echo", echo)
        self._check_prompt_lengths(prompts, name)
        max_seq_len = self.model.params.max_seq_len
        sampling = engine.Sampling(temperature, top_p, logprobs)
        sequences = [engine.Sequence(p, min(max_seq_len, len(p) + max_gen_len), sampling, score_prompt=logprobs and echo) for p in prompts]
        with distributed.peer_failures("generating"):
            engine.Engine(self.model, {self.tokenizer.eos_id}, self.generator, self._decode).run(sequences)
        out_tokens = [s.tokens if echo else s.generated for s in sequences]
        out_logprobs = [s.logprobs if echo else s.logprobs[len(s.prompt) :] for s in sequences]
        return out_tokens, (out_logprobs if logprobs else None)

    @contextlib.contextmanager
    def _call(self, *arguments: object) -> Iterator[None]:
        """One call at a time on this object, on its model-parallel group, after every rank is seen to pass the same arguments.

        Compared before any check, so that a value one rank alone refuses fails every rank at once, not only that one.
        """
        with self._lock, distributed.using(self.group):
            distributed.check_same_inputs("prompts or sampling arguments", _fingerprint(arguments))
            yield

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

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each prompt; max_gen_len defaults to max_seq_len - 1."""
        prompts = _read_once(prompts)
        with self._call(prompts, temperature, top_p, max_gen_len, logprobs, echo):
            prompts = to_list("prompts", prompts)
            for i, prompt in enumerate(prompts):
                if not isinstance(prompt, str):
                    raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}: {prompt!r:.80}")
            if max_gen_len is None:
                max_gen_len = self.model.params.max_seq_len - 1
            prompt_tokens = [self._encode(f"prompts[{i}]", x) for i, x in enumerate(prompts)]
            generation_tokens, generation_logprobs = self._generate(
                prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, lambda i: f"prompts[{i}] (once encoded)"
            )
            if logprobs:
                assert generation_logprobs is not None
                return [
                    {"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                    for t, lp in zip(generation_tokens, generation_logprobs)
                ]
            return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in Llama 2's chat format; max_gen_len defaults to max_seq_len - 1.

        A dialog that contains the format's own tags ([INST], <<SYS>>, ...) is not run and gets the reference's
        refusal text.
        """
        dialogs = _read_once(dialogs)
        with self._call(dialogs, temperature, top_p, max_gen_len, logprobs):
            dialogs = to_list("dialogs", dialogs)
            if dialogs and all(isinstance(m, dict) for m in dialogs):
                raise TypeError("dialogs must be a list of dialogs, got a single dialog (a list of messages); wrap it in a list")
            if max_gen_len is None:
                max_gen_len = self.model.params.max_seq_len - 1
            for i, dialog in enumerate(dialogs):
                check_dialog(dialog, i)
            unsafe = [has_special_tags(dialog) for dialog in dialogs]
            safe = [i for i, bad in enumerate(unsafe) if not bad]
            safe_prompts = [encode_dialog(dialogs[i], functools.partial(self._encode, f"dialogs[{i}]")) for i in safe]
            generation_tokens, generation_logprobs = self._generate(
                safe_prompts, max_gen_len, temperature, top_p, logprobs, False, lambda k: f"dialogs[{safe[k]}] (once encoded)"
            )
            answers = iter(zip(generation_tokens, generation_logprobs or [[]] * len(generation_tokens)))
            predictions: List[ChatPrediction] = []
            for bad in unsafe:
                tokens, scores = ([], []) if bad else next(answers)
                content = UNSAFE_ERROR if bad else self.tokenizer.decode(tokens)
                prediction: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
                if logprobs:
                    prediction["tokens"] = [self.tokenizer.decode([x]) for x in tokens]
                    prediction["logprobs"] = scores
                predictions.append(prediction)
            return predictions

    def _encode(self, name: str, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        try:
            return self.tokenizer.encode(text, bos=bos, eos=eos)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None


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
