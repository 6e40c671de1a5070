"""Meta-format checkpoints: finding shards, loading them safely, and cutting any shard layout into any other.

One table (``SPLIT_DIM``) says how each tensor is split across model-parallel ranks; every shard's expected shape,
and every rank's slice of the full tensor, follows from it. The token embedding is the one tensor whose split differs
between families: Llama 2's shards cut it on the embedding dim (as the model here holds it on every rank), Llama 3's
by vocabulary; a folder's layout is read from its shards' shapes, and any layout is cut into any other. Loaded weights are
copies, never views of the memory-mapped files (``llama.shard_files`` reads and writes the files).
A checkpoint of quantized weights (``python -m llama.quantize``) says so by its tensors: beside each quantized
weight it holds ``<key>_scale``, and its slices are cut from the same table, in the units ``llama.quantize`` stores.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Callable, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from llama.args import ModelArgs, check_model_parallel_size, load_params, local_head_counts, model_parallel_sizes
from llama.errors import CheckpointError, InputError
from llama.shard_files import SHARD_NAME, MappedShard, atomic_write, find_shards, load_shard, release_pages
from llama.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCALE_SUFFIX, Loader, Quantizer, Scheme, WholeRows, is_quantized
from llama.validation import to_int

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
# A per-tensor hook of state_dict_for_rank: (key, the rank's slice, whole_rows) -> the tensors to keep for key.
Convert = Callable[[str, torch.Tensor, WholeRows], StateDict]


# Dimension each tensor is split on across ranks (None: replicated), as fairscale's layers split them:
# ColumnParallelLinear on dim 0, RowParallelLinear on dim 1, ParallelEmbedding on the embedding dim (1).
SPLIT_DIM: Dict[str, Optional[int]] = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
KV_KEYS = ("attention.wk.weight", "attention.wv.weight")
EMBEDDING = "tok_embeddings.weight"
# How tok_embeddings.weight is split: on the embedding dim (Llama 2, CodeLlama: fairscale's ParallelEmbedding, and the
# model here on every rank), or by vocabulary (Llama 3: VocabParallelEmbedding).
DIM_SPLIT, VOCAB_SPLIT = 1, 0
LLAMA3_VOCAB_SIZE = 128256  # tiktoken's 128000 words and 256 special tokens: Meta's tools split this vocabulary
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def _kind(key: str) -> str:
    """The ``SPLIT_DIM`` entry of a state-dict key: ``layers.3.attention.wq.weight`` -> ``attention.wq.weight``."""
    match = _LAYER_KEY.fullmatch(key)
    return match.group(2) if match else key


def _kind_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Full shape of each ``SPLIT_DIM`` entry."""
    assert args.n_kv_heads is not None
    d, hidden, vocab = args.dim, args.hidden_dim, args.vocab_size
    kv = args.n_kv_heads * args.head_dim
    return {
        "tok_embeddings.weight": (vocab, d),
        "norm.weight": (d,),
        "output.weight": (vocab, d),
        "attention.wq.weight": (d, d),
        "attention.wk.weight": (kv, d),
        "attention.wv.weight": (kv, d),
        "attention.wo.weight": (d, d),
        "feed_forward.w1.weight": (hidden, d),
        "feed_forward.w2.weight": (d, hidden),
        "feed_forward.w3.weight": (hidden, d),
        "attention_norm.weight": (d,),
        "ffn_norm.weight": (d,),
    }


def _stored_split(key: str, scheme: Optional[Scheme], embedding_split: int = DIM_SPLIT) -> Tuple[str, Optional[int], int]:
    """(model tensor that ``key`` stores, the dim it is split on across ranks or None, elements of the model tensor
    that one stored element covers along that dim): a quantized checkpoint packs and groups along the input dim."""
    is_scale = scheme is not None and key.endswith(SCALE_SUFFIX)
    base = key[: -len(SCALE_SUFFIX)] if is_scale else key
    dim = embedding_split if base == EMBEDDING else SPLIT_DIM[_kind(base)]
    if scheme is None or dim is None or not is_quantized(base):
        return base, dim, 1
    step = scheme.step(is_scale, dim)
    return (base, None, 1) if step is None else (base, dim, step)


