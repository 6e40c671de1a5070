"""The demo models: the trained one shipped in the package, and tiny random checkpoints for tests.

``demo_checkpoint()`` is the folder of the bundled model (a 3.3M-parameter Llama 2 trained on the King James Bible by
``tools/train_demo.py``). ``python -m llama.demo OUT_DIR [--n_shards N]`` writes a random checkpoint
``OUT_DIR/{params.json, consolidated.NN.pth, tokenizer.model}``: its text is noise, but every code path runs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from llama.args import ModelArgs
from llama.checkpoint import StateDict, atomic_write, full_shapes, write_shards
from llama.cli import positive_int
from llama.validation import to_int

DEMO_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": -1,
    "multiple_of": 32,
    "norm_eps": 1e-05,
    "rope_theta": 10000.0,
}


def demo_checkpoint() -> Path:
    """The bundled trained model's folder (params.json, consolidated.00.pth, tokenizer.model, heldout.txt, words.txt)."""
    folder = Path(str(resources.files("llama").joinpath("data/demo")))
    if not (folder / "params.json").is_file():
        raise FileNotFoundError(f"the bundled demo model is missing from {folder}: reinstall the package, or run tools/train_demo.py")
    return folder


def train_tokenizer(model_path: Path, vocab_size: int = 512, text: Optional[str] = None) -> Path:
    """Train a Llama-style BPE sentencepiece model (unk 0, bos 1, eos 2, no pad, byte fallback)."""
    import sentencepiece as spm

    if text is None:
        text = resources.files("llama").joinpath("data/corpus.txt").read_text()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(model_path) as tmp:
        tmp.write_bytes(model.getvalue())
    return model_path


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> StateDict:
    """Seeded random weights of the full model, scaled so that activations stay near unit size."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in full_shapes(args).items():
        if len(shape) == 1:  # norm weights: near one, but not one, so a test sees them applied
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[0] if key == "tok_embeddings.weight" else shape[1]
            tensor = torch.randn(shape, generator=generator) / math.sqrt(fan_in if key != "tok_embeddings.weight" else 1)
        state[key] = tensor.to(dtype)
    return state


def make_demo_checkpoint(
    out_dir: Path, n_shards: int = 1, seed: int = 0, params: Optional[dict] = None, tokenizer_path: Optional[Path] = None
) -> Path:
    """Write a random checkpoint of ``n_shards`` shards and its tokenizer into out_dir; return out_dir.

    The tokenizer is trained on the bundled corpus unless ``tokenizer_path`` gives one to copy.
    """
    from llama.tokenizer import Tokenizer

    n_shards = to_int("n_shards", n_shards, 1)
    params = dict(DEMO_PARAMS if params is None else params)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is None:
        train_tokenizer(out_dir / "tokenizer.model")
    else:
        with atomic_write(out_dir / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer_path, tmp)
    args = ModelArgs.from_params(params, vocab_size=Tokenizer(out_dir / "tokenizer.model").n_words)
    with atomic_write(out_dir / "params.json") as tmp:
        tmp.write_text(json.dumps(params, indent=2) + "\n")
    write_shards(out_dir, [random_state_dict(args, seed)], args, n_shards)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n_shards", type=positive_int, default=1, help="number of shards to write (the model-parallel size)")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    make_demo_checkpoint(cli.out_dir, cli.n_shards, cli.seed)
    print(f"wrote {cli.out_dir}/params.json, {cli.n_shards} shard(s) and tokenizer.model")


if __name__ == "__main__":
    main()
