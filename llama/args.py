"""``ModelArgs``: the model's hyperparameters as read from Meta's ``params.json``, and the sizes derived from them."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from llama.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: take it from the tokenizer
    multiple_of: int = 256  # SwiGLU hidden size is a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise CheckpointError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} (dim / n_heads) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size, computed exactly as Meta's ``FeedForward`` does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], source: str = "params.json", **overrides: Any) -> "ModelArgs":
        """Build from a ``params.json`` mapping; unknown fields are logged as warnings and skipped."""
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in params.items():
            if key in known:
                kwargs[key] = value
            else:
                logger.warning("%s: ignoring unknown field %r (value %r)", source, key, value)
        kwargs.update(overrides)
        return cls(**kwargs)


def load_params(path: Path) -> dict:
    """Read ``params.json`` with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Meta checkpoint folder holds params.json beside its .pth shards")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(params).__name__}")
    return params


def local_head_counts(args: ModelArgs, model_parallel_size: int) -> tuple[int, int]:
    """(query heads, KV heads) held by one rank; past ``n_kv_heads`` ranks each hold one replicated KV head."""
    assert args.n_kv_heads is not None
    return args.n_heads // model_parallel_size, max(1, args.n_kv_heads // model_parallel_size)


def model_parallel_sizes(args: ModelArgs) -> list[int]:
    """Every model-parallel size this model's tensors split evenly over."""
    return [n for n in range(1, args.n_heads + 1) if not _split_problems(args, n)]


def check_model_parallel_size(args: ModelArgs, model_parallel_size: int) -> None:
    """Raise a ``CheckpointError`` naming the sizes that do not split over ``model_parallel_size``."""
    problems = _split_problems(args, model_parallel_size)
    if problems:
        raise CheckpointError(
            f"this model cannot run on model_parallel_size={model_parallel_size}: {'; '.join(problems)}. "
            f"Sizes that work: {model_parallel_sizes(args)}"
        )


def _split_problems(args: ModelArgs, n: int) -> list[str]:
    assert args.n_kv_heads is not None
    sizes = {"n_heads": args.n_heads, "dim": args.dim, "hidden_dim": args.hidden_dim, "vocab_size": args.vocab_size}
    problems = [f"{name}={size} is not divisible by {n}" for name, size in sizes.items() if size % n]
    if args.n_kv_heads % n and n % args.n_kv_heads:
        problems.append(f"n_kv_heads={args.n_kv_heads} neither divides nor is divisible by {n}")
    return problems
