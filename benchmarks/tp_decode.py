"""Decode speed of tensor parallelism on one CPU: 2 processes x 1 thread (torchrun, model-parallel 2) vs 1 process x 2 threads.

``python benchmarks/tp_decode.py [--dtype float32] [--new_tokens 128] [--rounds 3]`` writes a random 134M-parameter
Llama (dim 768, 12 layers, 12 heads, vocab 32000) to a temporary folder, runs both configurations in turn
``--rounds`` times, and prints decode tokens/s (batch 1, after the prefill), their ratio, and the bound that
memory bandwidth puts on decoding.

The runs go through ``Llama.build`` and ``Llama.generate``. No 32000-word sentencepiece model can be trained
from the bundled text, so each worker swaps in a stand-in tokenizer of that size (with no EOS, so every run
decodes the same number of tokens); prompts are random token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.args import ModelArgs  # noqa: E402
from llama.checkpoint import full_shapes, write_shards  # noqa: E402
from llama.demo import random_state_dict  # noqa: E402

PARAMS = {"dim": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 32000, "multiple_of": 256, "norm_eps": 1e-05}
CONFIGS = {  # name: (launcher prefix, threads per process)
    "2 processes x 1 thread (TP 2)": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], 1),
    "1 process x 2 threads": ([], 2),
}


class StandInTokenizer:
    """What Llama.build and generate use of a tokenizer: its size, BOS, and no EOS or pad piece (as Meta's)."""

    def __init__(self, model_path: Any) -> None:
        self.n_words, self.bos_id, self.eos_id, self.pad_id = PARAMS["vocab_size"], 1, -1, -1


def write_checkpoint(ckpt_dir: Path, dtype: torch.dtype) -> ModelArgs:
    args = ModelArgs.from_params(PARAMS)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(PARAMS))
    write_shards(ckpt_dir, [random_state_dict(args, dtype=dtype)], args, 1)
    return args


def weight_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: all of them but the embedding table, of which it reads one row."""
    numel = sum(torch.Size(shape).numel() for key, shape in full_shapes(args).items() if key != "tok_embeddings.weight")
    return (numel + args.dim) * torch.empty(0, dtype=dtype).element_size()


def read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second one process with this many threads reads (best of repeats of summing a 1 GiB tensor)."""
    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def worker(cli: argparse.Namespace) -> None:
    """One rank: build, warm up, then time the decode steps of cli.repeats generations."""
    from llama import Llama, generation

    torch.set_num_threads(cli.threads)
    generation.Tokenizer = StandInTokenizer  # type: ignore[misc, assignment]
    max_seq_len = cli.prompt_len + cli.new_tokens
    llama = Llama.build(str(cli.ckpt_dir), "unused", max_seq_len, max_batch_size=1, device="cpu", dtype=cli.dtype)
    forward = llama.model.forward
    starts: List[float] = []

    def timed_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        starts.append(time.perf_counter())
        return forward(*args, **kwargs)

    llama.model.forward = timed_forward  # type: ignore[method-assign]
    prompt = torch.randint(2, PARAMS["vocab_size"], (1, cli.prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    llama.generate(prompt, min(16, cli.new_tokens), temperature=0)  # warm-up
    tokens_per_s = []
    for _ in range(cli.repeats):
        starts.clear()
        llama.generate(prompt, cli.new_tokens, temperature=0)
        end = time.perf_counter()
        # Call 1 is the prefill; from the start of call 2 each step is a forward, sampling and the token broadcast.
        tokens_per_s.append((len(starts) - 1) / (end - starts[1]))
    print("RESULT " + json.dumps({"tokens_per_s": tokens_per_s}), flush=True)


def run_config(name: str, cli: argparse.Namespace, ckpt_dir: Path) -> List[float]:
    launcher, threads = CONFIGS[name]
    command = [sys.executable, *launcher, __file__, "--worker", "--ckpt_dir", str(ckpt_dir), "--threads", str(threads),
               "--dtype", cli.dtype, "--new_tokens", str(cli.new_tokens), "--prompt_len", str(cli.prompt_len), "--repeats", str(cli.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="times each configuration is launched, alternating")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        worker(cli)
        return

    dtype = getattr(torch, cli.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp) / "ckpt"
        args = write_checkpoint(ckpt_dir, dtype)
        n_params = sum(torch.Size(shape).numel() for shape in full_shapes(args).values())
        print(f"model: {n_params / 1e6:.0f}M parameters in {cli.dtype}; batch 1, {cli.prompt_len}-token prompt, "
              f"{cli.new_tokens} new tokens, {cli.rounds} launches x {cli.repeats} timed generations per configuration")
        results: Dict[str, List[float]] = {name: [] for name in CONFIGS}
        for _ in range(cli.rounds):
            for name in CONFIGS:
                results[name] += run_config(name, cli, ckpt_dir)
    bandwidth = read_bandwidth(threads=2)
    per_token = weight_bytes_per_token(args, dtype)

    print("\n| configuration | decode tokens/s (median) | min - max |\n| --- | --- | --- |")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} - {max(values):.1f} |")
    tp, alone = (statistics.median(values) for values in results.values())
    print(f"\nratio TP 2 / 1 process: {tp / alone:.2f}x (target >= 0.95x; Meta's reference reaches 0.68x)")
    print(f"memory-bandwidth bound: {per_token / 1e6:.0f} MB of weights per token / {bandwidth / 1e9:.1f} GB/s read "
          f"(2 threads, summing 1 GiB) = {bandwidth / per_token:.1f} tokens/s")


if __name__ == "__main__":
    main()
