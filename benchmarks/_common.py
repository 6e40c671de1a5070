"""What the benchmarks share: the S/M/L shapes, their random checkpoints in Meta's and transformers' formats (cached
on disk), the machine's read bandwidth, a description of its CPU, and a process's peak RSS.

Imports neither ``llama`` nor ``transformers`` at module level, so a worker of either side loads only its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

# Meta's params.json of each shape. S is llama2.c's stories15M layout; L is TinyLlama 1.1B's.
SHAPES: Dict[str, Dict[str, Any]] = {
    "S": {"dim": 288, "n_layers": 6, "n_heads": 6, "vocab_size": 32000, "multiple_of": 32, "norm_eps": 1e-05},
    "M": {"dim": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 32000, "multiple_of": 256, "norm_eps": 1e-05},
    "L": {"dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "vocab_size": 32000, "multiple_of": 256, "norm_eps": 1e-05},
}
# --quick: the same names, tiny sizes (L keeps grouped-query attention), for the smoke test.
QUICK_SHAPES: Dict[str, Dict[str, Any]] = {
    "S": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512, "multiple_of": 32, "norm_eps": 1e-05},
    "M": {"dim": 96, "n_layers": 2, "n_heads": 4, "vocab_size": 512, "multiple_of": 32, "norm_eps": 1e-05},
    "L": {"dim": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32, "norm_eps": 1e-05},
}
DISK_DTYPE = {"S": torch.float32, "M": torch.float32, "L": torch.bfloat16}  # L in bf16: 2.2 GB rather than 4.4
EOS_ID = 2
FORMAT_VERSION = 1  # bump when what is written changes, so that old cached folders are not reused


def shape_params(name: str, quick: bool) -> Dict[str, Any]:
    return dict((QUICK_SHAPES if quick else SHAPES)[name])


def checkpoint_dir(work_dir: Path, name: str, quick: bool, seed: int = 0) -> Path:
    """``work_dir/<name>-<hash>`` holding ``meta/`` and ``hf/`` with the same weights, written on first use."""
    params, dtype = shape_params(name, quick), DISK_DTYPE[name]
    key = json.dumps([params, str(dtype), seed, FORMAT_VERSION], sort_keys=True)
    folder = work_dir / f"{name}{'-quick' if quick else ''}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if not (folder / "complete").is_file():
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _write_checkpoints(tmp, params, dtype, seed)
        (tmp / "complete").write_text(key + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def _write_checkpoints(folder: Path, params: Mapping[str, Any], dtype: torch.dtype, seed: int) -> None:
    from llama.args import ModelArgs
    from llama.checkpoint import write_shards
    from llama.demo import random_state_dict

    args = ModelArgs.from_params(params)
    state = random_state_dict(args, seed=seed, dtype=dtype)
    # EOS must never win the greedy argmax, so that every run decodes its full length whatever a side's stop logic:
    # a 1000x smaller output row gives it a logit near 0 where the largest of the others is several units.
    state["output.weight"][EOS_ID] *= 1e-3
    meta = folder / "meta"
    meta.mkdir(parents=True)
    (meta / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    (meta / "tokenizer.model").write_bytes(word_tokenizer(args.vocab_size))
    write_shards(meta, [state], args, 1)
    _write_hf(folder / "hf", args, state, dtype)


def word_tokenizer(vocab_size: int) -> bytes:
    """A sentencepiece word model of exactly vocab_size pieces (unk 0, bos 1, eos 2): the size is all a run needs."""
    import sentencepiece as spm

    words = [f"w{i}" for i in range(vocab_size)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(words[i : i + 64]) for i in range(0, len(words), 64)),
        model_writer=model,
        model_type="word",
        vocab_size=vocab_size,
        unk_id=0,
        bos_id=1,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _write_hf(folder: Path, args: Any, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """``config.json`` and ``model.safetensors`` that ``LlamaForCausalLM.from_pretrained`` loads as it would any Llama."""
    from safetensors.torch import save_file

    from llama.formats.hf import config_from_args, to_hf_state_dict

    config = config_from_args(args, False, dtype, max_position_embeddings=8192, bos_token_id=1, eos_token_id=EOS_ID)
    hf_state = to_hf_state_dict(state, args)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second this process reads with this many threads (best of repeats of summing nbytes of float32)."""
    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def cpu_description() -> str:
    """The CPU's model name from /proc/cpuinfo, with the vector extensions that matter to bf16 and int8 kernels."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    flags_line = next((line for line in info.splitlines() if line.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[1].split()) if flags_line else set()
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
    present = [flag for flag in wanted if flag in flags]
    return f"{name} ({', '.join(present)})" if present else name


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MB; NaN where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return math.nan


def write_results(out: Optional[Path], text: str, meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    """Print the markdown table; with ``out``, write it there and every row's figures beside it (suffix .json)."""
    print(text)
    if out:
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