def full_shapes(args: ModelArgs, scheme: Optional[Scheme] = None) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the unsharded model, in Meta's key order, with its full shape (as ``scheme`` stores it, if given)."""
    kinds = _kind_shapes(args)
    shapes = {"tok_embeddings.weight": kinds["tok_embeddings.weight"]}
    for layer in range(args.n_layers):
        shapes.update({f"layers.{layer}.{kind}": shape for kind, shape in kinds.items() if kind.startswith(("attention", "feed_forward", "ffn"))})
    shapes["norm.weight"] = kinds["norm.weight"]
    shapes["output.weight"] = kinds["output.weight"]
    if scheme is None:
        return shapes
    stored: Dict[str, Tuple[int, ...]] = {}
    for key, shape in shapes.items():
        stored.update(scheme.stored_shapes(key, shape) if is_quantized(key) else {key: shape})
    return stored


def shard_range(
    key: str, args: ModelArgs, n_shards: int, shard: int, scheme: Optional[Scheme] = None, embedding_split: int = DIM_SPLIT
) -> Tuple[int, int]:
    """[start, stop) of the full (stored) tensor, along its split dim, that shard ``shard`` of ``n_shards`` holds.

    Past ``n_kv_heads`` shards, each shard holds a copy of the one KV head its query heads use.
    """
    base, dim, step = _stored_split(key, scheme, embedding_split)
    kind = _kind(base)
    assert dim is not None, f"{key} is replicated"
    if kind in KV_KEYS:
        assert args.n_kv_heads is not None
        _, n_local_kv_heads = local_head_counts(args, n_shards)
        first_head = shard * args.n_kv_heads // n_shards
        return first_head * args.head_dim, (first_head + n_local_kv_heads) * args.head_dim
    size = _kind_shapes(args)[kind][dim] // n_shards
    assert size % step == 0, f"{key}: a slice of {size} cuts a stored element of {step} (check_quantized_split)"
    return shard * size // step, (shard + 1) * size // step


def shard_shape(
    key: str, args: ModelArgs, n_shards: int, shard: int, full: Tuple[int, ...], scheme: Optional[Scheme] = None,
    embedding_split: int = DIM_SPLIT,
) -> Tuple[int, ...]:
    dim = _stored_split(key, scheme, embedding_split)[1]
    if dim is None:
        return full
    start, stop = shard_range(key, args, n_shards, shard, scheme, embedding_split)
    return full[:dim] + (stop - start,) + full[dim + 1 :]


def embedding_split_of(shards: Sequence[StateDict], args: ModelArgs) -> Optional[int]:
    """How ``shards`` cut tok_embeddings.weight (``DIM_SPLIT`` or ``VOCAB_SPLIT``), read from the first one's width;
    None for a single shard, which is both."""
    if len(shards) == 1:
        return None
    embedding = shards[0].get(EMBEDDING)
    if embedding is not None and embedding.dim() == 2 and embedding.shape[1] == args.dim:
        return VOCAB_SPLIT
    return DIM_SPLIT  # or a bad shape, which check_shards names against this layout


def default_embedding_split(args: ModelArgs) -> int:
    """The split Meta's code for this model writes: by vocabulary for Llama 3's vocabulary, else on the embedding dim."""
    return VOCAB_SPLIT if args.vocab_size >= LLAMA3_VOCAB_SIZE else DIM_SPLIT


def detect_scheme(shard: StateDict, path: Optional[Path] = None) -> Optional[Scheme]:
    """How a shard's linear weights are quantized (None: not at all), read from its ``output.weight`` and ``_scale``."""
    weight, scale = shard.get("output.weight"), shard.get("output.weight" + SCALE_SUFFIX)
    if scale is None or weight is None or weight.dim() != 2:
        return None  # a float checkpoint; check_shards names any stray scale as unexpected
    if weight.dtype == torch.int8 and scale.dim() == 1:
        return Scheme("int8")
    if weight.dtype == torch.uint8 and scale.dim() == 3 and scale.shape[1] > 0 and (2 * weight.shape[1]) % scale.shape[1] == 0:
        group_size = 2 * weight.shape[1] // scale.shape[1]
        if group_size in GROUP_SIZES:
            return Scheme("int4", group_size)
    raise CheckpointError(
        f"{path or 'a shard'} holds output.weight ({weight.dtype}, {tuple(weight.shape)}) with output.weight_scale "
        f"({scale.dtype}, {tuple(scale.shape)}): not a layout llama.quantize writes (int8 with (out,) scales, or int4 "
        f"packed two per byte with (out, in / group_size, 2) scales and zeros, group_size one of {sorted(GROUP_SIZES)})"
    )


