"""The one module that talks to torch.distributed and fairscale: backend, ranks, groups, collectives, rank-0 output.

Each ``Llama`` keeps its own ``ModelParallelGroup``; the collectives here (the model's layers call them) use the group
``using`` made active for this thread, else the group of the latest build.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import socket
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from llama import shm_group
from llama.errors import DistributedError, InputError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelParallelGroup:
    """The ranks that together hold one model: their torch group, this rank's place, and shared memory when on one CPU."""

    handle: Optional[dist.ProcessGroup]  # None for the group of one that needs no process group
    ranks: Tuple[int, ...]  # global ranks, in group order; ranks[0] decides the sampled tokens
    rank: int  # this process's index in ranks
    size: int  # len(ranks), a field: the decode path reads it
    shared_memory: Optional[shm_group.SharedMemoryGroup] = None


_ALONE = ModelParallelGroup(None, (0,), 0, 1)


class _Active(threading.local):
    group: Optional[ModelParallelGroup] = None  # set by ``using``, per thread


_active = _Active()
_latest: ModelParallelGroup = _ALONE  # the group of the latest init_model_parallel / setup_collectives
# fairscale keeps one set of groups in globals; a set per model-parallel size, kept here, lets a process build models of
# several sizes without creating groups again (new_group is collective: every rank must create them in the same order).
_FAIRSCALE_GLOBALS = ("_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_PIPELINE_PARALLEL_GROUP", "_PIPELINE_PARALLEL_RANKS")
_fairscale_groups: Dict[int, tuple] = {}
_fairscale_world: Optional[dist.ProcessGroup] = None  # the process group those belong to

