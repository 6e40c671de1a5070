"""Both example scripts end to end, as a user runs them: plain python, and torchrun on two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

from tests.conftest import ROOT
from tests.dist_utils import free_port

SEPARATOR = "=================================="


def run(args: List[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def checkpoint_args(ckpt: Path) -> List[str]:
    return ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model")]


def test_text_completion_example(ckpt_dir: Path) -> None:
    done = run([sys.executable, "example_text_completion.py", *checkpoint_args(ckpt_dir), "--max_gen_len", "8"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(SEPARATOR) == 4
    assert "\nI believe the meaning of life is\n> " in done.stdout
    assert "running on cpu" in done.stderr and "loaded in" in done.stderr


def test_chat_completion_example(ckpt_dir: Path) -> None:
    done = run([sys.executable, "example_chat_completion.py", *checkpoint_args(ckpt_dir), "--max_gen_len", "8", "--dtype", "float32"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(SEPARATOR) == 6
    assert "System: Always answer with Haiku\n\nUser: I am going to Paris, what should I see?\n\n> Assistant: " in done.stdout
    assert "> Assistant: Error: special tags are not allowed as part of the prompt." in done.stdout


def test_text_completion_example_under_torchrun_prints_once_and_matches_one_process(make_checkpoint: Callable[..., Path]) -> None:
    two_shards = make_checkpoint(n_shards=2)
    flags = [*checkpoint_args(two_shards), "--max_gen_len", "8", "--temperature", "0", "--dtype", "float32"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    distributed = run([*launcher, "example_text_completion.py", *flags])
    alone = run([sys.executable, "example_text_completion.py", *flags])
    assert distributed.returncode == 0, distributed.stderr
    assert distributed.stdout.count(SEPARATOR) == 4  # rank 1's stdout is silenced
    assert completions(distributed.stdout) == completions(alone.stdout)


def completions(stdout: str) -> List[str]:
    """The printed prompts and completions, without fairscale's "> initializing ..." lines."""
    return [line for line in stdout.splitlines() if not line.startswith("> initializing")]
