"""The decode step a compiled model runs: ``torch.compile`` modes, freezing on a CPU, CUDA graphs on one GPU, and
the span of the KV cache each step attends over."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from llama import distributed
from llama.model import Transformer

# (tokens (bsz, 1), positions (bsz,), kv_len) -> next-token logits (bsz, vocab): one decode step over the first bsz
# rows, attending over cached positions [0, kv_len).
DecodeStep = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
MIN_ATTENTION_SPAN = 256


def attention_span(needed: int, max_seq_len: int) -> int:
    """The KV length a compiled step attends over: the least power of two from MIN_ATTENTION_SPAN that covers
    ``needed`` positions, at most max_seq_len. A few shapes (graphs) whatever the context, and a step reads at
    most twice the cache it needs, not the whole cache."""
    span = MIN_ATTENTION_SPAN
    while span < needed:
        span *= 2
    return min(span, max_seq_len)


COMPILE_MODES = ("default", "max-autotune")


def compile_mode(value: object) -> Optional[str]:
    """``Llama.build``'s ``compile`` as a mode of ``COMPILE_MODES``, or None: False/None is off, True is "default"."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"compile must be True, False or one of {', '.join(map(repr, COMPILE_MODES))}, got {value!r}")


def compile_decode_step(model: Transformer, mode: str = "default") -> DecodeStep:
    """The decode step under ``torch.compile``: attention over a span of the cache (``attention_span``), masked per
    row, so that shapes change only with the batch size and the span, both compiled as dynamic. On a CPU inductor
    freezes the weights (constant-folded and prepacked), the fastest its GEMMs run; ``mode="max-autotune"`` also
    lets it pick, by timing them at compile time, its own C++ GEMM kernels (AMX / AVX-512 micro-kernels, int8
    weights included) where they beat oneDNN's: slower to compile, faster on CPUs that have them (see the README).
    On one CUDA device the step is replayed as a CUDA graph (one per batch size and span, recorded at its first
    step), which removes the launch of each of its hundreds of kernels from every step; under model parallelism
    it is not, its collectives running between graphs.
    """
    def step(tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        return model.forward(tokens, positions, kv_len=kv_len)[:, -1]

    device = model.output.weight.device
    if device.type == "cuda" and distributed.active_group().size == 1:
        torch_mode = "max-autotune" if mode == "max-autotune" else "reduce-overhead"
    else:
        torch_mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else None
    compiled = torch.compile(step, dynamic=True, mode=torch_mode)
    if device.type != "cpu":
        return compiled

    def frozen(tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        # Inductor reads `freezing` when it compiles, which is at the first call (and at any recompilation), not at
        # torch.compile(): passed there as an option it did not take effect (measured: no faster than eager).
        with torch._inductor.config.patch(freezing=True):
            return compiled(tokens, positions, kv_len)

    return frozen
