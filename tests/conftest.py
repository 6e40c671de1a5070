"""Shared fixtures: a sentencepiece tokenizer trained once per session and tiny seeded checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import torch

from llama import Llama
from llama.model import Transformer
from llama.demo import DEMO_PARAMS, make_demo_checkpoint, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# dim 64, 2 layers, 4 query heads, 2 KV heads: small, and grouped-query attention is exercised.
TINY_PARAMS = dict(DEMO_PARAMS)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Callable[..., Path]:
    """make_checkpoint(n_shards=1, params=None, seed=0) -> folder with params.json, shards and tokenizer.model (cached)."""
    made: dict = {}

    def make(n_shards: int = 1, params: Optional[dict] = None, seed: int = 0) -> Path:
        key = (n_shards, json.dumps(params, sort_keys=True), seed)
        if key not in made:
            out_dir = tmp_path_factory.mktemp(f"ckpt_{n_shards}shards")
            made[key] = make_demo_checkpoint(out_dir, n_shards, seed, params or TINY_PARAMS, tokenizer_path)
        return made[key]

    return make


@pytest.fixture(scope="session")
def ckpt_dir(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint()


def build(ckpt_dir: Path, max_seq_len: int = 64, max_batch_size: int = 4, **kwargs) -> Llama:
    """Llama.build on CPU in float32, the settings every parity test compares in."""
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("dtype", torch.float32)
    return Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), max_seq_len, max_batch_size, **kwargs)


@pytest.fixture(scope="session")
def generator(ckpt_dir: Path) -> Llama:
    return build(ckpt_dir)


@pytest.fixture
def ckpt_copy(ckpt_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(ckpt_dir, tmp_path / "ckpt"))


def edit_params(ckpt: Path, **changes: object) -> None:
    """Change fields of ckpt's params.json."""
    params = json.loads((ckpt / "params.json").read_text())
    params.update(changes)
    (ckpt / "params.json").write_text(json.dumps(params))


@pytest.fixture
def forward_calls(monkeypatch: pytest.MonkeyPatch) -> List[tuple]:
    """(bsz, seqlen) of every Transformer.forward call."""
    calls: List[tuple] = []
    forward = Transformer.forward

    def recording(self: Transformer, tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append(tuple(tokens.shape))
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", recording)
    return calls
