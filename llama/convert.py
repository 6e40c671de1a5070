"""``python -m llama.convert SRC DST --to meta|hf [--mp N]``: rewrite a checkpoint in Meta's format or Hugging Face's.

One tensor is read, converted and written at a time (Meta's output: one shard at a time), so the model is never
in memory twice; every file is written under a temporary name and renamed. Tokenizer files are copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from llama.checkpoint import (
    DIM_SPLIT, EMBEDDING, VOCAB_SPLIT, StateDict, atomic_write, detect_scheme, read_checkpoint, state_dict_for_rank, write_shards,
)
from llama.cli import positive_int
from llama.errors import CheckpointError
from llama.formats import HF, META, detect_format, hf, read_args, read_shards
from llama.tokenizer import detect_format as detect_tokenizer
from llama.tokenizer_tiktoken import PAT_STR, Llama3Tokenizer
from llama.validation import to_int

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EMBEDDING_SPLITS = {"dim": DIM_SPLIT, "vocab": VOCAB_SPLIT}


def convert(
    src_dir: Path, dst_dir: Path, to: str, model_parallel_size: int = 1, embedding_split: Optional[int] = None,
    max_file_bytes: int = hf.MAX_FILE_BYTES,
) -> List[Path]:
    """Write src_dir's checkpoint (either format) into dst_dir in format ``to`` ("meta" or "hf"); return the weight files.

    model_parallel_size, embedding_split: the shards of Meta's format (``write_shards``); max_file_bytes: the size past
    which HF's weights go into several files with an index.
    """
    if to not in (META, HF):
        raise ValueError(f"to must be {META!r} or {HF!r}, got {to!r}")
    model_parallel_size = to_int("model_parallel_size", model_parallel_size, 1)
    if to == HF and model_parallel_size != 1:
        raise ValueError(f"model_parallel_size={model_parallel_size} applies to Meta's format only; HF folders are not sharded by rank")
    if dst_dir.exists() and src_dir.resolve() == dst_dir.resolve():
        raise ValueError(f"the destination {dst_dir} is the source folder; pick another one")
    fmt = detect_format(src_dir)
    _check_destination(dst_dir, to)
    if to == HF:
        written = _to_hf(src_dir, fmt, dst_dir, max_file_bytes)
    else:
        written = _to_meta(src_dir, fmt, dst_dir, model_parallel_size, embedding_split)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            with atomic_write(dst_dir / name) as tmp:
                shutil.copyfile(src_dir / name, tmp)
    meta_tokenizer = src_dir / "tokenizer.model"
    if to == HF and not (src_dir / "tokenizer.json").is_file() and meta_tokenizer.is_file() and detect_tokenizer(meta_tokenizer) == "tiktoken":
        _write_hf_tokenizer(meta_tokenizer, dst_dir)
    logger.info("wrote %s (%s format) into %s: %s", src_dir, to, dst_dir, ", ".join(p.name for p in written))
    return written


def _write_hf_tokenizer(tiktoken_file: Path, dst_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json for Meta's Llama 3 tokenizer, so that
    transformers' AutoTokenizer and generate() read the folder too (made by transformers' converter, if installed)."""
    try:
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        logger.warning("transformers is not installed: %s holds Meta's tiktoken tokenizer.model but no tokenizer.json, "
                       "which this package reads but transformers' AutoTokenizer does not", dst_dir)
        return
    tokenizer = Llama3Tokenizer(tiktoken_file)
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.__getitem__)
    backend = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=PAT_STR, extra_special_tokens=specials).converted()
    names = {token: name for name, token in tokenizer.special_tokens.items()}
    bos = names[tokenizer.bos_id]  # added in front of each text, as the Hub's Llama 3 tokenizer.json does
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    with atomic_write(dst_dir / "tokenizer.json") as tmp:
        backend.save(str(tmp))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[tokenizer.bos_id], "eos_token": names[tokenizer.eos_id],
        "clean_up_tokenization_spaces": False,  # decode as Meta's tokenizer does, spaces before punctuation kept
        "model_input_names": ["input_ids", "attention_mask"],
    }
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids)}
    for name, content in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        with atomic_write(dst_dir / name) as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")


