"""``python -m llama.reshard SRC_DIR DST_DIR --mp N``: rewrite a checkpoint as N shards, in Meta's format.

Reads the source shards memory-mapped and writes one target shard at a time, keeping the source's token-embedding
split (Llama 2's on the embedding dim, Llama 3's by vocabulary) unless ``--embedding_split`` says; ``params.json`` (and
``tokenizer.model``, if there) are copied. Every file is written under a temporary name and renamed, and
shards of an older checkpoint left in DST_DIR are removed, so the folder loads as the new checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Optional

from llama.checkpoint import DIM_SPLIT, VOCAB_SPLIT, atomic_write, read_checkpoint, write_shards
from llama.cli import positive_int
from llama.validation import to_int

logger = logging.getLogger(__name__)


EMBEDDING_SPLITS = {"dim": DIM_SPLIT, "vocab": VOCAB_SPLIT}


def reshard(src_dir: Path, dst_dir: Path, model_parallel_size: int, embedding_split: Optional[int] = None) -> list[Path]:
    """Write src_dir's checkpoint into dst_dir as model_parallel_size shards; return the shard paths.

    embedding_split: ``DIM_SPLIT`` or ``VOCAB_SPLIT``; None keeps the source's (for one source shard, Meta's for the model).
    """
    model_parallel_size = to_int("model_parallel_size", model_parallel_size, 1)
    if src_dir.resolve() == dst_dir.resolve():
        raise ValueError(f"the destination {dst_dir} is the source folder; pick another one")
    _, args, _, shards = read_checkpoint(src_dir)
    written = write_shards(dst_dir, shards, args, model_parallel_size, embedding_split=embedding_split)
    for name in ("params.json", "tokenizer.model"):
        if (src_dir / name).is_file():
            with atomic_write(dst_dir / name) as tmp:
                shutil.copyfile(src_dir / name, tmp)
    logger.info("wrote %d shard(s) of %s into %s", len(written), src_dir, dst_dir)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src_dir", type=Path)
    parser.add_argument("dst_dir", type=Path)
    parser.add_argument("--mp", type=positive_int, required=True, help="number of shards to write (the model-parallel size)")
    parser.add_argument(
        "--embedding_split", choices=sorted(EMBEDDING_SPLITS),
        help="cut tok_embeddings by vocabulary (Llama 3) or on the embedding dim (Llama 2); default: as the source",
    )
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        reshard(cli.src_dir, cli.dst_dir, cli.mp, None if cli.embedding_split is None else EMBEDDING_SPLITS[cli.embedding_split])
    except (OSError, ValueError) as e:
        raise SystemExit(f"llama.reshard: {e}") from None


if __name__ == "__main__":
    main()
