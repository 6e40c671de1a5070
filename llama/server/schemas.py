"""OpenAI's request and response shapes: request bodies checked into sequence specs, chunks shaped into responses, errors.

Every parameter a body names is either implemented or refused with a 400 that names it; none is silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

from llama.chat_format import ChatFormat
from llama.errors import InputError
from llama.server.scheduler import SequenceSpec, make_sampling
from llama.tokenizer import BaseTokenizer

MAX_CHOICES = 128  # n, as OpenAI bounds it
MAX_PROMPTS = 128  # prompts in one completions request
MAX_STOP = 16  # stop strings in one request
MAX_TOP_LOGPROBS = 20
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left in the context

# Engine sampling fields that older engines lack; each is passed only when the request sets it.
_NEW_SAMPLING_FIELDS = ("top_logprobs", "presence_penalty", "frequency_penalty", "seed")


class ApiError(Exception):
    """An error response in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: Optional[str], message: str, code: Optional[str] = None) -> ApiError:
    """A 400 about ``param``."""
    return ApiError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class ModelContext:
    """What checking a request needs to know of the loaded model."""

    name: str
    tokenizer: BaseTokenizer
    chat_format: ChatFormat
    max_seq_len: int
    vocab_size: int
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    default_max_tokens: Optional[int] = None  # the server's --max_gen_len
    extra_stop: Tuple[str, ...] = ()  # the server's --stop


@dataclasses.dataclass
class Request:
    """A checked completions or chat request."""

    chat: bool
    prompts: List[List[int]]
    n: int
    max_tokens: List[int]  # per prompt
    sampling: Dict[str, Any]  # engine.Sampling's fields; a seed is the first choice's
    stop: List[str]
    echo: bool
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool

    def specs(self) -> List[SequenceSpec]:
        """One spec per choice: prompt i's choices are i*n .. i*n + n-1, as OpenAI numbers them; choice j's seed is seed + j."""
        specs = []
        for i, (prompt, max_tokens) in enumerate(zip(self.prompts, self.max_tokens)):
            for j in range(self.n):
                sampling = dict(self.sampling)
                if "seed" in sampling:
                    sampling["seed"] += j
                specs.append(SequenceSpec(i * self.n + j, prompt, len(prompt) + max_tokens, sampling, self.stop, self.echo))
        return specs

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "stop",
          "presence_penalty", "frequency_penalty", "seed", "user")
COMPLETION_PARAMS = frozenset(COMMON + ("prompt", "echo"))
CHAT_PARAMS = frozenset(COMMON + ("messages", "max_completion_tokens", "top_logprobs"))


def parse_completion(body: Dict[str, Any], ctx: ModelContext) -> Request:
    """A /v1/completions body checked and encoded; ``ApiError`` names the first bad parameter."""
    body = _known(body, COMPLETION_PARAMS)
    _check_model(body, ctx)
    prompts = _completion_prompts(body.get("prompt"), ctx)
    logprobs_k = _int(body, "logprobs", None, 0, 5)
    echo = _bool(body, "echo", False)
    max_tokens = _int(body, "max_tokens", None, 0, None)
    default = ctx.default_max_tokens if ctx.default_max_tokens is not None else COMPLETIONS_MAX_TOKENS
    budgets = [_budget("prompt" if len(prompts) == 1 else f"prompt[{i}]", len(p), max_tokens, default, ctx)
               for i, p in enumerate(prompts)]
    return _request(body, ctx, False, prompts, budgets, logprobs_k is not None, logprobs_k or 0, echo, "logprobs")


def parse_chat(body: Dict[str, Any], ctx: ModelContext) -> Request:
    """A /v1/chat/completions body checked and encoded with the checkpoint's chat format."""
    body = _known(body, CHAT_PARAMS)
    _check_model(body, ctx)
    dialog = _messages(body.get("messages"))
    try:
        ctx.chat_format.check(dialog)
    except (InputError, TypeError) as e:
        raise bad("messages", str(e).replace("dialog", "messages", 1)) from None
    if ctx.chat_format.refuses(dialog):
        raise bad("messages", "messages hold the chat format's own tags ([INST], [/INST], <<SYS>>, <</SYS>>), which Llama 2's format refuses")
    prompt = ctx.chat_format.encode(dialog)
    max_tokens = _int(body, "max_tokens", None, 1, None)
    max_completion_tokens = _int(body, "max_completion_tokens", None, 1, None)
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        raise bad("max_completion_tokens", f"max_tokens={max_tokens} and max_completion_tokens={max_completion_tokens} differ; pass one")
    asked = max_completion_tokens if max_completion_tokens is not None else max_tokens
    budget = _budget("messages", len(prompt), asked, ctx.default_max_tokens, ctx)
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    return _request(body, ctx, True, [prompt], [budget], logprobs, top or 0, False, "top_logprobs")