def _input_slices(args: ModelArgs, n_ranks: int) -> Dict[str, int]:
    """Inputs of one rank's slice of each quantized tensor kind."""
    shapes = _kind_shapes(args)
    return {
        kind: shapes[kind][1] // (n_ranks if SPLIT_DIM[kind] == 1 else 1)
        for kind in shapes if is_quantized(kind)
    }


def int4_group_size(args: ModelArgs, n_ranks: int, preferred: int) -> int:
    """The largest int4 group size up to ``preferred`` whose groups lie whole inside every rank's slice of an input dim."""
    slices = _input_slices(args, n_ranks)
    for group_size in GROUP_SIZES:
        if group_size <= preferred and all(size % group_size == 0 for size in slices.values()):
            if group_size != preferred:
                logger.debug("int4 groups of %d, not %d: on %d rank(s) the input slices are %s", group_size, preferred, n_ranks, slices)
            return group_size
    raise InputError(
        f"int4 needs input dims in multiples of {min(GROUP_SIZES)} on each rank, but on model_parallel_size={n_ranks} "
        f"the slices are {slices}; use quantize='int8' or another model_parallel_size"
    )


def check_quantized_split(args: ModelArgs, scheme: Optional[Scheme], n_ranks: int, source: str) -> None:
    """Raise a ``CheckpointError`` if cutting int4 weights for ``n_ranks`` ranks would cut a group in two."""
    if scheme is None or scheme.group_size is None:
        return
    cut = {kind: size for kind, size in _input_slices(args, n_ranks).items() if size % scheme.group_size}
    if cut:
        group_size = scheme.group_size
        works = [n for n in model_parallel_sizes(args) if not any(size % group_size for size in _input_slices(args, n).values())]
        raise CheckpointError(
            f"{source} holds int4 weights in groups of {scheme.group_size} inputs, but model_parallel_size={n_ranks} "
            f"would cut groups in two ({_some([f'{k} slices of {v}' for k, v in cut.items()])}); use model_parallel_size "
            f"in {works}, or quantize the original checkpoint again with a smaller --group_size"
        )


