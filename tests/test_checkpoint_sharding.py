"""llama.checkpoint's shard layout: split/merge round trips, KV-head replication, size errors, and the reshard command."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import pytest
import torch

from llama import CheckpointError
from llama.args import ModelArgs, check_model_parallel_size, model_parallel_sizes
from llama.checkpoint import StateDict, load_checkpoint, state_dict_for_rank, write_shards
from llama.demo import random_state_dict
from llama.reshard import reshard
from tests.conftest import ROOT, TINY_PARAMS, build

VOCAB_SIZE = 512
COUNTS = (1, 2, 4)


def tiny_args(**changes: object) -> ModelArgs:
    return ModelArgs.from_params({**TINY_PARAMS, "vocab_size": VOCAB_SIZE, **changes})


def split(full: StateDict, args: ModelArgs, n: int) -> List[StateDict]:
    return [state_dict_for_rank([full], args, n, rank) for rank in range(n)]


def assert_same_tensors(got: StateDict, want: StateDict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# 4 heads with 4, 2 and 1 KV heads: 4 shards replicate nothing, each KV head twice, and the one KV head four times.
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("k", COUNTS)
def test_split_then_merge_gives_back_every_tensor(k: int, n_kv_heads: int) -> None:
    args = tiny_args(n_kv_heads=n_kv_heads)
    full = random_state_dict(args, seed=k)
    assert_same_tensors(state_dict_for_rank(split(full, args, k), args, 1, 0), full)


@pytest.mark.parametrize("k, n", list(itertools.product(COUNTS, COUNTS)))
def test_resplitting_k_shards_into_n_equals_splitting_the_full_model(k: int, n: int) -> None:
    args = tiny_args()
    full = random_state_dict(args)
    shards = split(full, args, k)
    for rank in range(n):
        assert_same_tensors(state_dict_for_rank(shards, args, n, rank), state_dict_for_rank([full], args, n, rank))


def test_more_ranks_than_kv_heads_replicate_the_head_their_query_heads_use() -> None:
    args = tiny_args()  # 4 query heads, 2 KV heads, head_dim 16
    full = random_state_dict(args)
    head_dim = args.head_dim
    for rank, shard in enumerate(split(full, args, 4)):
        kv_head = rank // 2  # query heads 0, 1 use KV head 0; 2, 3 use KV head 1
        for name in ("wk", "wv"):
            key = f"layers.1.attention.{name}.weight"
            assert torch.equal(shard[key], full[key][kv_head * head_dim : (kv_head + 1) * head_dim])
        key = "layers.1.attention.wq.weight"
        assert torch.equal(shard[key], full[key][rank * head_dim : (rank + 1) * head_dim])


def test_replicated_copies_are_not_merged_twice() -> None:
    """Merging 4 shards of 2 KV heads takes each head once: the merged wk has n_kv_heads * head_dim rows, not 4 * head_dim."""
    args = tiny_args()
    shards = split(random_state_dict(args), args, 4)
    assert shards[0]["layers.0.attention.wk.weight"].shape == (args.head_dim, args.dim)
    assert state_dict_for_rank(shards, args, 1, 0)["layers.0.attention.wk.weight"].shape == (2 * args.head_dim, args.dim)


@pytest.mark.parametrize("k, n", [(1, 4), (4, 2), (2, 4)])
def test_shards_written_to_disk_load_back_for_any_rank_count(k: int, n: int, tmp_path: Path) -> None:
    args = tiny_args()
    full = random_state_dict(args)
    paths = write_shards(tmp_path, [full], args, k)
    assert [p.name for p in paths] == [f"consolidated.{i:02d}.pth" for i in range(k)]
    for rank in range(n):
        assert_same_tensors(load_checkpoint(tmp_path, args, n, rank), state_dict_for_rank([full], args, n, rank))


def test_model_parallel_size_that_does_not_divide_names_the_sizes_that_work() -> None:
    args = tiny_args()
    assert model_parallel_sizes(args) == [1, 2, 4]
    message = r"model_parallel_size=3: n_heads=4 is not divisible by 3; dim=64 is not divisible by 3; .*Sizes that work: \[1, 2, 4\]"
    with pytest.raises(CheckpointError, match=message):
        check_model_parallel_size(args, 3)


@pytest.mark.parametrize("call", [lambda path, args: load_checkpoint(path, args, 3, 0), lambda path, args: write_shards(path, [random_state_dict(args)], args, 3)])
def test_loading_or_writing_for_three_ranks_fails_before_touching_files(call: Callable, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"model_parallel_size=3.*Sizes that work: \[1, 2, 4\]"):
        call(tmp_path / "nothing_here", tiny_args())
    assert not (tmp_path / "nothing_here").exists()


def test_checkpoint_whose_shard_count_does_not_fit_params_names_both(tmp_path: Path) -> None:
    """3 shards of a 6-head model, read with the params.json of a 4-head model of the same sizes."""
    sizes = dict(dim=96, multiple_of=48, vocab_size=384)  # hidden_dim 288: all divisible by 3 and by 4
    six_heads = tiny_args(n_heads=6, n_kv_heads=3, **sizes)
    write_shards(tmp_path, [random_state_dict(six_heads)], six_heads, 3)
    message = r"has 3 shards, which this params.json cannot have been split into: .*n_heads=4 is not divisible by 3.*Sizes that work: \[1, 2, 4\]"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, tiny_args(**sizes), 1, 0)


@pytest.mark.parametrize("removed", [["consolidated.03.pth"], ["consolidated.02.pth", "consolidated.03.pth"]])
def test_missing_last_shards_are_named(removed: List[str], make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """find_shards sees a gap in the numbering; this guards the shards missing at the end, which leave no gap."""
    ckpt = Path(shutil.copytree(make_checkpoint(n_shards=4), tmp_path / "ckpt"))
    for name in removed:
        (ckpt / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("is one of 4 shards") + r".*missing " + re.escape(", ".join(removed))):
        load_checkpoint(ckpt, tiny_args(), 2, 0)


def run_module(module: str, *args: object) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("module, flag", [("llama.reshard", "--mp"), ("llama.demo", "--n_shards")])
def test_commands_refuse_a_shard_count_below_one(module: str, flag: str, value: str, ckpt_dir: Path, tmp_path: Path) -> None:
    """--mp 0 was a traceback and --mp -1 wrote 0 shards and exited 0."""
    out = tmp_path / "out"
    positional = [ckpt_dir, out] if module == "llama.reshard" else [out]
    done = run_module(module, *positional, flag, value)
    assert done.returncode == 2, done.stderr
    assert f"argument {flag}: invalid value '{value}': expected a positive integer" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("size", [0, -1])
def test_reshard_refuses_a_bad_model_parallel_size_before_touching_files(size: int, ckpt_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"model_parallel_size must be an integer >= 1, got {size}"):
        reshard(ckpt_dir, tmp_path / "out", size)
    assert not (tmp_path / "out").exists()


def test_reshard_into_the_folder_of_an_older_checkpoint_removes_its_extra_shards(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """Shards 02 and 03 of the older 4-shard checkpoint were left behind, and the folder then failed to load."""
    src = make_checkpoint(seed=1)
    dst = Path(shutil.copytree(make_checkpoint(n_shards=4), tmp_path / "dst"))
    done = run_module("llama.reshard", src, dst, "--mp", 2)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    for name in ("consolidated.02.pth", "consolidated.03.pth"):
        assert f"removing {dst / name}: not one of the 2 shard(s) just written" in done.stderr
    prompt = [[1, 20, 30, 40]]
    assert build(dst).generate(prompt, 8, temperature=0) == build(src).generate(prompt, 8, temperature=0)
