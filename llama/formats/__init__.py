"""Checkpoint formats: which one a folder holds (``detect_format``), and its ``ModelArgs`` and shards under Meta's names.

Meta's format (``params.json``, ``consolidated.NN.pth``) is read by ``llama.checkpoint``; Hugging Face's
(``config.json``, ``*.safetensors``) by ``llama.formats.hf``, as one shard of lazily read tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Tuple

from llama.args import ModelArgs, load_params
from llama.checkpoint import StateDict, open_shards
from llama.errors import CheckpointError
from llama.formats import hf

META, HF = "meta", "hf"
NEEDS = (
    "Meta's format needs params.json and consolidated.NN.pth shards; Hugging Face's needs config.json and *.safetensors "
    "(model.safetensors, or shards listed in model.safetensors.index.json)"
)


def detect_format(ckpt_dir: Path) -> str:
    """``META`` or ``HF``, from the files in ckpt_dir; a folder of neither is a ``CheckpointError`` naming what it holds."""
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} not found")
    if (ckpt_dir / "params.json").is_file() or any(ckpt_dir.glob("*.pth")):
        return META
    if (ckpt_dir / hf.CONFIG).is_file() or any(ckpt_dir.glob("*.safetensors")):
        return HF
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in ckpt_dir.iterdir())
    shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "") if found else "nothing"
    hint = ""
    if (ckpt_dir / "original" / "params.json").is_file():
        hint = f"; {ckpt_dir / 'original'} holds Meta's format: pass that folder"
    raise CheckpointError(f"{ckpt_dir} is not a checkpoint folder: it holds {shown}. {NEEDS}{hint}")


def read_args(ckpt_dir: Path, fmt: str, **overrides: Any) -> Tuple[ModelArgs, Path]:
    """The folder's ``ModelArgs`` and the file they come from (params.json or config.json)."""
    if fmt == HF:
        path = ckpt_dir / hf.CONFIG
        return hf.args_from_config(hf.read_config(ckpt_dir), source=str(path), **overrides), path
    path = ckpt_dir / "params.json"
    return ModelArgs.from_params(load_params(path), source=str(path), **overrides), path


def read_shards(ckpt_dir: Path, fmt: str, args: ModelArgs) -> List[StateDict]:
    """The folder's tensors as shards under Meta's names, checked against args: Meta's memory-mapped ``.pth``
    files, or one shard of an HF folder's tensors read slice by slice."""
    if fmt == HF:
        return [hf.open_hf(ckpt_dir, args, hf.tied(hf.read_config(ckpt_dir)))]
    return open_shards(ckpt_dir, args)[1]
