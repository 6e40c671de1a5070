"""The one module that talks to torch.distributed and fairscale: backend, ranks, device and dtype choice, rank-0 output."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from llama import shm_group
from llama.errors import DistributedError, InputError

logger = logging.getLogger(__name__)

# Set by setup_collectives when every rank of this process's model-parallel group runs on this host's CPU.
_shared_memory: Optional[shm_group.SharedMemoryGroup] = None

DEFAULT_TIMEOUT_S = 600.0
_GLOO_PEER_ERRORS = ("gloo", "Connection closed by peer", "Connection reset by peer", "Timed out waiting")
_DTYPE_NAMES = {
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
        if name not in _DTYPE_NAMES:
            raise InputError(f"dtype={dtype!r} is not a floating dtype; use one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[name]
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values():
        return dtype
    raise InputError(f"dtype={dtype!r} is not supported; use torch.float32, torch.bfloat16 or torch.float16")


def timeout() -> timedelta:
    """How long a collective waits for a peer before failing (``LLAMA_DIST_TIMEOUT`` seconds, default 600)."""
    raw = os.environ.get("LLAMA_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise InputError(f"LLAMA_DIST_TIMEOUT={raw!r} must be a number of seconds") from None
    return timedelta(seconds=seconds)


def init_process_group(device: torch.device) -> None:
    """Join the process group torchrun describes (or one of this process alone), unless one exists already.

    The backend is nccl for CUDA and gloo otherwise; ``LLAMA_DIST_BACKEND`` overrides it.
    """
    if dist.is_initialized():
        return
    backend = os.environ.get("LLAMA_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout())
    else:
        # A plain `python script.py`: a group of one, over an in-process store (no port to pick).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout())
    atexit.register(_destroy_process_group)
    _forget_model_parallel()  # any groups left belonged to a process group destroyed since
    if device.type == "mps" and dist.get_world_size() > 1:
        raise InputError(
            f"{dist.get_world_size()} processes on MPS: gloo cannot exchange MPS tensors. "
            "Run one process; it loads a checkpoint of any shard count"
        )
    logger.info("process group: backend %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())


def _destroy_process_group() -> None:
    """Tear down fairscale's groups, then the process group, before interpreter shutdown would do it in any order.

    Left to shutdown, a gloo group referenced from fairscale's globals sometimes aborts the process on exit
    ("terminate called without an active exception"), after the work is done.
    """
    _forget_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _forget_model_parallel() -> None:
    """Drop fairscale's model-parallel groups and the shared memory that served them."""
    global _shared_memory
    _shared_memory = None
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()


def init_model_parallel(model_parallel_size: Optional[int]) -> int:
    """Set up fairscale's model-parallel groups (all ranks by default) and return their size."""
    world_size = dist.get_world_size()
    size = world_size if model_parallel_size is None else model_parallel_size
    if not isinstance(size, int) or size < 1 or world_size % size:
        raise InputError(f"model_parallel_size={model_parallel_size!r} must be a positive divisor of the world size {world_size}")
    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() == size:
            return size
    _forget_model_parallel()
    # fairscale calls dist.new_group without a timeout, which gives its groups torch's default (30 minutes
    # for gloo), not LLAMA_DIST_TIMEOUT: a hung rank would stall the others for that long.
    new_group = dist.new_group
    dist.new_group = functools.partial(new_group, timeout=timeout())
    try:
        fs_init.initialize_model_parallel(size)
    finally:
        dist.new_group = new_group
    return size


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank()


def model_parallel_size() -> int:
    return fs_init.get_model_parallel_world_size()


def silence_stdout_off_rank0() -> None:
    """Send stdout of ranks other than 0 to /dev/null, as the reference does; stderr stays."""
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")


def _collective_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def peer_failures(what: str) -> Iterator[None]:
    """Turn a collective that failed because a peer died or timed out into a ``DistributedError`` naming ``what``."""
    try:
        yield
    except RuntimeError as e:
        # NCCL raises DistError; gloo a plain RuntimeError from its transport ("Connection reset by peer", "Timed out").
        if not isinstance(e, dist.DistError) and not any(sign in str(e) for sign in _GLOO_PEER_ERRORS):
            raise
        raise DistributedError(f"rank {rank()}: another rank failed, exited or timed out while {what}: {e}") from e


