"""Weight-only int8 and int4 quantization of the linear layers: the stored and running layouts, the converters that
build them tensor by tensor as a checkpoint loads, and the linear op the layers call.

Which tensors: every linear weight of the layers (wq wk wv wo w1 w2 w3) and ``output``; the embedding and the norms
keep the run dtype, and so do the activations. Two layouts, both as ``key`` (the quantized values) beside
``key + "_scale"``:

- stored (``consolidated.NN.pth`` written by ``python -m llama.quantize``): int8 is an int8 ``(out, in)`` weight with
  one bfloat16 scale per output row ``(out,)``; int4 is a uint8 ``(out, in / 2)`` weight, two values 0..15 per byte
  along the input dim (the even column in the low nibble), with bfloat16 ``(out, in / group_size, 2)`` (scale, zero)
  pairs. Both cut along either dim for any model-parallel size (an int4 cut must fall on a group boundary).
- running (what a layer holds): int8 as stored, its scales in the run dtype; int4 in the layout of
  ``torch._convert_weight_to_int4pack_for_cpu`` on a CPU (plain nibbles elsewhere) with ``(in / group_size, out, 2)``
  scales and zeros in the run dtype. A weight dequantizes to ``q * scale`` (int8) and ``(q - 8) * scale + zero`` (int4).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from llama.errors import InputError

StateDict = Dict[str, torch.Tensor]
# The pieces of a whole weight along its input dim (a callable, so they are read only when needed).
WholeRows = Optional[Callable[[], Iterator[torch.Tensor]]]

KINDS = ("int8", "int4")
# The group sizes torch's CPU int4 kernel takes.
GROUP_SIZES = (256, 128, 64, 32)
# 64: 4.5 bits per weight with its bfloat16 scale and zero, as llama.cpp's q4_0. Measured (heavy-tailed synthetic
# weights; the L shape's linears): groups of 128 decode about 9% faster but their logits err 1.6x as much; groups of
# 32 err 0.6x as much, decode 3% slower and take 5 bits per weight.
DEFAULT_GROUP_SIZE = 64
# The model tensors quantized ("kinds" of llama.checkpoint's SPLIT_DIM table).
QUANTIZED_KINDS = frozenset({
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "output.weight",
})
SCALE_SUFFIX = "_scale"
SCALE_DTYPE = torch.bfloat16
# torch's int8 CPU kernel is a matrix-vector kernel: it beats converting the weight to the activations' dtype for a
# matmul for a few rows of activations (decode) and loses for many (prefill); on the L shape (2 cores, AVX512-BF16) the
# two meet between 16 and 24 rows.
KERNEL_MAX_ROWS = 16
_LAYER_PREFIX = re.compile(r"layers\.\d+\.")
_PARAMS_SCHEMES = {"int8": "int8_weight_only", "int4": "int4_weight_only"}


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint's linear weights are quantized: ``kind`` "int8" or "int4", and int4's group size."""

    kind: str
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert (self.group_size in GROUP_SIZES) if self.kind == "int4" else self.group_size is None, self

    def stored_shapes(self, key: str, shape: Tuple[int, ...]) -> Dict[str, Tuple[int, ...]]:
        """The stored tensors of model tensor ``key`` of full ``shape`` (out, in), with their shapes."""
        out_features, in_features = shape
        if self.kind == "int8":
            return {key: (out_features, in_features), key + SCALE_SUFFIX: (out_features,)}
        assert self.group_size is not None
        return {key: (out_features, in_features // 2), key + SCALE_SUFFIX: (out_features, in_features // self.group_size, 2)}

    def step(self, is_scale: bool, dim: int) -> Optional[int]:
        """Elements of the model tensor along ``dim`` that one stored element covers; None if it has no such dim."""
        if dim == 0:
            return 1
        if self.kind == "int8":
            return None if is_scale else 1  # one scale per row: every slice of the row shares it
        assert self.group_size is not None
        return self.group_size if is_scale else 2

    def to_params(self) -> dict:
        """The ``params.json`` field of a checkpoint stored in this scheme (Meta's ``quantization_args``)."""
        fields: dict = {"scheme": _PARAMS_SCHEMES[self.kind]}
        if self.group_size is not None:
            fields["group_size"] = self.group_size
        return fields


def is_quantized(key: str) -> bool:
    """Whether model tensor ``key`` (``layers.3.attention.wq.weight``, ``output.weight``) is quantized."""
    return _LAYER_PREFIX.sub("", key, count=1) in QUANTIZED_KINDS


def kind_in_params(quantization_args: Optional[dict]) -> Optional[str]:
    """The kind ("int8", "int4") a ``params.json`` written by ``python -m llama.quantize`` names, else None."""
    scheme = (quantization_args or {}).get("scheme")
    return next((kind for kind, name in _PARAMS_SCHEMES.items() if name == scheme), None)


def check_kind(quantize: object) -> Optional[str]:
    """``quantize`` as given to ``Llama.build``: None, "int8" or "int4"."""
    if quantize is None or (isinstance(quantize, str) and quantize in KINDS):
        return quantize
    raise InputError(f"quantize={quantize!r} is not supported; use None (the run dtype), 'int8' or 'int4'")


# --- quantizing ------------------------------------------------------------------------------------------------


def _round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """x (float32, positive) in bfloat16, rounded up so that dividing by it never exceeds the range it was made for."""
    rounded = x.to(SCALE_DTYPE)
    up = torch.nextafter(rounded, torch.tensor(float("inf"), dtype=SCALE_DTYPE, device=x.device))
    return torch.where(rounded.float() < x, up, rounded)


# Weights are quantized and packed a block of rows at a time, so that their temporaries take about 1 MB of float32
# however large the weight; the blocks are whole blocks of the int4 CPU layout (64 rows).
_CHUNK_ELEMENTS = 1 << 18


def _chunk_rows(in_features: int) -> int:
    return max(64, _CHUNK_ELEMENTS // max(1, in_features) // 64 * 64)


def _row_chunks(weight: torch.Tensor) -> Iterator[Tuple[int, torch.Tensor]]:
    """(first row, float32 copy) of consecutive blocks of rows."""
    rows = _chunk_rows(weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start : start + rows].to(torch.float32, copy=True)  # a copy: it is worked on in place


def _row_absmax(weight: torch.Tensor) -> torch.Tensor:
    return torch.cat([chunk.abs_().amax(dim=1) for _, chunk in _row_chunks(weight)])


def quantize_int8(weight: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """int8 values (out, in) and bfloat16 scales (out,) of a float weight (out, in): symmetric, one scale per output row.

    absmax: each row's largest magnitude, when ``weight`` holds only some columns of each row (a rank's slice), so that
    every slice of a row gets the scale the whole row gets.
    """
    if absmax is None:
        absmax = _row_absmax(weight)
    scale = _round_up_to_bf16((absmax.float() / 127).clamp(min=torch.finfo(SCALE_DTYPE).tiny))
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for start, chunk in _row_chunks(weight):
        chunk_scale = scale[start : start + chunk.shape[0], None].float()
        q[start : start + chunk.shape[0]] = chunk.div_(chunk_scale).round_().clamp_(-127, 127)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """int4 values 0..15 as uint8 (out, in) and bfloat16 (scale, zero) pairs (out, in / group_size, 2).

    Asymmetric, from each group's min and max: a value dequantizes to ``(q - 8) * scale + zero``.
    """
    q = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scale_zero = _empty_scale_zero(weight, group_size)
    for start, q_rows, scale_zero_rows in _int4_rows(weight, group_size):
        q[start : start + q_rows.shape[0]] = q_rows
        scale_zero[start : start + q_rows.shape[0]] = scale_zero_rows
    return q, scale_zero


def _empty_scale_zero(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    assert in_features % group_size == 0, (weight.shape, group_size)
    return torch.empty(out_features, in_features // group_size, 2, dtype=SCALE_DTYPE, device=weight.device)


def _int4_rows(weight: torch.Tensor, group_size: int) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """``quantize_int4`` of consecutive blocks of rows: (first row, values, (scale, zero) pairs)."""
    for start, chunk in _row_chunks(weight):
        groups = chunk.view(chunk.shape[0], -1, group_size)  # (rows, n_groups, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE)
        zero = (low + 8 * scale.float()).to(SCALE_DTYPE)
        # From the rounded scale and zero, so that dequantizing gives each value's nearest level.
        low = zero.float() - 8 * scale.float()
        levels = groups.sub_(low[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15)
        yield start, levels.to(torch.uint8).view(chunk.shape), torch.stack((scale, zero), dim=-1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 (out, in) -> (out, in / 2), two per byte, the even column in the low nibble."""
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize_stored(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight (out, in) a stored int8 or int4 weight stands for."""
    if weight.dtype == torch.int8:
        return weight.float() * weight_scale.float()[:, None]
    q = unpack_nibbles(weight).float()
    out_features, in_features = q.shape
    n_groups = weight_scale.shape[1]
    groups = q.reshape(out_features, n_groups, in_features // n_groups)
    scale, zero = weight_scale.float().unbind(-1)
    return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(out_features, in_features)


# --- the running layout ----------------------------------------------------------------------------------------


def _int4_kernel_layout(device: torch.device, out_features: int) -> bool:
    """Whether an int4 weight runs through torch's packed CPU kernel (which needs out_features % 16 == 0)."""
    return device.type == "cpu" and out_features % 16 == 0


def to_running(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor (``key`` a weight or its ``_scale``) in the layout the layers run, scales in ``dtype``."""
    if key.endswith(SCALE_SUFFIX):
        scale = tensor.to(dtype)
        return scale.transpose(0, 1).contiguous() if scale.dim() == 3 else scale  # int4: (in / group_size, out, 2)
    if tensor.dtype == torch.int8:
        return tensor.contiguous()
    assert tensor.dtype == torch.uint8, (key, tensor.dtype)
    if not _int4_kernel_layout(tensor.device, tensor.shape[0]):
        return tensor.contiguous()
    rows = _chunk_rows(2 * tensor.shape[1])
    blocks = ((start, unpack_nibbles(tensor[start : start + rows])) for start in range(0, tensor.shape[0], rows))
    return _cpu_kernel_pack(blocks, tensor.shape[0], 2 * tensor.shape[1])


def _cpu_kernel_pack(blocks: Iterator[Tuple[int, torch.Tensor]], out_features: int, in_features: int) -> torch.Tensor:
    """torch's CPU int4 layout (out, in / 2) of values 0..15 given a block of rows at a time.

    The kernel lays out each 64 rows (32 with AVX2) apart from the others, so blocks that start at multiples of 64
    pack into the rows of the whole weight's layout.
    """
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    for start, q in blocks:
        assert start % 64 == 0, start
        packed[start : start + q.shape[0]] = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return packed


class Quantizer:
    """A checkpoint hook: quantizes each model tensor ``is_quantized`` names as it is copied out of the shards.

    Called as ``quantizer(key, tensor, whole_rows)`` with a rank's slice of the tensor; returns the stored layout, or
    the running one if ``dtype`` is given. ``whole_rows`` yields the whole tensor's pieces along the input dim when the
    slice holds part of each row: int8 takes each row's scale from the whole row, so that the result is the same for
    every shard layout and model-parallel size (int4 groups lie inside a slice and need nothing more).
    """

    def __init__(self, scheme: Scheme, dtype: Optional[torch.dtype] = None) -> None:
        self.scheme = scheme
        self.dtype = dtype

    def __call__(self, key: str, tensor: torch.Tensor, whole_rows: WholeRows = None) -> StateDict:
        if self.scheme.kind == "int8":
            absmax = None
            if whole_rows is not None:
                absmax = functools.reduce(torch.maximum, (_row_absmax(piece).to(tensor.device) for piece in whole_rows()))
            q, scale = quantize_int8(tensor, absmax)
        else:
            group_size = self.scheme.group_size
            assert group_size is not None
            if self.dtype is not None and _int4_kernel_layout(tensor.device, tensor.shape[0]):
                scale = _empty_scale_zero(tensor, group_size)

                def blocks() -> Iterator[Tuple[int, torch.Tensor]]:
                    for start, q_rows, scale_rows in _int4_rows(tensor, group_size):
                        scale[start : start + q_rows.shape[0]] = scale_rows
                        yield start, q_rows

                q = _cpu_kernel_pack(blocks(), *tensor.shape)  # no detour through nibbles
                return {key: q, key + SCALE_SUFFIX: to_running(key + SCALE_SUFFIX, scale, self.dtype)}
            q4, scale = quantize_int4(tensor, group_size)
            q = pack_nibbles(q4)
        stored = {key: q, key + SCALE_SUFFIX: scale}
        if self.dtype is None:
            return stored
        return {k: to_running(k, v, self.dtype) for k, v in stored.items()}


class Loader:
    """A checkpoint hook for a stored quantized checkpoint: each stored tensor into the running layout, scales in dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, key: str, tensor: torch.Tensor, whole_rows: WholeRows = None) -> StateDict:
        return {key: to_running(key, tensor, self.dtype)}


# --- the linear op ---------------------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for W in the running layout (int8 or int4); x (..., in) in the dtype of weight_scale."""
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    rows, in_features = x2.shape
    cpu = x.device.type == "cpu"
    if weight.dtype == torch.int8:
        if cpu and rows <= KERNEL_MAX_ROWS:
            out = torch._weight_int8pack_mm(x2.contiguous(), weight, weight_scale)
        else:  # int8 values are exact in every float dtype; the row scales apply to the product's columns
            out = F.linear(x2, weight.to(x.dtype)) * weight_scale
    elif _int4_kernel_layout(weight.device, weight.shape[0]):
        # For any number of rows: unpacking int4 costs more than the kernel's slower matrix-matrix products.
        out = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), weight, in_features // weight_scale.shape[0], weight_scale)
    else:
        out = F.linear(x2, _dequantize_plain_int4(weight, weight_scale, x.dtype))
    return out.view(*x.shape[:-1], out.shape[-1])


def _dequantize_plain_int4(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight (out, in), in dtype, of an int4 weight in the plain running layout (off the CPU kernel)."""
    out_features, n_groups = weight.shape[0], weight_scale.shape[0]
    groups = unpack_nibbles(weight).view(out_features, n_groups, -1).to(dtype)  # (out, n_groups, group_size)
    scale, zero = weight_scale.transpose(0, 1).unbind(-1)  # each (out, n_groups)
    return ((groups - 8) * scale[..., None] + zero[..., None]).view(out_features, -1)
