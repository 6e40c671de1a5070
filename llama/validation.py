"""Checks for values where they enter the package: numbers of any numeric type, flags, sequences of token ids.

Python ints and floats, numpy scalars and 0-d torch tensors are all accepted as numbers; ``bool`` is not a
number here, so ``temperature=True`` is refused rather than read as 1.
"""

from __future__ import annotations

import math
import operator
import numbers
from typing import Any, List, Optional, Sequence

from llama.errors import InputError


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool") and hasattr(value, "dtype")


def _is_number(value: Any) -> bool:
    if _is_bool(value):
        return False
    if isinstance(value, numbers.Real):
        return True
    # 0-d torch tensors and numpy arrays: a size, a dtype, and float() works on them.
    return getattr(value, "ndim", None) == 0 and hasattr(value, "dtype") and not str(value.dtype).endswith("bool")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def to_int(name: str, value: Any, minimum: Optional[int] = None, *, error: type = InputError) -> int:
    """``value`` as an int (any integral number type; a float only if whole), at least ``minimum``."""
    if not _is_number(value):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {_describe(value)}")
    try:
        result = operator.index(value)
    except TypeError:
        number = float(value)
        if not number.is_integer():
            raise error(f"{name} must be a whole number, got {_describe(value)}") from None
        result = int(number)
    if minimum is not None and result < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {result}")
    return result


def to_float(
    name: str,
    value: Any,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    *,
    above_minimum: bool = False,
    error: type = InputError,
    hint: str = "",
) -> float:
    """``value`` as a finite float in [minimum, maximum] (or (minimum, maximum] with ``above_minimum``); hint ends errors."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {_describe(value)}")
    result = float(value)
    low = "" if minimum is None else f"{'>' if above_minimum else '>='} {minimum:g}"
    high = "" if maximum is None else f"<= {maximum:g}"
    expected = " and ".join(part for part in (low, high) if part) + hint
    if not math.isfinite(result):
        raise error(f"{name} must be a finite number {expected}, got {result}")
    too_low = minimum is not None and (result < minimum or (above_minimum and result == minimum))
    if too_low or (maximum is not None and result > maximum):
        raise error(f"{name} must be {expected}, got {result}")
    return result


def to_bool(name: str, value: Any) -> bool:
    """``value`` as a bool: ``True``/``False``, a numpy bool or a 0-d bool tensor; not an int or a string."""
    if isinstance(value, bool):
        return value
    if _is_bool(value) or (getattr(value, "ndim", None) == 0 and str(getattr(value, "dtype", "")).endswith("bool")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {_describe(value)}")


def to_list(name: str, value: Any) -> List[Any]:
    """Any iterable (list, tuple, generator, array) as a list; a str, bytes or mapping is refused."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list, got a single {type(value).__name__}; wrap it in a list")
    if isinstance(value, dict):
        raise TypeError(f"{name} must be a list, got a dict; wrap it in a list")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name} must be a list, got {type(value).__name__} {_describe(value)}") from None


def to_token_ids(name: str, value: Any, vocab_size: int) -> List[int]:
    """A sequence of token ids (ints of any integer type) as a list, each in [0, vocab_size)."""
    if _is_number(value) or _is_bool(value):
        raise TypeError(f"{name} must be a list of token ids, got the single number {_describe(value)}")
    tokens = to_list(name, value.tolist() if hasattr(value, "tolist") else value)
    ids: List[int] = []
    for token in tokens:
        try:
            token_id = operator.index(token) if not _is_bool(token) else None
        except TypeError:
            token_id = None
        if token_id is None or not 0 <= token_id < vocab_size:
            raise InputError(f"{name} holds {_describe(token)}, which is not a token id in [0, {vocab_size})")
        ids.append(token_id)
    return ids


def batch_of_token_lists(name: str, value: Any) -> Sequence[Any]:
    """A batch of prompts as a list; a single prompt (a flat list of ints) is refused with advice to wrap it."""
    batch = to_list(name, value)
    if batch and all(_is_number(t) for t in batch):
        raise TypeError(f"{name} must be a list of prompts, each a list of token ids; got one flat list of ints: wrap it as [tokens]")
    return batch


def to_stop_strings(stop: object) -> List[str]:
    """``stop`` as a list of non-empty strings (None: none; one string: itself)."""
    if stop is None:
        return []
    strings = [stop] if isinstance(stop, str) else to_list("stop", stop)
    for i, s in enumerate(strings):
        if not isinstance(s, str):
            raise TypeError(f"stop[{i}] must be a str, got {type(s).__name__}: {s!r:.80}")
        if not s:
            raise InputError(f"stop[{i}] is an empty string, which would stop every row at once; remove it")
    return strings
