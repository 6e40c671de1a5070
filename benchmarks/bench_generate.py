"""Generation speed and memory of this package against transformers' LlamaForCausalLM, on the same random weights.

``python benchmarks/bench_generate.py [--shapes S,M,L] [--dtypes float32,bfloat16,int8,int4] [--batches 1,8] [--reps 3]
[--new_tokens 128] [--threads N] [--work_dir DIR] [--out table.md] [--quick]``

Writes random seeded checkpoints of each shape once into ``--work_dir`` (Meta's format for us, safetensors for
transformers) and reuses them. Every measurement runs in a fresh process (this file with ``--worker``), ours and
transformers' alternating, ``--reps`` times each; the table shows medians. Both sides are timed the same way, from
outside, through their public ``generate``: prefill = a call for one new token; decode tokens/s =
batch x (new_tokens - 1) / (time of a call for new_tokens - prefill). int8 and int4 (``Llama.build(quantize=)``) and
compiled rows (``Llama.build(compile=True)``) appear when this version of the package accepts those options; they are
compared with transformers in bfloat16 and in the row's own float dtype respectively.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

PROMPT_LENS = (32, 128)  # decode is timed after the 32-token prefill; 128 is timed as a second prefill
FLOAT_DTYPES = ("float32", "bfloat16")
QUANTIZED = ("int8", "int4")
REFERENCE_DTYPE = "bfloat16"  # transformers' row that int8 and int4 are compared with


# ---------------------------------------------------------------------------------------------------------------
# Worker: one fresh process, one model, one batch size; prints one RESULT line of JSON.


def prompts(batch: int, length: int, vocab_size: int, seed: int) -> List[List[int]]:
    """Seeded random prompts: BOS then ids above EOS, the same on both sides."""
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(_common.EOS_ID + 1, vocab_size, (batch, length - 1), generator=generator)
    return [[1] + row for row in body.tolist()]


def tensor_bytes(module: torch.nn.Module, skip: Sequence[str]) -> int:
    """Bytes of every tensor a module tree holds (parameters, buffers, plain tensor attributes such as packed
    quantized weights), leaving out those whose dotted name contains one of ``skip``."""
    seen, total = set(), 0
    for prefix, mod in module.named_modules():
        members = itertools.chain(mod._parameters.items(), mod._buffers.items(), vars(mod).items())
        for name, tensor in members:
            full = f"{prefix}.{name}"
            if not isinstance(tensor, torch.Tensor) or any(s in full for s in skip):
                continue
            key = (tensor.data_ptr(), tensor.nbytes)
            if key not in seen:
                seen.add(key)
                total += tensor.nbytes
    return total


def measure(generate: Callable[[List[List[int]], int], List[List[int]]], spec: Dict[str, Any]) -> Dict[str, Any]:
    """Time first token (cold), prefills and a full-length generation through ``generate(prompts, n) -> new tokens``."""
    vocab, batch, new_tokens, inner = spec["vocab_size"], spec["batch"], spec["new_tokens"], spec["inner"]
    short, long = (prompts(batch, n, vocab, seed=n) for n in PROMPT_LENS)

    def timed(batch_prompts: List[List[int]], n: int) -> Tuple[float, List[List[int]]]:
        start = time.perf_counter()
        out = generate(batch_prompts, n)
        elapsed = time.perf_counter() - start
        if len(out) != len(batch_prompts) or any(len(row) != n for row in out):
            raise RuntimeError(f"asked for {n} tokens per row, got {[len(row) for row in out]}: a row stopped early")
        return elapsed, out

    ttft_s, _ = timed(short, 1)  # the first call of a fresh process: any compilation and first-touch costs count
    timed(short, min(8, new_tokens))  # warm-up of the decode step as well
    prefill_short = statistics.median(timed(short, 1)[0] for _ in range(inner))
    full_s, tokens = timed(short, new_tokens)
    prefill_long = statistics.median(timed(long, 1)[0] for _ in range(inner))
    decode_s = full_s - prefill_short
    return {
        "ttft_s": ttft_s,
        "prefill_32_s": prefill_short,
        "prefill_128_s": prefill_long,
        "decode_tok_s": batch * (new_tokens - 1) / decode_s if decode_s > 0 else math.nan,
        "steps_s": (new_tokens - 1) / decode_s if decode_s > 0 else math.nan,
        "tokens": tokens[0],
    }


def worker_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    from llama import Llama

    meta = Path(spec["ckpt"]) / "meta"
    kwargs: Dict[str, Any] = {"device": "cpu", "dtype": spec["float_dtype"]}
    if spec["quantize"]:
        kwargs["quantize"] = spec["quantize"]
    if spec["compile"]:
        kwargs["compile"] = spec.get("compile_mode", True)
    max_seq_len = PROMPT_LENS[-1] + spec["new_tokens"]
    start = time.perf_counter()
    llama = Llama.build(str(meta), str(meta / "tokenizer.model"), max_seq_len, spec["batch"], **kwargs)
    load_s = time.perf_counter() - start
    llama.tokenizer.eos_id = -1  # belt and braces: the checkpoint already keeps EOS from winning

    def generate(batch_prompts: List[List[int]], n: int) -> List[List[int]]:
        return llama.generate(batch_prompts, n, temperature=0.0)[0]

    result = measure(generate, spec)
    model = getattr(llama, "model", None)
    if isinstance(model, torch.nn.Module):
        embedding_row = spec["dim"] * model.tok_embeddings.weight.element_size() if hasattr(model, "tok_embeddings") else 0
        result["weight_bytes"] = tensor_bytes(model, ("tok_embeddings", "cache", "rope", "freqs")) + embedding_row
    return {**result, "load_s": load_s, "peak_rss_mb": _common.peak_rss_mb()}


def worker_transformers(spec: Dict[str, Any]) -> Dict[str, Any]:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, spec["float_dtype"])
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(str(Path(spec["ckpt"]) / "hf"), dtype=dtype, local_files_only=True).eval()
    load_s = time.perf_counter() - start
    model.generation_config.eos_token_id = None  # decode every token, as on our side
    model.generation_config.pad_token_id = 0

    def generate(batch_prompts: List[List[int]], n: int) -> List[List[int]]:
        ids = torch.tensor(batch_prompts)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1] :].tolist()

    result = measure(generate, spec)
    embedding_row = spec["dim"] * model.model.embed_tokens.weight.element_size()
    result["weight_bytes"] = tensor_bytes(model, ("embed_tokens", "rotary")) + embedding_row
    return {**result, "load_s": load_s, "peak_rss_mb": _common.peak_rss_mb()}


def worker(spec: Dict[str, Any]) -> None:
    torch.set_num_threads(spec["threads"])
    run = worker_ours if spec["side"] == "ours" else worker_transformers
    result = run(spec)  # each side's generate sets its own no-grad or inference mode, as a user's call would
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Driver: checkpoints, the schedule of worker launches, medians, the table.

Key = Tuple[str, str, int, str, bool]  # (side, shape, batch, table dtype, compiled)
Job = Tuple[Key, Dict[str, Any]]
METRICS = ("decode_tok_s", "steps_s", "prefill_32_s", "prefill_128_s", "ttft_s", "peak_rss_mb", "load_s", "weight_bytes")
COLUMNS = ["shape", "dtype", "batch", "ours tok/s", "transformers tok/s", "ratio", "ours % of bound (bound tok/s)",
           "prefill 32 ms ours / tf", "prefill 128 ms ours / tf", "TTFT ms ours / tf", "peak RSS MB ours / tf", "load s ours / tf"]


def build_options() -> Dict[str, bool]:
    """Which optional ``Llama.build`` keywords this version of the package accepts."""
    from llama import Llama

    parameters = inspect.signature(Llama.build).parameters
    return {name: name in parameters for name in ("quantize", "compile")}


def ours_variants(dtype: str, options: Dict[str, bool], compile_mode: str = "default") -> List[Dict[str, Any]]:
    """Our runs of one table dtype: eager, then compiled (in compile_mode) where supported; none for int8/int4 without quantize=."""
    if dtype in QUANTIZED and not options["quantize"]:
        return []
    base = {"float_dtype": REFERENCE_DTYPE if dtype in QUANTIZED else dtype, "quantize": dtype if dtype in QUANTIZED else None}
    compiled = {**base, "compile": True, "compile_mode": compile_mode}
    return [{**base, "compile": False}] + ([compiled] if options["compile"] else [])


def compiled_label(compile_mode: str) -> str:
    return " compiled" + ("" if compile_mode == "default" else f" ({compile_mode})")


def reference_dtype(dtype: str) -> str:
    """The dtype of transformers' run that a row compares with."""
    return REFERENCE_DTYPE if dtype in QUANTIZED else dtype


