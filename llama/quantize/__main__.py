"""``python -m llama.quantize SRC_DIR DST_DIR --int8 | --int4 [--group_size G] [--mp N]``: write a quantized checkpoint.

Meta's layout (``consolidated.NN.pth``, ``params.json``, ``tokenizer.model``) with every linear weight stored as
``llama.quantize`` describes, its ``_scale`` beside it, and ``params.json`` given Meta's ``quantization_args`` field
(``{"scheme": "int8_weight_only"}``, or ``int4_weight_only`` with its ``group_size``), so that loaders that do not know
quantized weights refuse the folder. ``Llama.build`` loads it quantized, on any model-parallel size that cuts no int4
group. The source is read memory-mapped and quantized one tensor at a time; each shard is written under a temporary name.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import List, Optional

from llama.args import check_model_parallel_size
from llama.checkpoint import atomic_write, check_quantized_split, detect_scheme, int4_group_size, read_checkpoint, write_shards
from llama.cli import positive_int
from llama.errors import CheckpointError
from llama.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, KINDS, Quantizer, Scheme
from llama.validation import to_int

logger = logging.getLogger("llama.quantize")

PARAMS_FIELD = "quantization_args"


def quantize_checkpoint(
    src_dir: Path, dst_dir: Path, kind: str, group_size: Optional[int] = None, model_parallel_size: Optional[int] = None
) -> List[Path]:
    """Write src_dir's checkpoint into dst_dir with its linear weights quantized; return the shard paths.

    model_parallel_size: shards to write (default: as many as src_dir has). group_size (int4): inputs per scale and
    zero, default the largest up to 64 that no shard's slice cuts.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not supported; use one of {KINDS}")
    if src_dir.resolve() == dst_dir.resolve():
        raise ValueError(f"the destination {dst_dir} is the source folder; pick another one")
    params, args, paths, shards = read_checkpoint(src_dir)
    if PARAMS_FIELD in params:
        raise CheckpointError(f"{src_dir / 'params.json'} has {PARAMS_FIELD}={params[PARAMS_FIELD]!r}: {src_dir} is quantized already")
    stored = detect_scheme(shards[0], paths[0])
    if stored is not None:
        raise CheckpointError(f"{src_dir} holds {stored.kind} weights already; quantize the original checkpoint")
    n_shards = len(paths) if model_parallel_size is None else to_int("model_parallel_size", model_parallel_size, 1)
    check_model_parallel_size(args, n_shards)
    if kind == "int8":
        if group_size is not None:
            raise ValueError(f"group_size={group_size} applies to int4 only; int8 has one scale per output row")
    elif group_size is None:
        group_size = int4_group_size(args, n_shards, DEFAULT_GROUP_SIZE)
    elif group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not one torch's int4 kernel takes; use one of {sorted(GROUP_SIZES)}")
    scheme = Scheme(kind, group_size)
    check_quantized_split(args, scheme, n_shards, f"{dst_dir} (--group_size {group_size})")
    written = write_shards(dst_dir, shards, args, n_shards, convert=Quantizer(scheme))
    with atomic_write(dst_dir / "params.json") as tmp:
        tmp.write_text(json.dumps({**params, PARAMS_FIELD: scheme.to_params()}, indent=2) + "\n")
    if (src_dir / "tokenizer.model").is_file():
        with atomic_write(dst_dir / "tokenizer.model") as tmp:
            shutil.copyfile(src_dir / "tokenizer.model", tmp)
    logger.info("wrote %d shard(s) of %s, %s, into %s", len(written), src_dir, scheme, dst_dir)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src_dir", type=Path)
    parser.add_argument("dst_dir", type=Path)
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--int8", dest="kind", action="store_const", const="int8", help="int8 weights, one scale per output row")
    kind.add_argument("--int4", dest="kind", action="store_const", const="int4", help="int4 weights, a scale and zero per group of inputs")
    parser.add_argument("--group_size", type=int, choices=sorted(GROUP_SIZES), help=f"int4: inputs per group (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--mp", type=positive_int, help="number of shards to write (default: as many as SRC_DIR has)")
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        quantize_checkpoint(cli.src_dir, cli.dst_dir, cli.kind, cli.group_size, cli.mp)
    except (OSError, ValueError) as e:
        raise SystemExit(f"llama.quantize: {e}") from None


if __name__ == "__main__":
    main()
