"""SharedMemoryGroup on its own: the segment's memory is reserved at setup, and a peer's death is seen through its lock."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from llama import shm_group
from llama.errors import DistributedError
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not shm_group.supported() or not Path("/dev/shm").is_dir(), reason="needs x86 and /dev/shm")

TIMEOUT_S = 1.0


@pytest.fixture
def segment() -> Iterator[Path]:
    path = shm_group.new_segment_path()
    yield path
    path.unlink(missing_ok=True)


def test_segment_larger_than_dev_shm_is_refused_at_setup(segment: Path) -> None:
    """Created sparse, it used to be accepted, then die of SIGBUS at the first collective that touched the missing pages."""
    fs = os.statvfs(segment.parent)
    slot_bytes = fs.f_blocks * fs.f_frsize // 4 + 4096  # two banks of two slots: more than the whole filesystem
    with pytest.raises(OSError) as raised:
        shm_group.SharedMemoryGroup(segment, 0, 2, slot_bytes, TIMEOUT_S, create=True)
    assert raised.value.errno == errno.ENOSPC
    assert re.search(rf"could not reserve [\d.]+ MiB in {segment.parent} \([\d.]+ [KM]iB free\): ", str(raised.value)), raised.value


PEER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from llama.shm_group import SharedMemoryGroup
    group = SharedMemoryGroup(Path(sys.argv[1]), 1, 2, 64, 60.0, create=False)
    print("attached", flush=True)
    print(group.all_reduce(torch.tensor([2.0, 3.0])).tolist(), flush=True)
    time.sleep(600)  # alive, but in no collective: a hung peer
    """
)


def test_hung_peer_times_out_and_dead_peer_is_seen_at_once(segment: Path) -> None:
    group = shm_group.SharedMemoryGroup(segment, 0, 2, 64, TIMEOUT_S, create=True)
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(segment)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "attached"  # as setup_collectives's last collective ensures
        assert group.all_reduce(torch.tensor([1.0, 1.0])).tolist() == [3.0, 4.0]
        assert peer.stdout.readline().strip() == "[3.0, 4.0]"
        start = time.monotonic()
        with pytest.raises(DistributedError, match=r"^rank 0: rank 1 of the model-parallel group did not answer within 1 s$"):
            group.all_reduce(torch.ones(2))  # the peer holds its lock: only the timeout ends the wait
        assert time.monotonic() - start >= TIMEOUT_S
        peer.kill()
        peer.wait()
        start = time.monotonic()
        with pytest.raises(DistributedError, match=r"^rank 0: rank 1 of the model-parallel group exited$"):
            group.all_reduce(torch.ones(2))
        assert time.monotonic() - start < TIMEOUT_S / 2
    finally:
        peer.kill()
        peer.wait()