def schedule(cli: argparse.Namespace, options: Dict[str, bool]) -> List[Job]:
    """Every launch of one repetition. Per shape and batch, each of transformers' runs follows our first run of its dtype."""
    jobs: List[Job] = []
    for shape, batch in itertools.product(cli.shapes, cli.batches):
        theirs_done = set()
        for dtype in cli.dtypes:
            for variant in ours_variants(dtype, options, cli.compile_mode):
                jobs.append((("ours", shape, batch, dtype, variant["compile"]), variant))
                ref = reference_dtype(dtype)
                if ref not in theirs_done:
                    theirs_done.add(ref)
                    jobs.append((("transformers", shape, batch, ref, False), {"float_dtype": ref, "quantize": None, "compile": False}))
    return jobs


def swap_pairs(jobs: List[Job]) -> List[Job]:
    """The schedule with each adjacent (ours, transformers) pair in the other order."""
    swapped, i = list(jobs), 0
    while i < len(swapped) - 1:
        if swapped[i][0][0] == "ours" and swapped[i + 1][0][0] == "transformers":
            swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
            i += 1
        i += 1
    return swapped


def run_worker(spec: Dict[str, Any], timeout: float, script: Path = Path(__file__).resolve()) -> Dict[str, Any]:
    """Launch one worker (``script --worker SPEC``); its figures, or {"error": ...} with its stderr's tail printed."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(script), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        print(done.stderr[-3000:], file=sys.stderr)
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"error": last[0][:200]}
    return json.loads(line[len("RESULT ") :])


def medians(runs: List[Dict[str, Any]]) -> Dict[str, float]:
    """The median of each metric over the runs that have it."""
    out = {}
    for metric in METRICS:
        values = [run[metric] for run in runs if metric in run and not math.isnan(run[metric])]
        out[metric] = statistics.median(values) if values else math.nan
    return out


def fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}f}" if value < 100 else f"{value:.0f}"


def common_prefix(a: List[int], b: List[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(ours: List[Dict[str, Any]], theirs: List[Dict[str, Any]], bandwidth: float) -> Dict[str, Any]:
    """One row's medians, ratio to transformers, share of the bandwidth bound and greedy agreement."""
    mine, tf = medians(ours), medians(theirs)
    bound = bandwidth / mine["weight_bytes"] if mine["weight_bytes"] > 0 else math.nan  # decode steps/s
    agree = None
    if ours and theirs and "tokens" in ours[0] and "tokens" in theirs[0]:
        agree = common_prefix(ours[0]["tokens"], theirs[0]["tokens"])
    errors = [f"{side}: {run['error']}" for side, runs in (("ours", ours), ("transformers", theirs)) for run in runs if "error" in run]
    return {"ours": mine, "transformers": tf, "ratio": mine["decode_tok_s"] / tf["decode_tok_s"], "bound_steps_s": bound,
            "percent_of_bound": 100 * mine["steps_s"] / bound, "greedy_agree": agree, "errors": errors,
            "runs": {"ours": ours, "transformers": theirs}}


