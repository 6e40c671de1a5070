"""Collectives among the processes of one model-parallel group on one host's CPU, through shared memory.

gloo takes hundreds of microseconds for an all-reduce of a few kilobytes over loopback TCP; a decode
step makes two per layer. Here each rank writes its tensor into its own slot of a shared mapping,
publishes a sequence number, and spins until every peer has published the same one: about 10 us.
Two banks of slots alternate, so a rank may start op k+1 while a slower peer still reads op k.
Each rank holds a POSIX lock on one byte of the segment's file for the group's life; the kernel drops it when the
process dies, so a peer's death shows in any PID namespace, where its PID may name another process or none.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Dict, Optional

import torch

from llama.errors import DistributedError

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks, and no shared-memory collectives
    fcntl = None  # type: ignore[assignment]

_FLAG_STRIDE = 8  # int64s per rank's flag: a 64-byte cache line each, so ranks do not share one
_SPINS_BEFORE_YIELD = 256
_LIVENESS_PERIOD_S = 0.2


def supported() -> bool:
    """Whether this machine orders stores as the protocol needs (x86's total store order) and has POSIX locks."""
    return platform.machine().lower() in ("x86_64", "amd64") and fcntl is not None


def new_segment_path() -> Path:
    shm_dir = Path("/dev/shm")
    return (shm_dir if shm_dir.is_dir() else Path(tempfile.gettempdir())) / f"llama-{uuid.uuid4().hex}"


class SharedMemoryGroup:
    """all_reduce / all_gather / broadcast of tensors up to ``slot_bytes`` among ``world_size`` local processes.

    Every rank must call the same collectives in the same order, as with torch.distributed.
    """

    def __init__(self, path: Path, rank: int, world_size: int, slot_bytes: int, timeout_s: float, create: bool) -> None:
        """Create (rank 0) or open the segment at path; an OSError when it cannot be reserved, opened or locked."""
        self.rank, self.world_size = rank, world_size
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        self._header = _FLAG_STRIDE * 8 * world_size
        size = self._header + 2 * world_size * slot_bytes
        # Kept open for the group's life: it holds this rank's liveness lock, which closing any fd of the file would drop.
        self._fd = fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                _reserve(fd, size, path)
            elif os.fstat(fd).st_size < size:
                raise OSError(errno.EINVAL, f"{path} holds {os.fstat(fd).st_size} bytes, not the {size} this group needs")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, rank)
            self._mmap = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        weakref.finalize(self, os.close, fd)
        self._flags = memoryview(self._mmap).cast("q")
        self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._seq = 0
        self._views: Dict[tuple, torch.Tensor] = {}

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.numel() * tensor.element_size() <= self.slot_bytes

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, accumulated in float32 in rank order so every rank gets the same bits."""
        bank = self._publish(tensor)
        total = self._slot(bank, 0, tensor).float() + self._slot(bank, 1, tensor)  # a new tensor: slots stay as written
        for rank in range(2, self.world_size):
            total += self._slot(bank, rank, tensor)
        return total.to(tensor.dtype)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's tensor, concatenated in rank order along dim."""
        bank = self._publish(tensor)
        return torch.cat([self._slot(bank, rank, tensor) for rank in range(self.world_size)], dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank src's tensor, on every rank."""
        bank = self._publish(tensor)
        return self._slot(bank, src, tensor).clone()

    def _slot(self, bank: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        """A view of rank's slot in bank, shaped like ``like`` (views are cached: decode repeats a few shapes)."""
        key = (bank, rank, like.dtype, like.shape)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 256:
                self._views.clear()
            nbytes = like.numel() * like.element_size()
            start = self._header + (bank * self.world_size + rank) * self.slot_bytes
            # Made outside inference mode whatever the caller's mode: a view made inside it could not be written
            # by a later call from outside (the check that ranks got the same prompts runs there).
            with torch.inference_mode(False):
                view = self._views[key] = self._bytes[start : start + nbytes].view(like.dtype).view(like.shape)
        return view

    def _publish(self, tensor: torch.Tensor) -> int:
        """Write tensor (the caller checked it ``fits``) into this rank's slot of the next bank, then wait for every rank's."""
        self._seq += 1
        bank = self._seq % 2
        self._slot(bank, self.rank, tensor).copy_(tensor)
        self._flags[self.rank * _FLAG_STRIDE] = self._seq  # after the data: x86 keeps stores in order
        for rank in range(self.world_size):
            self._wait_for(rank)
        return bank

    def _wait_for(self, rank: int) -> None:
        flag = rank * _FLAG_STRIDE
        spins = 0
        deadline: Optional[float] = None
        next_check = 0.0
        while self._flags[flag] < self._seq:
            spins += 1
            if spins < _SPINS_BEFORE_YIELD:
                continue
            os.sched_yield()  # with more processes than cores, let the peer run
            if spins % 1024 == 0:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout_s
                if now >= deadline:
                    raise DistributedError(
                        f"rank {self.rank}: rank {rank} of the model-parallel group did not answer within {self.timeout_s:.0f} s"
                    )
                if now >= next_check:
                    self._check_alive(rank)
                    next_check = now + _LIVENESS_PERIOD_S

    def _check_alive(self, rank: int) -> None:
        """Raise if rank's process has exited: its lock on its byte of the file is gone (then the lock attempt succeeds)."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, rank)
        except OSError:
            return  # held (EACCES or EAGAIN): the peer lives; it may hang, which the timeout catches
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, rank)
        raise DistributedError(f"rank {self.rank}: rank {rank} of the model-parallel group exited")


def _reserve(fd: int, size: int, path: Path) -> None:
    """Allocate size bytes for fd's file now: a sparse tmpfs file over the free space of /dev/shm dies of SIGBUS at first touch."""
    if not hasattr(os, "posix_fallocate"):  # macOS: no /dev/shm; the file is on disk in the temporary folder
        os.ftruncate(fd, size)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        fs = os.statvfs(path.parent)
        free = fs.f_bavail * fs.f_frsize
        raise OSError(e.errno, f"could not reserve {_size(size)} in {path.parent} ({_size(free)} free): {e.strerror}") from e


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.1f} KiB"
