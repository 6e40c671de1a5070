"""Hugging Face's Llama folders: ``config.json`` to and from ``ModelArgs``, tensor names, the rotary row order of q and
k, and the ``*.safetensors`` files read a slice at a time (``open_hf``) and written a tensor at a time (``write_hf``)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from llama.args import ModelArgs
from llama.checkpoint import full_shapes
from llama.errors import CheckpointError
from llama.formats.safetensors_file import DTYPES, write_safetensors
from llama.shard_files import atomic_write

logger = logging.getLogger(__name__)

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Written by transformers' older versions, recomputed by every model: skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_FILE_BYTES = 5 * 10**9  # transformers' default max_shard_size

# Meta's name within a layer -> Hugging Face's.
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent feature pairs, HF the two halves of each head: reorder w's rows (out, in) to match."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_rotary``: HF's half-split rows (out, in) of n_heads heads back into Meta's pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def hf_names(args: ModelArgs, tie_word_embeddings: bool = False) -> Dict[str, str]:
    """Meta's name -> HF's of every tensor, in Meta's order; tied, ``output.weight`` is HF's embedding."""
    names = {"tok_embeddings.weight": TOP_NAMES["tok_embeddings.weight"]}
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{meta}": f"model.layers.{i}.{hf}" for meta, hf in LAYER_NAMES.items()})
    names["norm.weight"] = TOP_NAMES["norm.weight"]
    names["output.weight"] = TOP_NAMES["tok_embeddings.weight" if tie_word_embeddings else "output.weight"]
    return names


def rotary_heads(key: str, args: ModelArgs) -> Optional[int]:
    """Heads whose rows HF reorders for rotary in Meta's tensor ``key`` (wq: n_heads, wk: n_kv_heads), else None."""
    if key.endswith("attention.wq.weight"):
        return args.n_heads
    if key.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_state_dict(state: Mapping[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """A full (unsharded) Meta state dict under HF's names, q and k rows reordered for HF's rotary layout."""
    assert args.n_kv_heads is not None
    hf_state = {hf: state[meta] for meta, hf in TOP_NAMES.items()}
    for i in range(args.n_layers):
        for meta, hf in LAYER_NAMES.items():
            tensor = state[f"layers.{i}.{meta}"]
            if meta == "attention.wq.weight":
                tensor = permute_rotary(tensor, args.n_heads)
            elif meta == "attention.wk.weight":
                tensor = permute_rotary(tensor, args.n_kv_heads)
            hf_state[f"model.layers.{i}.{hf}"] = tensor
    return hf_state


def read_config(ckpt_dir: Path) -> dict:
    """``config.json`` of an HF folder, with errors that name the file."""
    path = ckpt_dir / CONFIG
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: a Hugging Face folder holds config.json beside its *.safetensors") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON text: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def args_from_config(config: Mapping[str, Any], source: str = CONFIG, **overrides: Any) -> ModelArgs:
    """``ModelArgs`` of a transformers ``LlamaConfig`` mapping; what the model here cannot run is a ``CheckpointError``."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise CheckpointError(f"{source} has model_type={model_type!r}; only Llama checkpoints (model_type 'llama') load")
    unsupported = {
        "quantization_config": config.get("quantization_config") is not None,
        "attention_bias": bool(config.get("attention_bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
        f"hidden_act={config.get('hidden_act')!r}": config.get("hidden_act", "silu") != "silu",
    }
    if any(unsupported.values()):
        raise CheckpointError(f"{source}: {', '.join(k for k, v in unsupported.items() if v)} not supported (Llama's silu, bias-free float layers only)")
    try:
        dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        params: Dict[str, Any] = dict(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"],
            ffn_hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
        )
    except KeyError as e:
        raise CheckpointError(f"{source} lacks {e.args[0]!r}, which a Llama config.json gives") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and n_heads and head_dim != dim // n_heads:
        raise CheckpointError(f"{source} has head_dim={head_dim}, not hidden_size / num_attention_heads = {dim // n_heads}; not supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}  # transformers 5 names it rope_parameters
    params["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        try:
            params.update(
                use_scaled_rope=True, rope_scaling_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                rope_high_freq_factor=rope["high_freq_factor"], rope_original_max_seq_len=rope["original_max_position_embeddings"],
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: rope_scaling of rope_type 'llama3' lacks {e.args[0]!r}") from None
    elif rope_type != "default":
        raise CheckpointError(f"{source} has rope_scaling of rope_type {rope_type!r}; only Llama 3.1's 'llama3' (or none) is supported")
    return ModelArgs.from_params({**params, **overrides}, source=source)


def tied(config: Mapping[str, Any]) -> bool:
    """Whether the output layer is the embedding (Llama 3.2 1B/3B): HF's default is not."""
    return bool(config.get("tie_word_embeddings", False))


def config_from_args(
    args: ModelArgs, tie_word_embeddings: bool, dtype: torch.dtype, max_position_embeddings: Optional[int] = None,
    bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
) -> dict:
    """A transformers ``LlamaConfig`` as ``config.json`` (the fields the Hub's Llama folders carry)."""
    assert args.n_kv_heads is not None
    scaling = args.rope_scaling
    config: Dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if scaling is None else {
            "rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor, "original_max_position_embeddings": scaling.original_max_seq_len,
        },
        "max_position_embeddings": max_position_embeddings or default_max_position_embeddings(args),
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def default_max_position_embeddings(args: ModelArgs) -> int:
    """The context each family was released with (params.json does not say): 3.1+ 131072, 3 8192, CodeLlama 16384, 2 4096."""
    if args.use_scaled_rope:
        return 131072
    if args.vocab_size >= 128256:
        return 8192
    return 16384 if args.rope_theta >= 1e6 else 4096


def meta_params(args: ModelArgs) -> dict:
    """``params.json`` for ``args``: the hidden size as ``multiple_of`` and ``ffn_dim_multiplier`` where some pair
    gives it exactly (so Meta's own code reads the file), else as ``ffn_hidden_dim``."""
    assert args.n_kv_heads is not None
    params: Dict[str, Any] = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                              "vocab_size": args.vocab_size}
    params.update(_ffn_params(args.dim, args.hidden_dim))
    params.update(norm_eps=args.norm_eps, rope_theta=args.rope_theta)
    scaling = args.rope_scaling
    if scaling is not None:
        params["use_scaled_rope"] = True
        for name, value, meta_default in (
            ("rope_scaling_factor", scaling.factor, 8.0), ("rope_high_freq_factor", scaling.high_freq_factor, 4.0),
            ("rope_low_freq_factor", scaling.low_freq_factor, 1.0), ("rope_original_max_seq_len", scaling.original_max_seq_len, 8192),
        ):
            if value != meta_default:
                params[name] = value
    return params


def _ffn_params(dim: int, hidden: int) -> dict:
    for multiplier in (None, 1.3, 1.5, 1.0):
        for multiple_of in (2**k for k in range(12, -1, -1)):
            if ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).hidden_dim == hidden:
                return {"multiple_of": multiple_of} if multiplier is None else {"ffn_dim_multiplier": multiplier, "multiple_of": multiple_of}
    return {"ffn_hidden_dim": hidden}


