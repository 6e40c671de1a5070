"""Which device and dtype a run uses: the fastest the machine has, unless one is given."""

from __future__ import annotations

import os
from typing import Union

import torch

from llama.errors import InputError

# The names ``dtype`` may be given by (``Llama.build(dtype=...)``, ``--dtype``).
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """The device to run on: ``cuda:LOCAL_RANK``, else ``mps``, else ``cpu``, unless one is given."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a torch device; use 'cpu', 'mps', 'cuda' or 'cuda:N'") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device={device!r} but CUDA is not available here; pass device='cpu' or leave it None")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank())
        if resolved.index >= torch.cuda.device_count():
            raise InputError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif resolved.type == "mps" and not _mps_available():
        raise InputError(f"device={device!r} but MPS is not available here; pass device='cpu' or leave it None")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device={device!r} is not supported; use 'cpu', 'mps' or 'cuda'")
    return resolved


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); then bf16 is faster than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The compute dtype: the fastest the device handles well, unless one is given."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        if name not in DTYPE_NAMES:
            raise InputError(f"dtype={dtype!r} is not a floating dtype; use one of {sorted(DTYPE_NAMES)}")
        return DTYPE_NAMES[name]
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    raise InputError(f"dtype={dtype!r} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
