"""A running model survives its checkpoint file changing, loading peaks near one copy of the weights, and writes are atomic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import pytest
import torch

from llama.args import ModelArgs
from llama.checkpoint import load_shard, write_shards
from llama.demo import make_demo_checkpoint, random_state_dict
from llama.reshard import reshard
from tests.conftest import ROOT, TINY_PARAMS, build

PROMPTS = [[1, 20, 30, 40], [1, 99]]
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def greedy(llama) -> List[List[int]]:
    return llama.generate(PROMPTS, 8, temperature=0)[0]


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_shard_overwritten_in_place_does_not_change_a_running_model(ckpt_copy: Path, make_checkpoint: Callable[..., Path]) -> None:
    """Writing other weights into the shard file itself (as ``cp`` does) used to swap a running model's weights."""
    llama = build(ckpt_copy)
    before = greedy(llama)
    other = (make_checkpoint(seed=1) / "consolidated.00.pth").read_bytes()
    shard = ckpt_copy / "consolidated.00.pth"
    assert len(other) == shard.stat().st_size  # same layout: every byte of the old file is overwritten
    with open(shard, "r+b") as f:
        f.write(other)
    assert greedy(build(ckpt_copy)) != before  # the file now holds weights that answer differently
    assert greedy(llama) == before


TRUNCATE = """
import json, os, sys, torch
from llama import Llama
ckpt = sys.argv[1]
llama = Llama.build(ckpt, os.path.join(ckpt, "tokenizer.model"), 64, 4, device="cpu", dtype=torch.float32)
prompts = json.loads(sys.argv[2])
before = llama.generate(prompts, 8, temperature=0)[0]
os.truncate(os.path.join(ckpt, "consolidated.00.pth"), 0)
after = llama.generate(prompts, 8, temperature=0)[0]
print(json.dumps({"before": before, "after": after}))
"""


def test_shard_truncated_while_a_model_runs_neither_crashes_nor_changes_it(ckpt_copy: Path) -> None:
    """A weight that was a view of the mapped file read past its end: a bus error, with no traceback."""
    done = run_python(TRUNCATE, str(ckpt_copy), json.dumps(PROMPTS))
    assert done.returncode == 0, f"exit code {done.returncode} (negative: killed by that signal; -7 is SIGBUS)\n{done.stderr}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["after"] == result["before"] and len(result["before"][0]) == 8


PEAK_RSS = """
import json, os, sys, torch
from llama import Llama

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def build(ckpt):
    return Llama.build(ckpt, os.path.join(ckpt, "tokenizer.model"), 16, 1, device="cpu", dtype=torch.float32)

build(sys.argv[1])  # the first build also sets up the process group and imports: leave that out of the measure
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
rss_before = status("VmRSS")
llama = build(sys.argv[2])
weights = sum(p.numel() * p.element_size() for p in llama.model.parameters())
print(json.dumps({"growth": status("VmHWM") - rss_before, "weights": weights}))
"""

# About 40 MB of float32 weights: large enough that the file's mapped pages, if kept, show as a second copy.
LARGE_PARAMS = dict(TINY_PARAMS, dim=512, n_layers=3, n_heads=8, n_kv_heads=8)


@LINUX
def test_loading_peaks_near_one_copy_of_the_weights(ckpt_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    """The weights are copied out of the mapped file; its pages are dropped once copied, or they would count as a second copy."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    large = make_demo_checkpoint(tmp_path / "large", params=LARGE_PARAMS, tokenizer_path=tokenizer_path)
    done = run_python(PEAK_RSS, str(ckpt_dir), str(large))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["weights"] > 30e6
    assert result["growth"] < 1.3 * result["weights"], f"peak RSS grew by {result['growth'] / result['weights']:.2f}x the weights' bytes"


def test_writing_shards_over_a_mapped_checkpoint_leaves_the_reader_the_old_file(tmp_path: Path) -> None:
    args = ModelArgs.from_params(TINY_PARAMS, vocab_size=512)
    old, new = random_state_dict(args, seed=0), random_state_dict(args, seed=1)
    [path] = write_shards(tmp_path, [old], args, 1)
    inode = path.stat().st_ino
    mapped = load_shard(path)  # views of the mapped old file, as a reader holds them while it loads
    write_shards(tmp_path, [new], args, 1)
    assert path.stat().st_ino != inode  # a new file renamed into place, not the old one rewritten
    for key in old:
        assert torch.equal(mapped[key], old[key]), key
        assert torch.equal(load_shard(path)[key], new[key]), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth"]


def test_a_write_that_fails_midway_leaves_the_old_shard_and_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ModelArgs.from_params(TINY_PARAMS, vocab_size=512)
    [path] = write_shards(tmp_path, [random_state_dict(args)], args, 1)
    old_bytes = path.read_bytes()

    def save_half_then_fail(obj: object, f: Path) -> None:
        Path(f).write_bytes(old_bytes[: len(old_bytes) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_shards(tmp_path, [random_state_dict(args, seed=1)], args, 1)
    assert path.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth"]


@pytest.mark.parametrize("writer", ["reshard", "demo"])
def test_writers_replace_every_file_of_a_folder_in_use_rather_than_rewrite_it(
    writer: str, make_checkpoint: Callable[..., Path], tokenizer_path: Path, tmp_path: Path
) -> None:
    """params.json, tokenizer.model and the shards each get a new inode; a reader with an old one open reads it whole."""
    dst = Path(shutil.copytree(make_checkpoint(n_shards=2), tmp_path / "in_use"))
    names = ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    old = {name: (dst / name).read_bytes() for name in names}
    inodes = {name: (dst / name).stat().st_ino for name in names}
    readers = {name: open(dst / name, "rb") for name in names}
    try:
        if writer == "reshard":
            reshard(make_checkpoint(n_shards=1, seed=1), dst, 2)
        else:
            make_demo_checkpoint(dst, n_shards=2, seed=1, params=TINY_PARAMS, tokenizer_path=tokenizer_path)
        for name in names:
            assert (dst / name).stat().st_ino != inodes[name], f"{name} was rewritten in place"
            assert readers[name].read() == old[name], name
    finally:
        for f in readers.values():
            f.close()
    assert sorted(p.name for p in dst.iterdir()) == names  # no temporary file left behind