class SafetensorsTensor:
    """One tensor of a safetensors file under Meta's name and row order, read only a slice at a time (``narrow``).

    ``rotary_heads``: for q and k, the heads whose rows HF reorders; a slice of whole heads is put back in Meta's order.
    """

    def __init__(self, part: Any, path: Path, name: str, rotary_heads: Optional[int] = None) -> None:
        self._part = part  # safetensors' lazy slice of the memory-mapped file
        self.path, self.name = path, name
        self.shape = torch.Size(part.get_shape())
        dtype = part.get_dtype()
        if dtype not in DTYPES:
            raise CheckpointError(f"tensor {name} in {path} has dtype {dtype}, which is not loaded")
        self.dtype = DTYPES[dtype]
        self.rotary_heads = rotary_heads

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Rows or columns [start, start + length) along dim, read from the file into a tensor of their own."""
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        block = self._part[tuple(index)]
        if self.rotary_heads is None:
            return block
        head_dim = self.shape[0] // self.rotary_heads
        assert dim != 0 or (start % head_dim == 0 and length % head_dim == 0), f"{self.name}: rows [{start}, {start + length}) cut a head"
        return unpermute_rotary(block, block.shape[0] // head_dim)


class HFShard(Dict[str, SafetensorsTensor]):
    """A whole HF checkpoint as one shard under Meta's names; holds its files open (memory-mapped) while it lives."""

    def __init__(self, tensors: Mapping[str, SafetensorsTensor], files: List[Any]) -> None:
        super().__init__(tensors)
        self.files = files