def _request(
    body: Dict[str, Any], ctx: ModelContext, chat: bool, prompts: List[List[int]], budgets: List[int], logprobs: bool, top: int,
    echo: bool, top_param: str,
) -> Request:
    """The parameters both endpoints share, and the sampling fields checked against the engine."""
    temperature = _float(body, "temperature", ctx.default_temperature, 0.0, 2.0)
    top_p = _float(body, "top_p", ctx.default_top_p, 0.0, 1.0)
    if top_p == 0.0:  # the limit of nucleus sampling as p -> 0 is the likeliest token
        temperature, top_p = 0.0, 1.0
    n = _int(body, "n", 1, 1, MAX_CHOICES)
    if len(prompts) * n > MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts times n={n} make {len(prompts) * n} choices; at most {MAX_CHOICES} per request")
    stream = _bool(body, "stream", False)
    include_usage = _stream_options(body, stream)
    sampling: Dict[str, Any] = {"temperature": temperature, "top_p": top_p, "logprobs": logprobs}
    params = {"top_logprobs": top_param}
    if top:
        sampling["top_logprobs"] = top
    for name in ("presence_penalty", "frequency_penalty"):
        value = _float(body, name, 0.0, -2.0, 2.0)
        if value:
            sampling[name] = value
            params[name] = name
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1 - MAX_CHOICES)
    if seed is not None:
        sampling["seed"] = seed
        params["seed"] = "seed"
    try:
        make_sampling(sampling)
    except TypeError:
        new = [name for name in _NEW_SAMPLING_FIELDS if name in sampling]
        param = params.get(new[0], new[0]) if new else None
        raise bad(param, f"{param} is not supported by this server's engine yet", "unsupported_parameter") from None
    except ValueError as e:  # a value the engine refuses that the checks above let through
        raise bad(None, str(e)) from None
    stop = _stop(body.get("stop")) + [s for s in ctx.extra_stop if s]
    return Request(chat, prompts, n, budgets, sampling, stop, echo, logprobs, top, stream, include_usage)


def _known(body: Any, allowed: frozenset) -> Dict[str, Any]:
    """The body without null values; a 400 naming the first parameter not implemented here."""
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    body = {k: v for k, v in body.items() if v is not None}
    for name in body:
        if name not in allowed:
            raise bad(name, f"unsupported parameter {name!r}: this server does not implement it", "unsupported_parameter")
    return body


def _check_model(body: Dict[str, Any], ctx: ModelContext) -> None:
    model = body.get("model", ctx.name)
    if model != ctx.name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {ctx.name!r}", param="model", code="model_not_found")


