"""Loading a checkpoint folder of any format (``llama.formats``): its tokenizer, its params and this rank's weights,
into a ready model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch

from llama import distributed
from llama.args import check_model_parallel_size
from llama.checkpoint import infer_vocab_size, load_checkpoint, load_rank
from llama.errors import CheckpointError
from llama.formats import HF, detect_format, read_args, read_shards
from llama.memory import check_fits
from llama.model import Transformer
from llama.quantize import kind_in_params
from llama.tokenizer import Tokenizer, load_tokenizer


def load_model(
    ckpt_dir: Path, tokenizer_path: Optional[Path], max_seq_len: int, max_batch_size: int, n_ranks: int, device: torch.device, dtype: torch.dtype,
    quantize: Optional[str] = None, compiled: bool = False,
) -> Tuple[Transformer, Tokenizer]:
    """Tokenizer, params and this rank's weights, assigned into a model built on the meta device.

    tokenizer_path None: the folder's own (its tokenizer.model, else tokenizer.json).
    """
    fmt = detect_format(ckpt_dir)
    if tokenizer_path is None:
        tokenizer_path = ckpt_dir  # load_tokenizer picks the folder's tokenizer file
    tokenizer = load_tokenizer(tokenizer_path)
    args, params_path = read_args(ckpt_dir, fmt, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    if args.vocab_size == -1:  # Meta's Llama 2 params.json: the vocabulary is the tokenizer's
        rows = infer_vocab_size(ckpt_dir, args)
        if rows != tokenizer.n_words:
            raise CheckpointError(
                f"the tokenizer {tokenizer_path} has {tokenizer.n_words} words but the checkpoint {ckpt_dir} was trained with "
                f"{rows} (rows of tok_embeddings.weight): the tokenizer does not belong to this checkpoint; "
                "pass the tokenizer.model that came with it"
            )
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise CheckpointError(
            f"{params_path} has vocab_size={args.vocab_size} but the tokenizer {tokenizer_path} has {tokenizer.n_words} words: "
            "the tokenizer does not belong to this checkpoint; pass the tokenizer.model that came with it"
        )
    check_model_parallel_size(args, n_ranks)
    # The shards' tensors say how a checkpoint is quantized; params.json's field is enough for the memory estimate.
    check_fits(args, n_ranks, dtype, device, str(params_path), quantize or kind_in_params(args.quantization_args), compiled)
    rank = distributed.model_parallel_rank()
    # On a terminal, from rank 0, unless the summaries are off (--quiet).
    show = distributed.rank() == 0 and sys.stderr.isatty() and logging.getLogger("llama").isEnabledFor(logging.INFO)
    if fmt == HF:
        state_dict = load_rank(read_shards(ckpt_dir, fmt, args), str(ckpt_dir), args, n_ranks, rank, device, dtype, quantize, show)
    else:
        state_dict = load_checkpoint(ckpt_dir, args, n_ranks, rank, device, dtype, quantize, show)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.setup_caches(max_batch_size, max_seq_len, device=device, dtype=dtype)
    model.eval()
    return model, tokenizer
