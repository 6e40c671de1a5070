"""How much memory a model will take on one rank, and how much a device has: checked before anything large is allocated."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch

from llama.args import ModelArgs, local_head_counts
from llama.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

GB = 1e9


# Bytes per weight of the linear layers when quantized: int8 values; int4 values two to a byte plus a bf16 scale
# and zero per group of 64 (the per-row int8 scale is negligible).
QUANTIZED_BYTES = {"int8": 1.0, "int4": 0.5 + 4 / 64}


def _parameter_counts(args: ModelArgs) -> Tuple[int, int]:
    """(parameters of the linear layers, output included; of the embedding and the norms)."""
    assert args.n_kv_heads is not None
    dim, hidden, vocab = args.dim, args.hidden_dim, max(args.vocab_size, 0)
    kv = args.n_kv_heads * args.head_dim
    linear = args.n_layers * (2 * dim * dim + 2 * kv * dim + 3 * hidden * dim) + vocab * dim  # the output is linear
    return linear, vocab * dim + (2 * args.n_layers + 1) * dim


def parameter_count(args: ModelArgs) -> int:
    return sum(_parameter_counts(args))


def weight_bytes(args: ModelArgs, n_ranks: int, dtype: torch.dtype, quantize: Optional[str] = None) -> int:
    """Bytes of one rank's share of the weights (norms are replicated; everything else is split)."""
    linear, other = _parameter_counts(args)
    linear_bytes = QUANTIZED_BYTES[quantize] if quantize else dtype.itemsize
    replicated = (2 * args.n_layers + 1) * args.dim
    return int(linear * linear_bytes) // n_ranks + ((other - replicated) // n_ranks + replicated) * dtype.itemsize


def kv_cache_bytes(args: ModelArgs, n_ranks: int, dtype: torch.dtype) -> int:
    """Bytes of one rank's KV caches for ``max_batch_size`` rows of ``max_seq_len`` positions, plus the rotary tables."""
    _, n_local_kv_heads = local_head_counts(args, n_ranks)
    cache = 2 * args.n_layers * args.max_batch_size * n_local_kv_heads * args.max_seq_len * args.head_dim * dtype.itemsize
    rope = 2 * (2 * args.max_seq_len) * (args.head_dim // 2) * 4  # cos and sin, float32, twice max_seq_len
    return cache + rope


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory this process can still allocate on device, or None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        return int(recommended() - torch.mps.driver_allocated_memory()) if recommended else None
    candidates = [_meminfo_available(), _cgroup_available()]
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> Optional[int]:
    """The container's memory limit less its usage (cgroup v2, then v1), or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        return max(0, int(limit) - usage)
    return None


def check_fits(
    args: ModelArgs, n_ranks: int, dtype: torch.dtype, device: torch.device, source: str = "params.json", quantize: Optional[str] = None,
    compiled: bool = False,
) -> None:
    """Raise before loading when this rank's weights and KV caches cannot fit in the device's free memory.

    On a CPU every model-parallel process of this host loads at once, so the host needs all their shares; a compiled
    decode step there holds prepacked copies of the weights besides them (``COMPILED_CPU_WEIGHT_COPIES``).
    """
    available = available_bytes(device)
    if available is None:
        return
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if device.type == "cpu" else 1
    weights = weight_bytes(args, n_ranks, dtype, quantize) * ranks_here
    cache = kv_cache_bytes(args, n_ranks, dtype) * ranks_here
    where = f"{device} has {available / GB:.1f} GB free" + (f" for {ranks_here} processes" if ranks_here > 1 else "")
    if weights > available:
        raise CheckpointError(
            f"{source} describes a model (dim={args.dim}, n_layers={args.n_layers}, vocab_size={args.vocab_size}) whose "
            f"weights take {weights / GB:.1f} GB in {str(dtype).removeprefix('torch.')} on this rank, but {where}"
        )
    if weights + cache > available:
        raise InputError(
            f"max_seq_len={args.max_seq_len} and max_batch_size={args.max_batch_size} need {cache / GB:.1f} GB of KV cache "
            f"on top of {weights / GB:.1f} GB of weights, but {where}; pass a smaller max_seq_len or max_batch_size to Llama.build"
        )
    copies = COMPILED_CPU_WEIGHT_COPIES if compiled and device.type == "cpu" else 1
    if copies * weights + cache > available:
        raise InputError(
            f"compile=True on a CPU keeps prepacked copies of the weights beside them (about {copies}x their "
            f"{weights / GB:.1f} GB, with {cache / GB:.1f} GB of KV cache), but {where}; pass compile=False"
        )
    logger.debug("memory: %.2f GB of weights and %.2f GB of KV cache; %s", weights / GB, cache / GB, where)


# Inductor's freezing prepacks every weight into a layout of its own, and the eager prefill keeps the originals:
# measured peak RSS of the L shape compiled, over the weights' bytes, 2.8x in bfloat16 and 2.7x in int8.
COMPILED_CPU_WEIGHT_COPIES = 3

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
REUSED_BLOCK_BYTES = 32 << 20  # glibc's largest mmap threshold


def reuse_freed_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MB for reuse instead of returning them to the OS (process-wide).

    By default every freed block over 128 KB is unmapped, so each forward's activations fault in fresh zeroed
    pages: that made a 128-token prefill 1.7x slower here. Called after the weights are loaded, which stay in
    blocks of their own. Returns whether it applied (Linux with glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, REUSED_BLOCK_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, 4 * REUSED_BLOCK_BYTES))