def raise_if_any_rank_failed(error: Optional[BaseException], what: str, device: torch.device) -> None:
    """Collective: re-raise this rank's error, or raise ``DistributedError`` here if another rank had one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_collective_device(device))
        failed[dist.get_rank()] = int(error is not None)
        with peer_failures(what):
            dist.all_reduce(failed)
        failed_ranks = [i for i, flag in enumerate(failed.tolist()) if flag]
    else:
        failed_ranks = []
    if error is not None:
        raise error
    if failed_ranks:
        raise DistributedError(f"rank {rank()}: rank(s) {failed_ranks} failed while {what}; their own output names the cause")


def setup_collectives(device: torch.device, slot_bytes: int) -> None:
    """Collective: use shared memory for the model-parallel group's small collectives when all its ranks share this CPU.

    ``LLAMA_SHM_COLLECTIVES=0`` keeps torch.distributed for everything.
    """
    global _shared_memory
    _shared_memory = None
    size = model_parallel_size()
    if size == 1 or device.type != "cpu" or os.environ.get("LLAMA_SHM_COLLECTIVES", "1") == "0" or not shm_group.supported():
        return
    group = fs_init.get_model_parallel_group()
    peers: list = [None] * size
    dist.all_gather_object(peers, (_host_id(), os.getpid()), group=group)
    if len({host for host, _ in peers}) > 1:
        return
    path = [shm_group.new_segment_path()]
    dist.broadcast_object_list(path, src=fs_init.get_model_parallel_src_rank(), group=group)
    pids = [pid for _, pid in peers]
    group_rank = model_parallel_rank()
    error: Optional[OSError] = None

    def attach(create: bool) -> Optional[shm_group.SharedMemoryGroup]:
        nonlocal error
        try:
            return shm_group.SharedMemoryGroup(path[0], group_rank, size, pids, slot_bytes, timeout().total_seconds(), create=create)
        except OSError as e:
            error = e
            return None

    created = attach(create=True) if group_rank == 0 else None
    dist.barrier(group=group)  # every rank reaches it, so the file exists before the others open it
    if group_rank != 0:
        created = attach(create=False)
    failed = torch.tensor([int(error is not None)])
    dist.all_reduce(failed, group=group)  # also orders the unlink after every rank has opened the file
    if group_rank == 0:
        path[0].unlink(missing_ok=True)  # the mapping lives on; nothing is left behind if a rank dies
    if failed.item():
        logger.warning("shared-memory collectives unavailable (%s); using %s", error, dist.get_backend())
        return
    _shared_memory = created
    logger.info("model-parallel collectives through shared memory (%d ranks on this host)", size)


def collectives_transport() -> str:
    """How decode-step collectives travel: "shared memory", the process group's backend, or "none" for a group of one."""
    if model_parallel_size() == 1:
        return "none"
    return "shared memory" if _shared_memory is not None else str(dist.get_backend())


def _host_id() -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    return socket.gethostname() + (":" + boot_id.read_text().strip() if boot_id.is_file() else "")


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the model-parallel group."""
    # Shared memory first: set only for a group of several ranks, it is the decode path, where each check costs
    # microseconds (caches are cold after a layer's weights stream through them) and fairscale's size lookup is slow.
    if _shared_memory is not None and _shared_memory.fits(tensor):
        return _shared_memory.all_reduce(tensor)
    if model_parallel_size() == 1:
        return tensor
    dist.all_reduce(tensor, group=fs_init.get_model_parallel_group())
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The model-parallel group's tensors concatenated in rank order along dim."""
    if _shared_memory is not None and _shared_memory.fits(tensor):  # first, as in all_reduce
        return _shared_memory.all_gather(tensor, dim)
    size = model_parallel_size()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=fs_init.get_model_parallel_group())
    return torch.cat(parts, dim=dim)


def broadcast_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Make every model-parallel rank use the tokens of the group's first rank, so ranks never drift apart."""
    if _shared_memory is not None and _shared_memory.fits(tokens):  # first, as in all_reduce
        return _shared_memory.broadcast(tokens, src=0)
    if model_parallel_size() == 1:
        return tokens
    group_tokens = tokens.to(_collective_device(tokens.device))
    dist.broadcast(group_tokens, src=fs_init.get_model_parallel_src_rank(), group=fs_init.get_model_parallel_group())
    return group_tokens.to(tokens.device)
