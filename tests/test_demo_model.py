"""The bundled demo model (llama/data/demo, trained by tools/train_demo.py) is trained, loads, and matches its trainer."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

from llama import Llama
from llama.demo import demo_checkpoint
from tests.conftest import ROOT, build

PROMPT = "In the beginning God"
MAX_GEN_LEN = 32
# Golden: the greedy continuation of PROMPT that the README quotes (float32 on CPU).
GREEDY_CONTINUATION = "of the earth is the glory of the LORD: for he is the LORD's."
# Mean next-token loss (nats) on heldout.txt (the book of Ruth, never trained on), in windows of 128 tokens as the
# trainer evaluates it. Measured: 3.347; uniform over the 2048-token vocabulary is ln 2048 = 7.625, and an untrained
# model scores 7.66 (the random `python -m llama.demo` model: 6.76 against its uniform 6.24). Bound: 3.6, 47% of uniform.
HELDOUT_LOSS_BOUND = 3.6
WINDOW = 128


def _load_trainer() -> ModuleType:
    """tools/train_demo.py, imported by path (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "tools" / "train_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    return demo_checkpoint()


@pytest.fixture(scope="module")
def demo(demo_dir: Path) -> Llama:
    return build(demo_dir, max_seq_len=256, max_batch_size=2)


@pytest.fixture(scope="module")
def trainer() -> ModuleType:
    return _load_trainer()


def test_bundled_files_are_small(demo_dir: Path) -> None:
    sizes = {name: (demo_dir / name).stat().st_size for name in ("params.json", "consolidated.00.pth", "tokenizer.model")}
    assert sum(sizes.values()) <= 8 * 2**20, sizes


def test_heldout_loss_is_far_below_uniform(demo: Llama, demo_dir: Path, trainer: ModuleType) -> None:
    documents = [demo.tokenizer.encode(line, bos=True, eos=False) for line in (demo_dir / "heldout.txt").read_text().splitlines() if line]
    assert sum(map(len, documents)) > 3000  # the whole book, not a stub
    loss = trainer.chunk_loss(lambda tokens: demo.model.forward(tokens, 0), documents, WINDOW)
    assert loss < HELDOUT_LOSS_BOUND, f"held-out loss {loss:.3f} is not below {HELDOUT_LOSS_BOUND:.3f} (uniform {math.log(demo.model.vocab_size):.3f})"


def test_package_logits_equal_the_trainers(demo: Llama, demo_dir: Path, trainer: ModuleType) -> None:
    weights, args = trainer.load_weights(demo_dir)
    tokens = torch.tensor([demo.tokenizer.encode(text, bos=True, eos=False)[:24] for text in (
        "And Boaz said unto Ruth, Hearest thou not, my daughter? Go not to glean in another field, neither go from hence",
        "Blessed are the poor in spirit: for theirs is the kingdom of heaven. Blessed are they that mourn: for they shall",
    )])
    with torch.no_grad():
        expected = trainer.forward(weights, args, tokens)
    torch.testing.assert_close(demo.model.forward(tokens, 0), expected, atol=1e-4, rtol=1e-4)


def test_greedy_continuation_is_the_trainers_and_english(demo: Llama, demo_dir: Path, trainer: ModuleType) -> None:
    weights, args = trainer.load_weights(demo_dir)
    prompt_tokens = demo.tokenizer.encode(PROMPT, bos=True, eos=False)
    expected = demo.tokenizer.decode(trainer.greedy(weights, args, prompt_tokens, MAX_GEN_LEN, demo.tokenizer.eos_id))
    generation = demo.text_completion([PROMPT], temperature=0.0, max_gen_len=MAX_GEN_LEN)[0]["generation"]
    assert generation == expected
    words = re.findall(r"[A-Za-z]+", generation)
    vocabulary = set((demo_dir / "words.txt").read_text().split())
    known = [w for w in words if w.lower() in vocabulary]
    assert len(words) >= 10 and len(known) >= 0.8 * len(words), f"not English from the corpus: {generation!r}"
    assert GREEDY_CONTINUATION == generation
    assert f"> {PROMPT} {generation}\n" in (ROOT / "README.md").read_text()  # the README quotes it

