"""The safetensors file layout, for writing one tensor at a time (``safetensors.torch.save_file`` needs them all).

A file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte range,
then the tensors' bytes, row-major and little-endian, in the header's order. Reading goes through ``safe_open``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from llama.shard_files import atomic_write

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
Spec = Tuple[str, Tuple[int, ...], torch.dtype]  # (name, shape, dtype)


def file_bytes(specs: List[Spec]) -> int:
    """Bytes the tensors of ``specs`` take in a file (the header aside)."""
    return sum(_nbytes(shape, dtype) for _, shape, dtype in specs)


def _nbytes(shape: Tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


def write_safetensors(path: Path, specs: List[Spec], tensor: Callable[[str], torch.Tensor]) -> None:
    """Write ``path`` holding the tensors ``specs`` names, asking ``tensor(name)`` for each in turn (atomically).

    The header is written first from ``specs``; each tensor must come back with the shape and dtype promised there.
    """
    assert sys.byteorder == "little", "safetensors files are little-endian"
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, shape, dtype in specs:
            t = tensor(name)
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, f"{name}: got {tuple(t.shape)} {t.dtype}, promised {shape} {dtype}"
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