DEFAULT_TIMEOUT_S = 600.0
_MAX_TIMEOUT_S = 1e9  # about 31 years; far larger ones overflow timedelta
_GLOO_PEER_ERRORS = ("gloo", "Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def timeout() -> timedelta:
    """How long a collective waits for a peer before failing (``LLAMA_DIST_TIMEOUT`` seconds, default 600)."""
    raw = os.environ.get("LLAMA_DIST_TIMEOUT")
    if raw is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0.001 <= seconds <= _MAX_TIMEOUT_S:  # also rejects nan; torch counts milliseconds, so less is 0
        raise InputError(
            f"LLAMA_DIST_TIMEOUT={raw!r} is not a usable timeout: expected a number of seconds from 0.001 to {_MAX_TIMEOUT_S:.0e}, "
            f"such as the default {DEFAULT_TIMEOUT_S:.0f}"
        )
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
    logger.debug("process group: backend %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())


def _destroy_process_group() -> None:
    """Tear down fairscale's groups, then the process group, before interpreter shutdown would do it in any order.

    Left to shutdown, a gloo group referenced from fairscale's globals sometimes aborts the process on exit
    ("terminate called without an active exception"), after the work is done.
    """
    _forget_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _forget_model_parallel() -> None:
    """Drop fairscale's model-parallel groups and those cached for other sizes (models built already keep theirs)."""
    global _latest, _fairscale_world
    _latest = _ALONE
    _fairscale_groups.clear()
    _fairscale_world = None
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()


def init_model_parallel(model_parallel_size: Optional[int]) -> int:
    """Point fairscale's model-parallel groups (all ranks by default) at groups of that size, made once per size; return it.

    Collective: every rank of the process group calls it, in the same order of sizes.
    """
    global _latest, _fairscale_world
    world_size = dist.get_world_size()
    size = world_size if model_parallel_size is None else model_parallel_size
    if not isinstance(size, int) or size < 1 or world_size % size:
        raise InputError(f"model_parallel_size={model_parallel_size!r} must be a positive divisor of the world size {world_size}")
    if _fairscale_world is not None and _fairscale_world is not dist.group.WORLD:  # cached for a process group destroyed since
        _forget_model_parallel()
    current = fs_init.model_parallel_is_initialized() and fs_init.get_model_parallel_world_size() == size
    if not current and size in _fairscale_groups:
        for name, value in zip(_FAIRSCALE_GLOBALS, _fairscale_groups[size]):
            setattr(fs_init, name, value)
    elif not current:
        fs_init.destroy_model_parallel()
        # fairscale calls dist.new_group without a timeout, which gives its groups torch's default (30 minutes
        # for gloo), not LLAMA_DIST_TIMEOUT: a hung rank would stall the others for that long.
        new_group = dist.new_group
        dist.new_group = functools.partial(new_group, timeout=timeout())
        printed = io.StringIO()  # fairscale prints "> initializing ..." lines: kept out of the generated text
        try:
            with contextlib.redirect_stdout(printed):
                fs_init.initialize_model_parallel(size)
        finally:
            dist.new_group = new_group
            for line in printed.getvalue().splitlines():
                logger.debug("fairscale: %s", line)
    _fairscale_groups[size] = tuple(getattr(fs_init, name) for name in _FAIRSCALE_GLOBALS)
    _fairscale_world = dist.group.WORLD
    _latest = _fairscale_group()
    return size


def _fairscale_group() -> ModelParallelGroup:
    """fairscale's current model-parallel group, as a ``ModelParallelGroup`` without shared memory."""
    handle = fs_init.get_model_parallel_group()
    ranks = tuple(dist.get_process_group_ranks(handle))
    return ModelParallelGroup(handle, ranks, ranks.index(dist.get_rank()), len(ranks))


def active_group() -> ModelParallelGroup:
    """The group this thread's collectives use: the one ``using`` set, else the latest built."""
    return _active.group or _latest


@contextlib.contextmanager
def using(group: ModelParallelGroup) -> Iterator[None]:
    """Send this thread's collectives (those the model's layers make, too) through group until the block ends."""
    previous, _active.group = _active.group, group
    try:
        yield
    finally:
        _active.group = previous


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


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


def setup_collectives(device: torch.device, slot_bytes: int) -> ModelParallelGroup:
    """Collective: the current model-parallel group, with shared memory for its small collectives when all its ranks
    share this CPU (``LLAMA_SHM_COLLECTIVES=0`` keeps torch.distributed for everything)."""
    global _latest
    group = _fairscale_group()
    shm_wanted = device.type == "cpu" and os.environ.get("LLAMA_SHM_COLLECTIVES", "1") != "0" and shm_group.supported()
    if group.size > 1 and shm_wanted:
        group = dataclasses.replace(group, shared_memory=_attach_shared_memory(group, slot_bytes))
    _latest = group
    return group


def _attach_shared_memory(group: ModelParallelGroup, slot_bytes: int) -> Optional[shm_group.SharedMemoryGroup]:
    """Collective over group: a shared segment for it, or None (with a warning naming the failed rank and why)."""
    hosts: List[Optional[str]] = [None] * group.size
    dist.all_gather_object(hosts, _host_id(), group=group.handle)
    if len(set(hosts)) > 1:
        return None
    path = [shm_group.new_segment_path()]
    dist.broadcast_object_list(path, src=group.ranks[0], group=group.handle)
    segment: Optional[shm_group.SharedMemoryGroup] = None
    error: Optional[str] = None
    try:
        if group.rank == 0:
            segment, error = _open_segment(path[0], group, slot_bytes, create=True)
        created = [error]
        dist.broadcast_object_list(created, src=group.ranks[0], group=group.handle)  # the others open the file after this
        if group.rank != 0 and created[0] is None:
            segment, error = _open_segment(path[0], group, slot_bytes, create=False)
        errors: List[Optional[str]] = [None] * group.size
        dist.all_gather_object(errors, error, group=group.handle)  # every rank has opened the file (or failed) past here
    finally:
        path[0].unlink(missing_ok=True)  # the mappings live on; nothing is left behind, whichever rank fails or dies
    failures = "; ".join(f"rank {r}: {e}" for r, e in zip(group.ranks, errors) if e is not None)
    if failures:
        logger.warning(
            "shared-memory collectives unavailable (%s); the model-parallel collectives use %s instead. "
            "Give /dev/shm more room (docker run --shm-size) for them, or set LLAMA_SHM_COLLECTIVES=0 to skip this attempt",
            failures, dist.get_backend(group.handle),
        )
        return None
    logger.debug("model-parallel collectives through shared memory (%d ranks on this host)", group.size)
    return segment


def _open_segment(
    path: Path, group: ModelParallelGroup, slot_bytes: int, create: bool
) -> Tuple[Optional[shm_group.SharedMemoryGroup], Optional[str]]:
    try:
        return shm_group.SharedMemoryGroup(path, group.rank, group.size, slot_bytes, timeout().total_seconds(), create=create), None
    except OSError as e:
        return None, str(e)


def collectives_transport(group: Optional[ModelParallelGroup] = None) -> str:
    """How group's decode-step collectives travel (default: the active group's): "shared memory", the process group's
    backend, or "none" for a group of one."""
    if group is None:
        group = active_group()
    if group.size == 1:
        return "none"
    return "shared memory" if group.shared_memory is not None else str(dist.get_backend(group.handle))


def check_same_inputs(what: str, payload: bytes) -> None:
    """Collective over the active model-parallel group: raise ``InputError`` on every rank unless all passed the same payload.

    Ranks given different prompts would otherwise run different collectives and hang or abort.
    """
    group = active_group()
    if group.size == 1:
        return
    digest = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little", signed=True)
    nccl = dist.get_backend(group.handle) == "nccl"
    mine = torch.tensor([digest], dtype=torch.int64, device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    with peer_failures(f"comparing {what} across ranks"):
        digests = all_gather(mine, dim=0).tolist()
    differ = [r for r, d in zip(group.ranks, digests) if d != digests[0]]
    if differ:
        raise InputError(
            f"rank {rank()}: rank(s) {differ} passed different {what} from rank {group.ranks[0]}; "
            "every rank of a model-parallel group must pass the same prompts and sampling arguments"
        )


def _host_id() -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    return socket.gethostname() + (":" + boot_id.read_text().strip() if boot_id.is_file() else "")


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the active model-parallel group."""
    return _outside_compiled_graphs(_all_reduce)(tensor)


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The active model-parallel group's tensors concatenated in rank order along dim."""
    return _outside_compiled_graphs(_all_gather)(tensor, dim)


def broadcast_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Make every rank of the active model-parallel group use the tokens of its first rank, so ranks never drift apart."""
    return _outside_compiled_graphs(_broadcast)(tokens)


def broadcast_object(obj: object) -> object:
    """Collective over the active model-parallel group: its first rank's ``obj`` (picklable) on every rank; the
    others pass None. The server sends each step's new and cancelled sequences this way."""
    group = active_group()
    if group.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=group.ranks[0], group=group.handle)
    return box[0]


def _outside_compiled_graphs(collective: Callable) -> Callable:
    """The collective as it is, or, while torch.compile traces, run eagerly between two graphs: it talks to other
    processes (shared memory, sockets), which a graph cannot hold. (The model's layers skip it in a group of one.)"""
    return _run_eagerly[collective] if _is_compiling() else collective


# Shared memory first in each: on the decode path each check costs microseconds (caches are cold after a layer's
# weights stream through them); hence fields, not lookups.
def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    group = _active.group or _latest
    if group.size == 1:
        return tensor
    if group.shared_memory is not None and group.shared_memory.fits(tensor):
        return group.shared_memory.all_reduce(tensor)
    dist.all_reduce(tensor, group=group.handle)
    return tensor


def _all_gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    group = _active.group or _latest
    if group.size == 1:
        return tensor
    if group.shared_memory is not None and group.shared_memory.fits(tensor):
        return group.shared_memory.all_gather(tensor, dim)
    parts = [torch.empty_like(tensor) for _ in range(group.size)]
    dist.all_gather(parts, tensor.contiguous(), group=group.handle)
    return torch.cat(parts, dim=dim)


def _broadcast(tokens: torch.Tensor) -> torch.Tensor:
    group = _active.group or _latest
    if group.size == 1:
        return tokens
    if group.shared_memory is not None and group.shared_memory.fits(tokens):
        return group.shared_memory.broadcast(tokens, src=0)
    group_tokens = tokens.to(_collective_device(tokens.device))
    dist.broadcast(group_tokens, src=group.ranks[0], group=group.handle)
    return group_tokens.to(tokens.device)


_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_run_eagerly = {collective: torch.compiler.disable(collective) for collective in (_all_reduce, _all_gather, _broadcast)}
