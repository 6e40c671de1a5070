"""Generation speed on one CUDA GPU: this package against transformers' LlamaForCausalLM, on the same random weights.

``python benchmarks/bench_cuda.py [--shape L] [--batches 1,8] [--reps 2] [--new_tokens 128] [--out table.md]``

Ours runs eager and compiled (``Llama.build(compile=True)``: CUDA graphs), each with the engine's overlapped steps
(the default on CUDA: a step's tokens are read after the next step is launched) and step by step; transformers runs
eager and, when asked, with its static cache compiled (``mode="reduce-overhead"``, as its docs advise). Each variant
runs in a fresh process, the variants alternating, ``--reps`` times; one process measures every batch size, timed
as ``bench_generate.py`` times them, through each side's public ``generate``. Compiling (at the first decode step)
and recording a batch size's CUDA graph (at its first) fall in the warm-up call, so neither shows in the table.
The bound is the weights' bytes over the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import bench_generate  # noqa: E402

VARIANTS: Dict[str, Dict[str, Any]] = {
    "ours": {"side": "ours", "compile": False, "overlap": True},
    "ours step by step": {"side": "ours", "compile": False, "overlap": False},
    "ours compiled": {"side": "ours", "compile": True, "overlap": True},
    "ours compiled step by step": {"side": "ours", "compile": True, "overlap": False},
    "transformers": {"side": "transformers", "static": False},
    "transformers static compiled": {"side": "transformers", "static": True},
}
BASELINE = "transformers"
SLOW = "transformers static compiled"


def worker_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    from llama import Llama, engine

    if not spec["overlap"]:
        engine.Engine.__init__ = functools.partialmethod(engine.Engine.__init__, overlap=False)  # type: ignore[method-assign]
    meta = Path(spec["ckpt"]) / "meta"
    max_seq_len = bench_generate.PROMPT_LENS[-1] + spec["new_tokens"]
    llama = Llama.build(str(meta), None, max_seq_len, max(spec["batches"]), device="cuda", dtype="bfloat16", compile=spec["compile"])
    llama.tokenizer.eos_id = -1

    def generate(prompts: List[List[int]], n: int) -> List[List[int]]:
        return llama.generate(prompts, n, temperature=0.0)[0]

    weight_bytes = bench_generate.tensor_bytes(llama.model, ("tok_embeddings", "cache", "rope", "freqs"))
    return {"weight_bytes": weight_bytes, **measure_batches(generate, spec)}


def worker_transformers(spec: Dict[str, Any]) -> Dict[str, Any]:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = LlamaForCausalLM.from_pretrained(str(Path(spec["ckpt"]) / "hf"), dtype=torch.bfloat16, local_files_only=True).cuda().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if spec["static"]:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def generate(prompts: List[List[int]], n: int) -> List[List[int]]:
        ids = torch.tensor(prompts, device="cuda")
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1] :].tolist()

    return measure_batches(generate, spec)


def measure_batches(generate: Callable[[List[List[int]], int], List[List[int]]], spec: Dict[str, Any]) -> Dict[str, Any]:
    per_batch = {}
    for batch in spec["batches"]:  # each side's generate sets its own no-grad or inference mode, as a user's call would
        per_batch[str(batch)] = bench_generate.measure(generate, {**spec, "batch": batch})
    return {"batches": per_batch, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 1e6}


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written (best of repeats)."""
    source = torch.ones(nbytes // 4, device="cuda")
    target = torch.empty_like(source)
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * nbytes / best


def table(results: Dict[str, List[Dict[str, Any]]], cli: argparse.Namespace, bandwidth: float) -> str:
    ok = {name: [r for r in runs if "error" not in r] for name, runs in results.items()}
    weight_bytes = next((r["weight_bytes"] for runs in ok.values() for r in runs if "weight_bytes" in r), math.nan)
    columns = ["batch", "variant", "decode tok/s", f"x {BASELINE}", "% of bound (bound steps/s)", "prefill 32 ms", "prefill 128 ms",
               "TTFT ms", "greedy tokens equal to ours", "GPU peak MB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    bound = bandwidth / weight_bytes

    def median(name: str, batch: int, metric: str) -> float:
        values = [r["batches"][str(batch)][metric] for r in ok.get(name, [])]
        return statistics.median(values) if values else math.nan

    for batch in cli.batches:
        base = median(BASELINE, batch, "decode_tok_s")
        reference = next((r["batches"][str(batch)]["tokens"] for r in ok.get("ours", [])), None)
        for name in [v for v in VARIANTS if v in results]:
            decode = median(name, batch, "decode_tok_s")
            steps = median(name, batch, "steps_s")
            first = next((r["batches"][str(batch)]["tokens"] for r in ok.get(name, [])), None)
            agree = "-" if reference is None or first is None else f"{bench_generate.common_prefix(reference, first)}/{cli.new_tokens}"
            peak = statistics.median([r["peak_gpu_mb"] for r in ok[name]]) if ok.get(name) else math.nan
            lines.append(f"| {batch} | {name} | {bench_generate.fmt(decode, 1)} | {bench_generate.fmt(decode / base)}x | "
                         f"{bench_generate.fmt(100 * steps / bound, 0)}% ({bench_generate.fmt(bound, 0)}) | "
                         f"{bench_generate.fmt(1e3 * median(name, batch, 'prefill_32_s'), 1)} | "
                         f"{bench_generate.fmt(1e3 * median(name, batch, 'prefill_128_s'), 1)} | "
                         f"{bench_generate.fmt(1e3 * median(name, batch, 'ttft_s'), 0)} | {agree} | {bench_generate.fmt(peak, 0)} |")
    errors = [f"- {name}: {r['error']}" for name, runs in results.items() for r in runs if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        result = (worker_ours if spec["side"] == "ours" else worker_transformers)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(_common.SHAPES), default="L")
    parser.add_argument("--batches", type=bench_generate.csv_list(bench_generate.positive), default=[1, 8])
    parser.add_argument("--reps", type=bench_generate.positive, default=2, help="fresh processes per variant (the table shows medians)")
    parser.add_argument("--new_tokens", type=bench_generate.positive, default=128)
    parser.add_argument("--variants", type=bench_generate.csv_list(str, list(VARIANTS)), default=[v for v in VARIANTS if v != SLOW],
                        help=f"comma-separated, of: {', '.join(VARIANTS)} (default all but {SLOW!r}, which compiles for minutes)")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "llama-bench")
    parser.add_argument("--out", type=Path, help="write the table here, and every run's figures beside it (suffix .json)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one worker may take")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: for a smoke test")
    cli = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark runs on a GPU (bench_generate.py measures the CPU)")
    ckpt = _common.checkpoint_dir(cli.work_dir, cli.shape, cli.quick)
    params = _common.shape_params(cli.shape, cli.quick)
    bandwidth = copy_bandwidth()
    results: Dict[str, List[Dict[str, Any]]] = {}
    start = time.perf_counter()
    for rep in range(cli.reps):
        for name in cli.variants if rep % 2 == 0 else cli.variants[::-1]:
            spec = {**VARIANTS[name], "ckpt": str(ckpt), "batches": cli.batches, "new_tokens": cli.new_tokens, "inner": 3,
                    "vocab_size": params["vocab_size"], "threads": os.cpu_count() or 1}
            result = bench_generate.run_worker(spec, cli.timeout, script=Path(__file__).resolve())
            results.setdefault(name, []).append(result)
            summary = result.get("error") or ", ".join(f"b{b}: {r['decode_tok_s']:.0f} tok/s" for b, r in result["batches"].items())
            print(f"[rep {rep + 1}, {time.perf_counter() - start:.0f} s] {name}: {summary}", file=sys.stderr, flush=True)
    header = (f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}; "
              f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s; shape {cli.shape}{' (quick)' if cli.quick else ''} in bfloat16, random "
              f"weights; greedy, {cli.new_tokens} new tokens after a {bench_generate.PROMPT_LENS[0]}-token prompt, tok/s summed over "
              f"the batch; medians of {cli.reps} fresh processes per variant, alternating.\n\n")
    text = header + table(results, cli, bandwidth)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "bandwidth_bytes_s": bandwidth, "shape": cli.shape, "reps": cli.reps}
    _common.write_results(cli.out, text, meta, [{"variant": name, "runs": runs} for name, runs in results.items()])


if __name__ == "__main__":
    main()