def _check_destination(dst_dir: Path, to: str) -> None:
    """Refuse a destination holding the other format's files, which would be read instead of (or beside) the new ones."""
    if not dst_dir.is_dir():
        return
    other = ["params.json", "*.pth"] if to == HF else ["config.json", "*.safetensors"]
    found = sorted({p.name for pattern in other for p in dst_dir.glob(pattern)})
    if found:
        raise ValueError(f"{dst_dir} already holds {', '.join(found[:4])} of another checkpoint; write into an empty folder")


def _to_hf(src_dir: Path, fmt: str, dst_dir: Path, max_file_bytes: int) -> List[Path]:
    if fmt == HF:
        args, _ = read_args(src_dir, fmt)
        shards: Sequence[StateDict] = read_shards(src_dir, fmt, args)
    else:
        _, args, _, shards = read_checkpoint(src_dir)
        if detect_scheme(shards[0]) is not None:
            raise CheckpointError(f"{src_dir} holds quantized weights (llama.quantize); convert the float checkpoint")
    dtype = shards[0][EMBEDDING].dtype

    def tensor(key: str) -> torch.Tensor:
        return state_dict_for_rank(shards, args, 1, 0, keys={key})[key]

    tie = torch.equal(tensor(EMBEDDING), tensor("output.weight"))  # Llama 3.2 1B/3B: one matrix, written once
    bos_id, eos_id = _special_ids(src_dir)
    config = hf.config_from_args(args, tie, dtype, bos_token_id=bos_id, eos_token_id=eos_id)
    return hf.write_hf(dst_dir, args, tensor, dtype, tie, config, max_file_bytes)


def _special_ids(src_dir: Path) -> tuple[Optional[int], Optional[int]]:
    """BOS and EOS ids of the folder's tokenizer, for config.json (None where it has none that loads)."""
    from llama.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(src_dir)
    except (OSError, ValueError, ImportError) as e:
        logger.warning("config.json gets no bos_token_id/eos_token_id: no tokenizer of %s loads (%s)", src_dir, e)
        return None, None
    return tokenizer.bos_id, tokenizer.eos_id


def _to_meta(src_dir: Path, fmt: str, dst_dir: Path, model_parallel_size: int, embedding_split: Optional[int]) -> List[Path]:
    if fmt == HF:
        args, _ = read_args(src_dir, fmt)
        shards: Sequence[StateDict] = read_shards(src_dir, fmt, args)
        params = hf.meta_params(args)
    else:
        params, args, _, shards = read_checkpoint(src_dir)
    written = write_shards(dst_dir, shards, args, model_parallel_size, embedding_split=embedding_split)
    with atomic_write(dst_dir / "params.json") as tmp:
        tmp.write_text(json.dumps(params, indent=2) + "\n")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src_dir", type=Path)
    parser.add_argument("dst_dir", type=Path)
    parser.add_argument("--to", choices=(META, HF), required=True, help="the format to write")
    parser.add_argument("--mp", type=positive_int, default=1, help="shards to write (--to meta: the model-parallel size)")
    parser.add_argument(
        "--embedding_split", choices=sorted(EMBEDDING_SPLITS),
        help="--to meta: cut tok_embeddings by vocabulary (Llama 3) or on the embedding dim (Llama 2); default: the source's, "
        "or for one shard by vocabulary for Llama 3's 128256 words",
    )
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    split = None if cli.embedding_split is None else EMBEDDING_SPLITS[cli.embedding_split]
    try:
        convert(cli.src_dir, cli.dst_dir, cli.to, cli.mp, split)
    except (OSError, ValueError) as e:
        raise SystemExit(f"llama.convert: {e}") from None


if __name__ == "__main__":
    main()