def find_safetensors(ckpt_dir: Path) -> Dict[str, Path]:
    """HF name -> file of every tensor, from ``model.safetensors.index.json`` or else the folder's ``*.safetensors``."""
    from safetensors import safe_open

    index_path = ckpt_dir / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_path} is not a safetensors index (a JSON object with a weight_map): {e}") from None
        located = {name: ckpt_dir / file for name, file in weight_map.items()}
        missing = sorted({p.name for p in located.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{index_path} lists {', '.join(missing)}, missing from {ckpt_dir}")
        return located
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in ckpt_dir.glob("pytorch_model*.bin"))
        hint = f" ({', '.join(pickles)} are pickles, which are not loaded: save the model with safe_serialization=True)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors files found in {ckpt_dir}{hint}")
    located = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in located:
                    raise CheckpointError(f"{name} is in both {located[name]} and {path}; give the folder a {INDEX}")
                located[name] = path
    return located


def open_hf(ckpt_dir: Path, args: ModelArgs, tie_word_embeddings: bool) -> HFShard:
    """The folder's tensors under Meta's names, checked against ``args``, each read lazily slice by slice."""
    from safetensors import safe_open

    located = find_safetensors(ckpt_dir)
    names = hf_names(args, tie_word_embeddings)
    expected = set(names.values())
    missing = sorted(expected - set(located))
    ignored = {TOP_NAMES["output.weight"]} if tie_word_embeddings else set()
    unexpected = sorted(n for n in set(located) - expected - ignored if not n.endswith(IGNORED_SUFFIXES))
    if missing or unexpected:
        parts = ([f"missing {_some(missing)}"] if missing else []) + ([f"unexpected {_some(unexpected)}"] if unexpected else [])
        tie = f", tie_word_embeddings={tie_word_embeddings}"
        raise CheckpointError(f"the safetensors of {ckpt_dir} do not match its config.json (num_hidden_layers={args.n_layers}{tie}): {'; '.join(parts)}")
    handles: Dict[Path, Any] = {}
    tensors: Dict[str, SafetensorsTensor] = {}
    for key, shape in full_shapes(args).items():
        name = names[key]
        path = located[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        tensor = SafetensorsTensor(handles[path].get_slice(name), path, name, rotary_heads(key, args))
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor {name} in {path} has shape {tuple(tensor.shape)}, expected {shape} from {ckpt_dir / CONFIG}")
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"tensor {name} in {path} has dtype {tensor.dtype}; only float checkpoints load")
        tensors[key] = tensor
    return HFShard(tensors, list(handles.values()))


def _some(names: List[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def write_hf(
    out_dir: Path, args: ModelArgs, tensor: Callable[[str], torch.Tensor], dtype: torch.dtype, tie_word_embeddings: bool,
    config: Mapping[str, Any], max_file_bytes: int = MAX_FILE_BYTES,
) -> List[Path]:
    """Write ``config.json`` and the weights as safetensors (several files and an index past ``max_file_bytes``).

    ``tensor(meta_key)``: the whole tensor in Meta's layout; each is asked for once, permuted, written, and let go.
    """
    names = hf_names(args, tie_word_embeddings)
    specs = [(names[key], shape, dtype) for key, shape in full_shapes(args).items() if not (tie_word_embeddings and key == "output.weight")]
    meta_of = {hf: meta for meta, hf in names.items() if not (tie_word_embeddings and meta == "output.weight")}
    groups: List[List[Tuple[str, Tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * torch.empty((), dtype=dtype).element_size()
        if groups[-1] and size + nbytes > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    out_dir.mkdir(parents=True, exist_ok=True)

    def hf_tensor(name: str) -> torch.Tensor:
        key = meta_of[name]
        t = tensor(key).to(dtype)
        heads = rotary_heads(key, args)
        return t if heads is None else permute_rotary(t, heads)

    if len(groups) == 1:
        paths = [out_dir / SINGLE_FILE]
    else:
        paths = [out_dir / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for path, group in zip(paths, groups):
        write_safetensors(path, group, hf_tensor)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s[1]) * torch.empty((), dtype=dtype).element_size() for s in specs)},
                 "weight_map": {name: path.name for path, group in zip(paths, groups) for name, _, _ in group}}
        with atomic_write(out_dir / INDEX) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")
    elif (out_dir / INDEX).exists():
        (out_dir / INDEX).unlink()
    for stale in sorted(set(out_dir.glob("*.safetensors")) - set(paths)):
        logger.warning("removing %s: not one of the %d file(s) just written into %s, and would be read as weights", stale, len(paths), out_dir)
        stale.unlink()
    with atomic_write(out_dir / CONFIG) as tmp:
        tmp.write_text(json.dumps(dict(config), indent=2) + "\n")
    return paths
