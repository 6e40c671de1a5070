"""``ModelArgs``: the model's hyperparameters as read from Meta's ``params.json``, and the sizes derived from them."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from llama.errors import CheckpointError
from llama.validation import to_float, to_int

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling (transformers' rope_type "llama3"): long wavelengths divided by ``factor``."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int


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
    # Llama 3.1's RoPE scaling (Meta's llama-models names); None: Meta's constants, factor 8, high-frequency factor 4,
    # low-frequency factor 1 over an original context of 8192 (Llama 3.2 1B/3B scale by 32).
    use_scaled_rope: bool = False
    rope_scaling_factor: Optional[float] = None
    rope_high_freq_factor: Optional[float] = None
    rope_low_freq_factor: Optional[float] = None
    rope_original_max_seq_len: Optional[int] = None
    ffn_hidden_dim: Optional[int] = None  # the SwiGLU hidden size as given (HF's intermediate_size); None: Meta's formula
    quantization_args: Optional[dict] = None  # written by llama.quantize (Meta's llama-models name)

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            setattr(self, name, to_int(name, getattr(self, name), 1, error=CheckpointError))
        self.vocab_size = to_int("vocab_size", self.vocab_size, -1, error=CheckpointError)
        if self.vocab_size == 0:
            raise CheckpointError("vocab_size must be positive, or -1 to take it from the tokenizer; got 0")
        if self.ffn_dim_multiplier is not None:
            self.ffn_dim_multiplier = to_float("ffn_dim_multiplier", self.ffn_dim_multiplier, 0, above_minimum=True, error=CheckpointError)
        self.norm_eps = to_float("norm_eps", self.norm_eps, 0, above_minimum=True, error=CheckpointError)
        self.rope_theta = to_float("rope_theta", self.rope_theta, 0, above_minimum=True, error=CheckpointError)
        if not isinstance(self.use_scaled_rope, bool):
            raise CheckpointError(f"use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        for name in ("rope_scaling_factor", "rope_high_freq_factor", "rope_low_freq_factor"):
            if getattr(self, name) is not None:
                setattr(self, name, to_float(name, getattr(self, name), 0, above_minimum=True, error=CheckpointError))
        for name in ("rope_original_max_seq_len", "ffn_hidden_dim"):
            if getattr(self, name) is not None:
                setattr(self, name, to_int(name, getattr(self, name), 1, error=CheckpointError))
        scaling = self.rope_scaling
        if scaling is not None and scaling.high_freq_factor <= scaling.low_freq_factor:
            raise CheckpointError(
                f"rope_high_freq_factor={scaling.high_freq_factor} must exceed rope_low_freq_factor={scaling.low_freq_factor}"
            )
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
    def rope_scaling(self) -> Optional[RopeScaling]:
        """Llama 3.1's frequency scaling of RoPE, or None where ``use_scaled_rope`` is off."""
        if not self.use_scaled_rope:
            return None
        return RopeScaling(
            factor=8.0 if self.rope_scaling_factor is None else self.rope_scaling_factor,
            low_freq_factor=1.0 if self.rope_low_freq_factor is None else self.rope_low_freq_factor,
            high_freq_factor=4.0 if self.rope_high_freq_factor is None else self.rope_high_freq_factor,
            original_max_seq_len=8192 if self.rope_original_max_seq_len is None else self.rope_original_max_seq_len,
        )

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: ``ffn_hidden_dim`` if given, else computed exactly as Meta's ``FeedForward`` does."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
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
        try:
            return cls(**kwargs)
        except (CheckpointError, TypeError) as e:  # a value of the wrong type in the file is the file's fault
            raise CheckpointError(f"{source}: {e}") from None


def load_params(path: Path) -> dict:
    """Read ``params.json`` with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Meta checkpoint folder holds params.json beside its .pth shards")
    try:
        params = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}): is it params.json?") from None
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
    """Every model-parallel size this model's tensors split evenly over (each divides n_heads)."""
    divisors = {d for i in range(1, math.isqrt(args.n_heads) + 1) if args.n_heads % i == 0 for d in (i, args.n_heads // i)}
    return [n for n in sorted(divisors) if not _split_problems(args, n)]


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
