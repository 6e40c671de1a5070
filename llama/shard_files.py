"""Shard files on disk: finding them, mapping them without running code, letting go of mapped pages, writing atomically."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import os
import pickle
import re
import secrets
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

from llama.errors import CheckpointError

logger = logging.getLogger(__name__)

# Present in Meta's first Llama checkpoints; recomputed by the model, so skipped.
IGNORED_KEYS = frozenset({"rope.freqs"})
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


class MappedShard(Dict[str, torch.Tensor]):
    """A shard's tensors as ``load_shard`` returns them: views of the memory-mapped file.

    Their pages are file-backed, so ``release_pages`` may drop them once copied: a later read maps them in again.
    """


def find_shards(ckpt_dir: Path) -> List[Path]:
    """The ``*.pth`` shards of a checkpoint folder, sorted by name; a gap in Meta's numbering is an error."""
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} not found")
    paths = sorted(ckpt_dir.glob("*.pth"))
    if not paths:
        raise FileNotFoundError(f"no checkpoint files (*.pth) found in {ckpt_dir}")
    numbers = [int(m.group(1)) for m in map(SHARD_NAME.fullmatch, (p.name for p in paths)) if m]
    if len(numbers) == len(paths):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        if missing:
            names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
            raise FileNotFoundError(f"{ckpt_dir} holds {len(paths)} shard(s) but is missing {names}")
    return paths


def load_shard(path: Path) -> MappedShard:
    """Memory-map one shard; only tensors and plain containers are unpickled, never code.

    The tensors are views of the file: a file truncated while they live makes reading them a bus error,
    so keep them only while copying out of them (``state_dict_for_rank``).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint shard {path} not found") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors, which are not loaded (weights_only=True): {e}") from e
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path} could not be read as a torch checkpoint (truncated, or not saved by torch.save?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} must hold a state dict mapping tensor names to tensors")
    return MappedShard((k, v) for k, v in state.items() if k not in IGNORED_KEYS)


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the whole pages under a memory-mapped tensor from this process (Linux; elsewhere a no-op).

    The file is not touched and its pages stay in the page cache; they stop counting in this process's
    resident memory, and a later read maps them in again. Only pages that lie wholly inside the tensor's
    span are dropped, never one shared with a neighbouring tensor.
    """
    madvise = _madvise()
    if madvise is None or tensor.numel() == 0:
        return
    span = (1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))) * tensor.element_size()
    start = tensor.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # round in: up at the start, down at the end
    last = (start + span) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and madvise(first, last - first, _MADV_DONTNEED) != 0:
        logger.debug("madvise(MADV_DONTNEED) failed with errno %d; the mapped pages stay resident", ctypes.get_errno())


_MADV_DONTNEED = 4  # Linux's value; on other systems MADV_DONTNEED does not drop pages, so it is not used


@functools.lru_cache(maxsize=None)
def _madvise() -> Optional[Callable[[int, int, int], int]]:
    """libc's madvise on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed over ``path``, on failure removed.

    A reader sees the old file or the new one, never half of one; a process that has the old file open or
    mapped keeps it whole (the rename gives ``path`` a new inode rather than rewriting the old one).
    """
    # Hidden, and not *.pth, so a folder being written never lists the temporary file as a shard.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