def _int(body: Dict[str, Any], name: str, default: Optional[int], lo: Optional[int], hi: Optional[int]) -> Optional[int]:
    if name not in body:
        return default
    value = body[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, f"{name} must be an integer, got {value!r:.80}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"from {lo} to {hi}"
        raise bad(name, f"{name} must be an integer {bounds}, got {value}")
    return value


def _float(body: Dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    if name not in body:
        return default
    value = body[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise bad(name, f"{name} must be a number, got {value!r:.80}")
    if not lo <= value <= hi:
        raise bad(name, f"{name} must be a number from {lo:g} to {hi:g}, got {value:g}")
    return float(value)


def _bool(body: Dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r:.80}")
    return value


def _stream_options(body: Dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict):
        raise bad("stream_options", f"stream_options must be an object, got {options!r:.80}")
    for key in options:
        if key != "include_usage":
            raise bad(f"stream_options.{key}", f"unsupported parameter 'stream_options.{key}': only include_usage is implemented",
                      "unsupported_parameter")
    return _bool(options, "include_usage", False) if "include_usage" in options else False


def _stop(stop: Any) -> List[str]:
    if stop is None:
        return []
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise bad("stop", f"stop must be a string or a list of strings, got {stop!r:.80}")
    if len(strings) > MAX_STOP:
        raise bad("stop", f"stop holds {len(strings)} strings; at most {MAX_STOP}")
    return [s for s in strings if s]  # an empty stop string would end every answer at once: it means none


def _completion_prompts(prompt: Any, ctx: ModelContext) -> List[List[int]]:
    """The prompt(s) as token lists: a string, a list of strings, a list of token ids, or a list of such lists."""
    if prompt is None:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids")
    if len(prompt) > MAX_PROMPTS:
        raise bad("prompt", f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request")
    prompts = []
    for i, p in enumerate(prompt):
        name = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            try:
                prompts.append(ctx.tokenizer.encode(p, bos=True, eos=False))
            except InputError as e:
                raise bad(name, f"{name}: {e}") from None
        elif isinstance(p, list) and p and all(_is_token(t) for t in p):
            out_of_range = [t for t in p if not 0 <= t < ctx.vocab_size]
            if out_of_range:
                raise bad(name, f"{name} holds token id {out_of_range[0]}, outside the vocabulary [0, {ctx.vocab_size})")
            prompts.append(list(p))
        else:
            raise bad(name, f"{name} must be a string or a non-empty list of token ids, got {p!r:.80}")
    return prompts


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _messages(messages: Any) -> List[Dict[str, str]]:
    """OpenAI messages as a dialog: text content (a string or text parts); 'developer' is the system role."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    dialog = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"{where} must be an object with role and content, got {message!r:.80}")
        for key, value in message.items():
            if key not in ("role", "content") and value is not None:
                raise bad(f"{where}.{key}", f"unsupported parameter '{where}.{key}': messages take role and content only",
                          "unsupported_parameter")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise bad(f"{where}.role", f"{where}.role must be a string, got {role!r:.80}")
        if isinstance(content, list):
            content = _text_parts(content, where)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts, got {content!r:.80}")
        dialog.append({"role": "system" if role == "developer" else role, "content": content})
    return dialog


def _text_parts(parts: List[Any], where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad(f"{where}.content[{j}]", f"{where}.content[{j}] is of type {kind!r}; only text parts are supported",
                      "unsupported_parameter")
        texts.append(part["text"])
    return "".join(texts)


def _budget(param: str, n_prompt: int, asked: Optional[int], default: Optional[int], ctx: ModelContext) -> int:
    """Tokens to generate for a prompt: ``asked`` if it fits the context (else a 400), else the default cut to the room left."""
    room = ctx.max_seq_len - n_prompt
    hint = "shorten the prompt, lower max_tokens, or restart the server with a larger --max_seq_len"
    if asked is not None:
        if asked > room:
            raise bad(param, f"the prompt has {n_prompt} tokens and max_tokens asks for {asked} more, {n_prompt + asked} in all, "
                      f"which exceeds the context of max_seq_len={ctx.max_seq_len} tokens; {hint}", "context_length_exceeded")
        return asked
    if room < 1:
        raise bad(param, f"the prompt has {n_prompt} tokens, which leaves no room for an answer in the context of "
                  f"max_seq_len={ctx.max_seq_len} tokens; {hint}", "context_length_exceeded")
    return room if default is None else min(default, room)


# ---- responses ----


@dataclasses.dataclass
class Choice:
    """One choice as its chunks arrive: the text, why it ended, and its token scores when asked for."""

    index: int
    text: str = ""
    finish_reason: Optional[str] = None
    tokens: List[str] = dataclasses.field(default_factory=list)
    token_logprobs: List[Optional[float]] = dataclasses.field(default_factory=list)
    top_logprobs: List[Optional[List[Tuple[str, float]]]] = dataclasses.field(default_factory=list)

    def add(self, chunk: Dict[str, Any]) -> None:
        self.text += chunk["text"]
        self.finish_reason = chunk["finish_reason"]
        self.tokens += chunk.get("tokens", [])
        self.token_logprobs += chunk.get("logprobs", [])
        self.top_logprobs += chunk.get("top_logprobs", [None] * len(chunk.get("tokens", [])))


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(chunk: Dict[str, Any], offset: int, echo_start: bool) -> Dict[str, Any]:
    """A completions choice's ``logprobs`` for a chunk's tokens; ``offset`` is the text length before them.

    The first token of an echoed prompt has no logprob (nothing predicts it): null, as OpenAI gives it.
    """
    tokens = chunk.get("tokens", [])
    logprobs: List[Optional[float]] = list(chunk.get("logprobs", []))
    if echo_start and logprobs:
        logprobs[0] = None
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops = chunk.get("top_logprobs")
    top_logprobs = None if tops is None else [None if t is None else dict(t) for t in tops]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(chunk: Dict[str, Any]) -> Dict[str, Any]:
    """A chat choice's ``logprobs`` for a chunk's tokens."""
    tops = chunk.get("top_logprobs") or [None] * len(chunk.get("tokens", []))
    content = []
    for token, logprob, top in zip(chunk.get("tokens", []), chunk.get("logprobs", []), tops):
        alternatives = [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in (top or [])]
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")), "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def chat_choice_chunk(index: int, chunk: Optional[Dict[str, Any]], logprobs: bool, first: bool = False) -> Dict[str, Any]:
    """A chat.completion.chunk choice: the role alone (``first``), or new content and the finish reason."""
    if first:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    assert chunk is not None
    delta = {"content": chunk["text"]} if chunk["text"] else {}
    return {"index": index, "delta": delta, "logprobs": chat_logprobs(chunk) if logprobs else None, "finish_reason": chunk["finish_reason"]}