def cells(row: Dict[str, Any]) -> List[str]:
    """The table cells after shape, dtype and batch."""
    mine, tf = row["ours"], row["transformers"]

    def pair(metric: str, digits: int, scale: float = 1.0) -> str:
        return f"{fmt(scale * mine[metric], digits)} / {fmt(scale * tf[metric], digits)}"

    ratio, share = row["ratio"], row["percent_of_bound"]
    return [fmt(mine["decode_tok_s"], 1), fmt(tf["decode_tok_s"], 1), "-" if math.isnan(ratio) else f"{fmt(ratio)}x",
            "-" if math.isnan(share) else f"{fmt(share, 0)}% ({fmt(row['bound_steps_s'], 1)})",
            pair("prefill_32_s", 1, 1e3), pair("prefill_128_s", 1, 1e3), pair("ttft_s", 1, 1e3), pair("peak_rss_mb", 0), pair("load_s", 2)]


def table(results: Dict[Key, List[Dict[str, Any]]], cli: argparse.Namespace, options: Dict[str, bool], bandwidth: float,
          header: str) -> Tuple[str, List[Dict[str, Any]]]:
    """The markdown table (header line, rows, notes) and one summary per row."""
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes, rows = [], []
    for shape, dtype, batch in itertools.product(cli.shapes, cli.dtypes, cli.batches):
        theirs = results.get(("transformers", shape, batch, reference_dtype(dtype), False), [])
        for variant in ours_variants(dtype, options, cli.compile_mode) or [None]:
            compiled = bool(variant and variant["compile"])
            label = dtype + (compiled_label(cli.compile_mode) if compiled else "") + (" (tf: bf16)" if dtype in QUANTIZED else "")
            row: Dict[str, Any] = {"shape": shape, "dtype": dtype, "batch": batch, "compile": compiled, "supported": variant is not None}
            if variant is None:
                lines.append(f"| {shape} | {label} | {batch} | " + " | ".join(["n/a"] * (len(COLUMNS) - 3)) + " |")
                rows.append(row)
                continue
            row.update(summarize(results.get(("ours", shape, batch, dtype, compiled), []), theirs, bandwidth))
            rows.append(row)
            lines.append(f"| {shape} | {label} | {batch} | " + " | ".join(cells(row)) + " |")
            if row["errors"]:
                notes.append(f"- {shape} {label} batch {batch}: {len(row['errors'])} failed run(s), first: {row['errors'][0]}")
            if dtype == "float32" and row["greedy_agree"] is not None and row["greedy_agree"] < cli.new_tokens:
                notes.append(f"- {shape} {label} batch {batch}: the first prompt's greedy tokens agree with transformers' "
                             f"for {row['greedy_agree']} of {cli.new_tokens} tokens")
    if not options["quantize"] and any(d in QUANTIZED for d in cli.dtypes):
        notes.append("- n/a: this version's `Llama.build` has no `quantize=` option.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n", rows


def csv_list(kind: Callable[[str], Any], allowed: Optional[Sequence[Any]] = None) -> Callable[[str], List[Any]]:
    """An argparse type: a comma-separated list of kind, each in allowed if given."""

    def parse(text: str) -> List[Any]:
        items = [kind(x) for x in text.split(",") if x.strip()]
        if not items or any(allowed is not None and x not in allowed for x in items):
            expected = f" of {', '.join(map(str, allowed))}" if allowed else ""
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list{expected}")
        return items

    return parse


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=csv_list(str, list(_common.SHAPES)), default=["S", "M", "L"], help="of S, M, L (default all)")
    parser.add_argument("--dtypes", type=csv_list(str, FLOAT_DTYPES + QUANTIZED), default=list(FLOAT_DTYPES + QUANTIZED),
                        help="of float32, bfloat16, int8, int4 (default all)")
    parser.add_argument("--batches", type=csv_list(positive), default=[1, 8], help="batch sizes (default 1,8)")
    parser.add_argument("--reps", type=positive, default=3, help="fresh processes per row and side (the table shows medians)")
    parser.add_argument("--new_tokens", type=positive, default=128, help="tokens generated per row, at least 2")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--threads", type=positive, default=threads, help="torch threads of every worker (default: the usable CPUs)")
    parser.add_argument("--inner", type=positive, default=3, help="prefill timings per process (median)")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "llama-bench", help="cache of the checkpoints")
    parser.add_argument("--out", type=Path, help="write the table here, and every run's figures beside it with the suffix .json")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one worker may take")
    parser.add_argument("--compile_mode", choices=("default", "max-autotune"), default="default",
                        help="Llama.build's compile= of the compiled rows (default: default)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and one prefill timing per process: for the smoke test")
    cli = parser.parse_args()
    if cli.new_tokens < 2:
        parser.error(f"--new_tokens must be at least 2 (decode is timed after the first token), got {cli.new_tokens}")
    if cli.quick:
        cli.inner = 1
    return cli


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    cli = parse_args()
    try:
        tf_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("transformers is not installed: pip install transformers safetensors (the benchmark compares with it)") from None
    options = build_options()
    checkpoints = {shape: _common.checkpoint_dir(cli.work_dir, shape, cli.quick) for shape in cli.shapes}
    sample, repeats = ("64 MiB", 2) if cli.quick else ("1 GiB", 5)
    bandwidth = _common.read_bandwidth(cli.threads, nbytes=(64 << 20) if cli.quick else (1 << 30), repeats=repeats)
    jobs = schedule(cli, options)
    results: Dict[Key, List[Dict[str, Any]]] = {}
    start = time.perf_counter()
    for rep in range(cli.reps):
        # Odd repetitions run each pair in the other order, so that a drift of the machine favours neither side.
        for i, (key, variant) in enumerate(jobs if rep % 2 == 0 else swap_pairs(jobs)):
            side, shape, batch, dtype, compiled = key
            params = _common.shape_params(shape, cli.quick)
            spec = {"side": side, "ckpt": str(checkpoints[shape]), "batch": batch, "new_tokens": cli.new_tokens, "threads": cli.threads,
                    "inner": cli.inner, "vocab_size": params["vocab_size"], "dim": params["dim"], **variant}
            result = run_worker(spec, cli.timeout)
            results.setdefault(key, []).append(result)
            summary = result.get("error") or f"{result['decode_tok_s']:.1f} tok/s, prefill {result['prefill_32_s']:.3f} s"
            print(f"[{rep * len(jobs) + i + 1}/{cli.reps * len(jobs)}, {time.perf_counter() - start:.0f} s] {side} {shape} {dtype}"
                  f"{' compiled' if compiled else ''} batch {batch}: {summary}", file=sys.stderr, flush=True)

    header = (f"CPU: {_common.cpu_description()}; {cli.threads} threads; torch {torch.__version__}, transformers {tf_version}; "
              f"read bandwidth {bandwidth / 1e9:.1f} GB/s (sum over {sample} of float32, best of {repeats}). "
              f"Random weights{' (quick: tiny shapes)' if cli.quick else ''}; greedy, {cli.new_tokens} new tokens after a "
              f"{PROMPT_LENS[0]}-token prompt, tok/s summed over the batch; medians of {cli.reps} fresh processes per side, alternating.")
    text, rows = table(results, cli, options, bandwidth, header)
    meta = {"cpu": _common.cpu_description(), "threads": cli.threads, "torch": torch.__version__, "transformers": tf_version,
            "bandwidth_bytes_s": bandwidth, "new_tokens": cli.new_tokens, "reps": cli.reps, "quick": cli.quick, "build_options": options}
    _common.write_results(cli.out, text, meta, rows)


if __name__ == "__main__":
    main()