def check_shards(shards: Sequence[StateDict], paths: Sequence[Path], args: ModelArgs) -> None:
    """Every shard holds exactly the model's tensors, each with the shape (and, if quantized, dtype) its layout gives."""
    check_no_shard_missing(shards, paths, args)  # first: 3 of 4 shards is a missing file, not a bad size
    check_model_parallel_size_of_checkpoint(args, len(shards), paths)
    scheme = detect_scheme(shards[0], paths[0])
    check_quantized_split(args, scheme, len(shards), str(paths[0].parent))
    expected = full_shapes(args, scheme)
    found = embedding_split_of(shards, args)
    embedding_split = DIM_SPLIT if found is None else found  # one shard: either reads the same
    for i, (shard, path) in enumerate(zip(shards, paths)):
        missing = [k for k in expected if k not in shard]
        unexpected = [k for k in shard if k not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {_some(missing)}")
            if unexpected:
                parts.append(f"unexpected {_some(unexpected)}")
            raise CheckpointError(f"{path} does not match params.json (n_layers={args.n_layers}): {'; '.join(parts)}")
        for key, full in expected.items():
            want = shard_shape(key, args, len(shards), i, full, scheme, embedding_split)
            got = tuple(shard[key].shape)
            if got != want:
                layout = "" if len(shards) == 1 else f" split {'by vocabulary' if embedding_split == VOCAB_SPLIT else 'on the embedding dim'}"
                raise CheckpointError(
                    f"tensor {key} in {path} has shape {got}, expected {want} from params.json, "
                    f"vocab_size={args.vocab_size} and {len(shards)} shard(s)" + (f" of {scheme.kind} weights" if scheme else "")
                    + (layout if key == EMBEDDING else "")
                )
            if scheme is not None:
                _check_quantized_dtype(key, shard[key], scheme, path)


def _check_quantized_dtype(key: str, tensor: torch.Tensor, scheme: Scheme, path: Path) -> None:
    base, is_scale = (key[: -len(SCALE_SUFFIX)], True) if key.endswith(SCALE_SUFFIX) else (key, False)
    if not is_quantized(base):
        ok, want = tensor.is_floating_point(), "a float dtype"
    elif is_scale:
        ok, want = tensor.is_floating_point(), "a float dtype (the scales)"
    else:
        want_dtype = torch.int8 if scheme.kind == "int8" else torch.uint8
        ok, want = tensor.dtype == want_dtype, f"{want_dtype} as the other {scheme.kind} weights of the checkpoint"
    if not ok:
        raise CheckpointError(f"tensor {key} in {path} has dtype {tensor.dtype}, expected {want}")


def check_model_parallel_size_of_checkpoint(args: ModelArgs, n_shards: int, paths: Sequence[Path]) -> None:
    try:
        check_model_parallel_size(args, n_shards)
    except CheckpointError as e:
        raise CheckpointError(f"{paths[0].parent} has {n_shards} shards, which this params.json cannot have been split into: {e}") from None


def check_no_shard_missing(shards: Sequence[StateDict], paths: Sequence[Path], args: ModelArgs) -> None:
    """Raise ``FileNotFoundError`` naming the missing files if the first shard was cut for more shards than the folder holds.

    ``find_shards`` sees gaps in the numbering; this sees missing last shards (an interrupted download or copy).
    """
    embedding = shards[0].get(EMBEDDING)
    if embedding is None or embedding.dim() != 2 or 0 in embedding.shape:
        return  # check_shards names what is wrong with it
    rows, width = embedding.shape
    if width < args.dim and args.dim % width == 0:  # split on the embedding dim (Llama 2)
        written_for, how = args.dim // width, f"its {EMBEDDING} is {width} of dim={args.dim} wide"
    elif width == args.dim and 0 < rows < args.vocab_size and args.vocab_size % rows == 0:  # by vocabulary (Llama 3)
        written_for, how = args.vocab_size // rows, f"its {EMBEDDING} holds {rows} of vocab_size={args.vocab_size} rows"
    else:
        return
    if written_for > len(shards):
        if all(SHARD_NAME.fullmatch(p.name) for p in paths):
            missing = ", ".join(f"consolidated.{i:02d}.pth" for i in range(len(shards), written_for))
        else:
            missing = f"{written_for - len(shards)} shard(s)"
        raise FileNotFoundError(
            f"{paths[0]} is one of {written_for} shards ({how}) "
            f"but {paths[0].parent} holds {len(shards)}: missing {missing}"
        )


def _some(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


Piece = Tuple[int, torch.Tensor, Optional[int], int]


def source_pieces(
    key: str, shards: Sequence[StateDict], args: ModelArgs, n_ranks: int, rank: int, scheme: Optional[Scheme] = None,
    embedding_split: int = DIM_SPLIT, source_split: Optional[int] = None,
) -> List[Piece]:
    """(shard index, view, dim, offset) of each piece of rank ``rank``'s slice of ``key`` on ``n_ranks`` ranks: the view
    fills the slice from ``offset`` along ``dim`` (None: the whole slice).

    ``embedding_split``: how the ranks cut tok_embeddings.weight; ``source_split``: how ``shards`` do (None: read it
    from them). Where the two differ, each shard gives its block of the rank's columns, stacked along the shards' dim.
    """
    dim = _stored_split(key, scheme, embedding_split)[1]
    if dim is None:
        return [(0, shards[0][key].narrow(0, 0, shards[0][key].shape[0]), None, 0)]
    start, stop = shard_range(key, args, n_ranks, rank, scheme, embedding_split)
    if source_split is None:
        source_split = embedding_split_of(shards, args)
    src_split = embedding_split if source_split is None or len(shards) == 1 else source_split
    src_dim = _stored_split(key, scheme, src_split)[1]
    assert src_dim is not None, f"{key}: split for the ranks but replicated in the shards"
    pieces: List[Piece] = []
    seen = set()
    for i, shard in enumerate(shards):
        src_start, src_stop = shard_range(key, args, len(shards), i, scheme, src_split)
        if (src_start, src_stop) in seen:  # a replicated KV head: its first copy serves
            continue
        seen.add((src_start, src_stop))
        if src_dim != dim:  # the shard holds every column of the rank's slice: its rows go at its own offset
            pieces.append((i, shard[key].narrow(dim, start, stop - start), src_dim, src_start))
            continue
        lo, hi = max(start, src_start), min(stop, src_stop)
        if lo < hi:
            pieces.append((i, shard[key].narrow(dim, lo - src_start, hi - lo), dim, lo - start))
    covered = sum(p.shape[d] for _, p, d, _ in pieces)
    assert covered == (stop - start if src_dim == dim else _kind_shapes(args)[_kind(key)][src_dim]), f"{key}: shards do not cover rank {rank}'s slice"
    return pieces


def state_dict_for_rank(
    shards: Sequence[StateDict], args: ModelArgs, n_ranks: int, rank: int,
    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, convert: Optional[Convert] = None,
    embedding_split: int = DIM_SPLIT, keys: Optional[Collection[str]] = None, progress: Optional[Callable[[int], object]] = None,
) -> StateDict:
    """The state dict of one rank out of n_ranks, in memory of its own: no tensor is a view of ``shards``.

    ``embedding_split``: how the rank holds tok_embeddings.weight (the model runs ``DIM_SPLIT``; ``write_shards`` may
    write Llama 3's ``VOCAB_SPLIT``), whatever layout ``shards`` have.

    Each tensor is copied (float ones converted to ``dtype``) straight into its final buffer. The pages of a
    ``MappedShard`` are dropped from this process as soon as they are copied, so peak memory stays near one copy of
    the rank's weights rather than the copy plus the file's mapped pages. ``convert`` (a ``llama.quantize`` hook)
    takes each tensor of a quantized kind, in the shards' dtype, as soon as it is copied and gives what to keep
    instead: so a model is quantized one tensor at a time, never held whole in full precision.
    ``keys``: only these tensors (a converter asks for one at a time). ``progress(1)`` is called after each tensor.
    """
    scheme = detect_scheme(shards[0])
    source_split = embedding_split_of(shards, args)
    state = {}
    for key, full in full_shapes(args, scheme).items():
        if keys is not None and key not in keys:
            continue
        base, dim, _ = _stored_split(key, scheme, embedding_split)
        converting = convert is not None and is_quantized(base)
        pieces = source_pieces(key, shards, args, n_ranks, rank, scheme, embedding_split, source_split)
        first = pieces[0][1]
        shape = shard_shape(key, args, n_ranks, rank, full, scheme, embedding_split)
        out_dtype = first.dtype if converting or not first.is_floating_point() else dtype or first.dtype
        out = torch.empty(shape, dtype=out_dtype, device=device or first.device)
        for i, piece, piece_dim, offset in pieces:
            if piece_dim is None:
                out.copy_(piece)
            else:
                out.narrow(piece_dim, offset, piece.shape[piece_dim]).copy_(piece)
            if isinstance(shards[i], MappedShard):
                release_pages(piece)
        if progress is not None:
            progress(1)
        if not converting:
            state[key] = out
            continue
        assert convert is not None
        whole_rows = None
        if scheme is None and dim == 1 and shape[1] < full[1]:  # the rank holds part of each row
            whole_rows = functools.partial(_whole_pieces, key, shards, args)
        state.update(convert(key, out, whole_rows))
        del out
    return state


def _whole_pieces(key: str, shards: Sequence[StateDict], args: ModelArgs) -> Iterator[torch.Tensor]:
    """Views of the whole of ``key``, piece by piece along its split dim; each released once the next is asked for."""
    for i, piece, _, _ in source_pieces(key, shards, args, 1, 0):
        yield piece
        if isinstance(shards[i], MappedShard):
            release_pages(piece)


def load_checkpoint(
    ckpt_dir: Path, args: ModelArgs, n_ranks: int, rank: int,
    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None,
    show_progress: bool = False,
) -> StateDict:
    """Read the shards of ckpt_dir (any count) and return rank's state dict for n_ranks model-parallel ranks.

    quantize ("int8", "int4"): quantize the linear weights as they load (a quantized checkpoint loads as it is
    quantized whatever this says, unless it names another kind). Quantized weights come in the layout the layers
    run (``llama.quantize``), their scales in ``dtype``.
    """
    check_model_parallel_size(args, n_ranks)
    paths, shards = open_shards(ckpt_dir, args)
    return load_rank(shards, str(ckpt_dir), args, n_ranks, rank, device, dtype, quantize, show_progress)


def load_rank(
    shards: Sequence[StateDict], source: str, args: ModelArgs, n_ranks: int, rank: int,
    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None,
    show_progress: bool = False,
) -> StateDict:
    """``load_checkpoint`` of shards already opened and checked (any format's, under Meta's names); source names them.

    ``show_progress``: a progress bar on stderr, a step per tensor.
    """
    stored = detect_scheme(shards[0])
    run_dtype = dtype or shards[0][EMBEDDING].dtype
    convert: Optional[Convert] = None
    if stored is not None:
        if quantize is not None and quantize != stored.kind:
            raise InputError(
                f"{source} holds {stored.kind} weights (written by llama.quantize), which cannot be loaded as "
                f"quantize={quantize!r}; pass quantize=None or {stored.kind!r}, or quantize the original checkpoint"
            )
        check_quantized_split(args, stored, n_ranks, source)
        convert = Loader(run_dtype)
    elif quantize is not None:
        group_size = int4_group_size(args, n_ranks, DEFAULT_GROUP_SIZE) if quantize == "int4" else None
        convert = Quantizer(Scheme(quantize, group_size), run_dtype)
    n_tensors = len(full_shapes(args, stored))
    with tqdm(total=n_tensors, desc="loading weights", unit=" tensors", disable=not show_progress, leave=False) as bar:
        return state_dict_for_rank(shards, args, n_ranks, rank, device, dtype, convert, progress=bar.update)


def read_checkpoint(ckpt_dir: Path) -> Tuple[dict, ModelArgs, List[Path], List[StateDict]]:
    """A whole folder, for rewriting it: params.json, its ``ModelArgs`` (the vocabulary from the shards where
    params.json says -1), the shard paths and the shards, checked against each other."""
    params_path = ckpt_dir / "params.json"
    params = load_params(params_path)
    args = ModelArgs.from_params(params, source=str(params_path))
    paths, shards = open_shards(ckpt_dir, args)
    return params, args, paths, shards


def open_shards(ckpt_dir: Path, args: ModelArgs) -> Tuple[List[Path], List[StateDict]]:
    """Every shard of ckpt_dir, mapped and checked against args (whose vocab_size -1 the first shard fills in)."""
    paths = find_shards(ckpt_dir)
    shards: List[StateDict] = [load_shard(p) for p in paths]
    if args.vocab_size == -1:
        rows = _embedding_rows(shards[0], paths[0])
        args.vocab_size = rows * len(shards) if embedding_split_of(shards, args) == VOCAB_SPLIT else rows
    check_shards(shards, paths, args)
    return paths, shards


def infer_vocab_size(ckpt_dir: Path, args: ModelArgs) -> int:
    """The vocabulary size a checkpoint was trained with (rows of ``tok_embeddings.weight``, over every shard if
    they split it by vocabulary)."""
    paths = find_shards(ckpt_dir)
    first = load_shard(paths[0])
    rows = _embedding_rows(first, paths[0])
    vocab_split = len(paths) > 1 and first[EMBEDDING].dim() == 2 and first[EMBEDDING].shape[1] == args.dim
    return rows * len(paths) if vocab_split else rows


def _embedding_rows(shard: StateDict, path: Path) -> int:
    if "tok_embeddings.weight" not in shard:
        raise CheckpointError(f"{path} has no tok_embeddings.weight to read the vocabulary size from")
    return int(shard["tok_embeddings.weight"].shape[0])


def write_shards(
    out_dir: Path, shards: Sequence[StateDict], args: ModelArgs, n_shards: int, convert: Optional[Convert] = None,
    embedding_split: Optional[int] = None,
) -> List[Path]:
    """Write ``consolidated.NN.pth`` for n_shards ranks, cut from ``shards`` (any count), one file at a time.

    ``convert``: a per-tensor hook of ``state_dict_for_rank`` (``llama.quantize`` quantizes through it).
    ``embedding_split``: how to cut tok_embeddings.weight (``DIM_SPLIT``, ``VOCAB_SPLIT``); None keeps the layout of
    ``shards``, or for one shard takes the model family's (``default_embedding_split``).

    Each file is written under a temporary name and renamed over the old one, so a process reading or
    running from the old file keeps it whole. Then every other ``*.pth`` in out_dir is removed (with a
    warning), since loading reads every ``*.pth`` of a folder as a shard.
    """
    n_shards = to_int("n_shards", n_shards, 1)
    check_model_parallel_size(args, n_shards)
    check_quantized_split(args, detect_scheme(shards[0]), n_shards, "the checkpoint")
    if embedding_split is None:
        embedding_split = embedding_split_of(shards, args)
        embedding_split = default_embedding_split(args) if embedding_split is None else embedding_split
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank in range(n_shards):
        state = state_dict_for_rank(shards, args, n_shards, rank, convert=convert, embedding_split=embedding_split)
        path = out_dir / f"consolidated.{rank:02d}.pth"
        with atomic_write(path) as tmp:
            torch.save(state, tmp)
        paths.append(path)
        del state
    for stale in sorted(set(out_dir.glob("*.pth")) - set(paths)):
        logger.warning("removing %s: not one of the %d shard(s) just written into %s, and would be loaded as one", stale, n_shards, out_dir)
        stale.unlink()
    return paths


