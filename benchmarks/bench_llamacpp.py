"""Decode and prefill speed of this package against llama.cpp at each precision, on the same random weights, in one run.

``python benchmarks/bench_llamacpp.py [--shapes S,M,L] [--precisions bf16,int8,int4] [--reps 3] [--threads 2]
[--compile] [--pure] [--check_greedy] [--llama_cpp DIR] [--work_dir DIR] [--out table.md]``

Pairs: our bfloat16 with llama.cpp's bf16 GGUF, our int8 (``quantize="int8"``) with q8_0, our int4 with q4_0. The
llama.cpp binaries (llama-bench, llama-quantize) come from ``--llama_cpp DIR``, else from PATH, else are built once
into ``--work_dir``/llama.cpp from the sources vendored in PyPI's llama-cpp-python sdist (needs pip, cmake and a C++
compiler). Each shape's checkpoint (bench_generate's) is converted once to GGUF: ``python -m llama.convert --to hf``,
llama.cpp's ``convert_hf_to_gguf.py --outtype bf16`` (needs numpy, sentencepiece, pyyaml, tqdm, requests), then
``llama-quantize``. Every measurement is a fresh process, ours and llama.cpp's alternating, ``--reps`` times; the
table shows medians, and each side's share of the read-bandwidth bound measured in the same run. Where llama-bench
crashes with its repacked weights (its default; this build does so on S in q8_0/q4_0), it is rerun with ``--repack 0``
and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import bench_generate  # noqa: E402

ROOT = bench_generate.ROOT
TOOLS = ("llama-bench", "llama-quantize")
EXTRA_TOOLS = ("llama-simple",)  # built alongside for the greedy check; optional when binaries are given
# Our precision -> (llama.cpp's GGUF type, our worker's float dtype, our worker's quantize=).
PRECISIONS: Dict[str, Tuple[str, str, Optional[str]]] = {
    "bf16": ("bf16", "bfloat16", None),
    "int8": ("q8_0", "bfloat16", "int8"),
    "int4": ("q4_0", "bfloat16", "int4"),
}
DECODE_DEPTH = bench_generate.PROMPT_LENS[0]  # llama.cpp's decode runs after this many tokens of context, as ours does
PREFILL = 128
SDIST = "llama-cpp-python"


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp: find or build the binaries.


def find_tools(llama_cpp: Optional[Path], cache: Path, jobs: int = 2) -> Dict[str, Path]:
    """Paths of llama-bench and llama-quantize (and llama-simple where present): from ``llama_cpp``, PATH or the cache."""
    if llama_cpp is not None:
        found = {tool: _in_dir(llama_cpp, tool) for tool in TOOLS + EXTRA_TOOLS}
        missing = [tool for tool in TOOLS if found[tool] is None]
        if missing:
            raise FileNotFoundError(f"--llama_cpp {llama_cpp}: no {', '.join(missing)} in it or in its bin/ or build/bin/; "
                                    "pass the folder holding llama.cpp's built binaries")
        return {tool: path for tool, path in found.items() if path is not None}
    on_path = {tool: shutil.which(tool) for tool in TOOLS + EXTRA_TOOLS}
    if all(on_path[tool] for tool in TOOLS):
        return {tool: Path(path) for tool, path in on_path.items() if path}
    cached = {tool: _in_dir(cache, tool) for tool in TOOLS + EXTRA_TOOLS}
    if all(cached[tool] for tool in TOOLS):
        return {tool: path for tool, path in cached.items() if path is not None}
    build_llama_cpp(cache, jobs)
    return find_tools(cache, cache)


def _in_dir(folder: Path, tool: str) -> Optional[Path]:
    for sub in ("", "bin", "build/bin"):
        path = folder / sub / tool
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def llama_cpp_sources(cache: Path) -> Path:
    """``cache/src``: llama.cpp as vendored in llama-cpp-python's sdist (downloaded with pip once)."""
    src = cache / "src"
    if (src / "CMakeLists.txt").is_file() and (src / "convert_hf_to_gguf.py").is_file():
        return src
    download = cache / "sdist"
    if not list(download.glob("llama_cpp_python-*.tar.gz")):
        download.mkdir(parents=True, exist_ok=True)
        print(f"downloading the {SDIST} sdist into {download}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(download), SDIST], check=True)
    archive = sorted(download.glob("llama_cpp_python-*.tar.gz"))[-1]
    tmp = cache / f".src.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for member in members:
            member.name = member.name[len(prefix) :]
        tar.extractall(tmp, members=[m for m in members if m.name], filter="data")
    if not (tmp / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"{archive}: no vendor/llama.cpp/CMakeLists.txt inside; expected llama-cpp-python's sdist")
    shutil.rmtree(src, ignore_errors=True)
    os.replace(tmp, src)
    return src


def build_llama_cpp(cache: Path, jobs: int = 2) -> None:
    """Build llama-bench, llama-quantize and llama-simple natively (``-DGGML_NATIVE=ON``) into ``cache/bin``."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not on PATH: install it, or pass --llama_cpp DIR with llama.cpp's built binaries")
    src = llama_cpp_sources(cache)
    build = cache / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama.cpp in {build} with {jobs} jobs (minutes)", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS, *EXTRA_TOOLS], check=True)
    (cache / "bin").mkdir(exist_ok=True)
    for tool in TOOLS + EXTRA_TOOLS:
        shutil.copy2(build / "bin" / tool, cache / "bin" / tool)


def converter_script(llama_cpp: Optional[Path], cache: Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``: in ``--llama_cpp DIR`` (a llama.cpp checkout) or the cached sources."""
    for folder in [llama_cpp, *llama_cpp.parents[:2]] if llama_cpp is not None else []:  # DIR, or DIR is build/bin
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder / "convert_hf_to_gguf.py"
    return llama_cpp_sources(cache) / "convert_hf_to_gguf.py"


# ---------------------------------------------------------------------------------------------------------------
# GGUF files of a shape's checkpoint, cached beside it.


def gguf_files(ckpt: Path, types: Sequence[str], tools: Dict[str, Path], convert: Path, pure: bool) -> Dict[str, Path]:
    """``ckpt/gguf/model-<type>.gguf`` of each type (bf16 converted from our checkpoint, the others quantized from it)."""
    folder = ckpt / "gguf"
    folder.mkdir(exist_ok=True)
    bf16 = folder / "model-bf16.gguf"
    if not bf16.is_file():
        with tempfile.TemporaryDirectory(dir=ckpt, prefix=".hf-") as tmp:
            hf = Path(tmp) / "hf"
            print(f"converting {ckpt.name} to GGUF", file=sys.stderr, flush=True)
            run_tool([sys.executable, "-m", "llama.convert", str(ckpt / "meta"), str(hf), "--to", "hf"], cwd=ROOT)
            partial = Path(tmp) / bf16.name
            run_tool([sys.executable, str(convert), str(hf), "--outtype", "bf16", "--outfile", str(partial)], cwd=convert.parent)
            os.replace(partial, bf16)
    files = {}
    for kind in types:
        path = folder / f"model-{kind}{'-pure' if pure and kind != 'bf16' else ''}.gguf"
        if not path.is_file():
            partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            flags = ["--pure"] if pure else []
            try:
                run_tool([str(tools["llama-quantize"]), *flags, str(bf16), str(partial), kind])
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            os.replace(partial, path)
        files[kind] = path
    return files


def run_tool(command: List[str], cwd: Optional[Path] = None) -> None:
    """Run a conversion step quietly; on failure, raise with the tail of what it printed."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-2000:]
        raise RuntimeError(f"{' '.join(command[:3])} ... failed with exit status {done.returncode}:\n{tail}")


def gguf_decode_bytes(path: Path, convert: Path) -> int:
    """Bytes one decode step reads from a GGUF file: every tensor, but of the token embedding only one row."""
    sys.path.insert(0, str(convert.parent / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embedding = tensors.get("token_embd.weight")
    if embedding is not None and "output.weight" in tensors:  # untied: the embedding is only looked up
        vocab = int(max(embedding.shape))
        total -= int(embedding.n_bytes) - int(embedding.n_bytes) // vocab
    return total


def greedy_check(tools: Dict[str, Path], convert: Path, cache: Path, prompt: str = "And God said", n: int = 24) -> bool:
    """Whether llama.cpp's greedy continuation of ``prompt`` by the bundled demo model, converted to a float32 GGUF,
    equals ours in float32 (both texts are printed)."""
    from llama import Llama
    from llama.demo import demo_checkpoint

    if "llama-simple" not in tools:
        print("greedy check skipped: no llama-simple beside llama-bench", file=sys.stderr)
        return False
    demo = demo_checkpoint()
    gguf = cache / "demo-f32.gguf"
    if not gguf.is_file():
        with tempfile.TemporaryDirectory(dir=cache, prefix=".hf-") as tmp:
            hf = Path(tmp) / "hf"
            run_tool([sys.executable, "-m", "llama.convert", str(demo), str(hf), "--to", "hf"], cwd=ROOT)
            run_tool([sys.executable, str(convert), str(hf), "--outtype", "f32", "--outfile", str(Path(tmp) / gguf.name)], cwd=convert.parent)
            os.replace(Path(tmp) / gguf.name, gguf)
    done = subprocess.run([str(tools["llama-simple"]), "-m", str(gguf), "-n", str(n), prompt], capture_output=True, text=True,
                          errors="replace", timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"llama-simple failed with exit status {done.returncode}:\n{done.stderr[-2000:]}")
    theirs = done.stdout.strip().removeprefix("<s>").strip()  # llama-simple prints the prompt's tokens, BOS included
    llama = Llama.build(str(demo), str(demo / "tokenizer.model"), 64, 1, device="cpu", dtype="float32")
    ours = llama.text_completion([prompt], temperature=0.0, max_gen_len=n, echo=True)[0]["generation"]
    same = " ".join(theirs.split()) == " ".join(ours.split())
    print(f"greedy check ({n} tokens, float32, demo model): {'same text' if same else 'DIFFERENT'}\n  ours:      {ours!r}\n"
          f"  llama.cpp: {theirs!r}", file=sys.stderr, flush=True)
    return same


# ---------------------------------------------------------------------------------------------------------------
# One llama.cpp measurement: two llama-bench processes, prefill of 128 tokens and decode after 32 tokens of context.


def run_llama_bench(bench: Path, gguf: Path, threads: int, new_tokens: int, timeout: float) -> Dict[str, Any]:
    """llama.cpp's figures in bench_generate's units (decode_tok_s, steps_s, prefill_128_s), or {"error": ...}."""
    common = [str(bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    tests = {"prefill": ["-p", str(PREFILL), "-n", "0"], "decode": ["-p", "0", "-n", str(new_tokens), "-d", str(DECODE_DEPTH)]}
    found: Dict[str, Dict[str, Any]] = {}
    repack_crashed = []
    for name, args in tests.items():
        try:
            done = subprocess.run(common + args, capture_output=True, text=True, errors="replace", timeout=timeout)
            if done.returncode < 0:
                # This build's repacked (AMX / interleaved) kernels crash on some shapes (S in q8_0/q4_0 here): retry
                # without them, and say so in the table.
                repack_crashed.append(f"{name}: signal {-done.returncode}")
                done = subprocess.run(common + args + ["--repack", "0"], capture_output=True, text=True, errors="replace",
                                      timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"llama-bench {name} timed out after {timeout:.0f} s"}
        try:
            records = json.loads(done.stdout)
            found[name] = records[0]
        except (json.JSONDecodeError, IndexError, KeyError):
            print(done.stderr[-3000:], file=sys.stderr)
            last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            return {"error": f"llama-bench {name}: {last[0][:200]}"}
    decode = float(found["decode"]["avg_ts"])
    return {"decode_tok_s": decode, "steps_s": decode, "prefill_128_s": PREFILL / float(found["prefill"]["avg_ts"]),
            "build": f"{found['decode'].get('build_commit', '?')} ({found['decode'].get('build_number', '?')})",
            "cpu_info": found["decode"].get("cpu_info", ""), "flash_attn": found["decode"].get("flash_attn"),
            "repack_crashed": repack_crashed}


# ---------------------------------------------------------------------------------------------------------------
# Driver.

Key = Tuple[str, str, str, bool]  # (side, shape, precision, compiled)
COLUMNS = ["shape", "precision (ours / llama.cpp)", "ours decode tok/s", "llama.cpp decode tok/s", "ratio", "ours % of bound",
           "llama.cpp % of bound", "bound tok/s ours / llama.cpp", "prefill 128 tok/s ours / llama.cpp"]


def ours_variants(precision: str, options: Dict[str, bool], compile_mode: Optional[str]) -> List[Dict[str, Any]]:
    """Our runs of one precision (bench_generate's: eager, and compiled in compile_mode where supported and asked for)."""
    float_dtype, quantize = PRECISIONS[precision][1:]
    variants = bench_generate.ours_variants(quantize or float_dtype, options, compile_mode or "default")
    return [v for v in variants if compile_mode or not v["compile"]]


def schedule(cli: argparse.Namespace, options: Dict[str, bool]) -> List[List[Tuple[Key, Dict[str, Any]]]]:
    """Groups of launches, one per shape and precision: our runs then llama.cpp's (odd repetitions reverse each group)."""
    groups = []
    for shape in cli.shapes:
        for precision in cli.precisions:
            group = [(("ours", shape, precision, v["compile"]), v) for v in ours_variants(precision, options, cli.compile)]
            groups.append(group + [(("llama.cpp", shape, precision, False), {})])
    return groups


def row_cells(ours: Dict[str, float], theirs: Dict[str, float], bandwidth: float) -> List[str]:
    """The cells after shape and precision, from both sides' medians."""
    fmt = bench_generate.fmt
    bounds = [bandwidth / side["weight_bytes"] if side["weight_bytes"] > 0 else math.nan for side in (ours, theirs)]
    shares = [100 * side["steps_s"] / bound for side, bound in zip((ours, theirs), bounds)]
    ratio = ours["decode_tok_s"] / theirs["decode_tok_s"]
    prefill = [PREFILL / side["prefill_128_s"] for side in (ours, theirs)]
    return [fmt(ours["decode_tok_s"], 1), fmt(theirs["decode_tok_s"], 1), "-" if math.isnan(ratio) else f"{fmt(ratio)}x",
            *["-" if math.isnan(s) else f"{fmt(s, 0)}%" for s in shares], " / ".join(fmt(b, 1) for b in bounds),
            " / ".join(fmt(p, 1) for p in prefill)]


def table(results: Dict[Key, List[Dict[str, Any]]], cli: argparse.Namespace, options: Dict[str, bool], bandwidth: float,
          header: str) -> Tuple[str, List[Dict[str, Any]]]:
    """The markdown table (header line, rows, notes) and one summary per row."""
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes, rows = [], []
    for shape in cli.shapes:
        for precision in cli.precisions:
            theirs_runs = results.get(("llama.cpp", shape, precision, False), [])
            theirs = bench_generate.medians(theirs_runs)
            for variant in ours_variants(precision, options, cli.compile) or [None]:
                compiled = bool(variant and variant["compile"])
                label = f"{precision}{bench_generate.compiled_label(cli.compile) if compiled else ''} / {PRECISIONS[precision][0]}"
                if variant is None:
                    lines.append(f"| {shape} | {label} | n/a | {bench_generate.fmt(theirs['decode_tok_s'], 1)} | "
                                 + " | ".join(["-"] * (len(COLUMNS) - 4)) + " |")
                    notes.append(f"- {shape} {precision}: this version's `Llama.build` has no `quantize=` option.")
                    continue
                ours_runs = results.get(("ours", shape, precision, compiled), [])
                ours = bench_generate.medians(ours_runs)
                lines.append(f"| {shape} | {label} | " + " | ".join(row_cells(ours, theirs, bandwidth)) + " |")
                errors = [f"{side}: {run['error']}" for side, runs in (("ours", ours_runs), ("llama.cpp", theirs_runs))
                          for run in runs if "error" in run]
                if errors:
                    notes.append(f"- {shape} {label}: {len(errors)} failed run(s), first: {errors[0]}")
                crashed = [c for run in theirs_runs for c in run.get("repack_crashed", [])]
                if crashed and not compiled:
                    notes.append(f"- {shape} {label}: llama-bench crashed with its default --repack 1 ({crashed[0]}); "
                                 "llama.cpp's figures are with --repack 0")
                rows.append({"shape": shape, "precision": precision, "llama_cpp_type": PRECISIONS[precision][0], "compile": compiled,
                             "ours": ours, "llama.cpp": theirs, "errors": errors, "runs": {"ours": ours_runs, "llama.cpp": theirs_runs}})
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n", rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    csv_list, positive = bench_generate.csv_list, bench_generate.positive
    parser.add_argument("--shapes", type=csv_list(str, list(_common.SHAPES)), default=["S", "M", "L"], help="of S, M, L (default all)")
    parser.add_argument("--precisions", type=csv_list(str, list(PRECISIONS)), default=list(PRECISIONS),
                        help="of bf16 (llama.cpp bf16), int8 (q8_0), int4 (q4_0); default all")
    parser.add_argument("--reps", type=positive, default=3, help="fresh processes per row and side (the table shows medians)")
    parser.add_argument("--threads", type=positive, default=2, help="threads of both sides (default 2)")
    parser.add_argument("--new_tokens", type=positive, default=128, help="tokens decoded per run, at least 2")
    parser.add_argument("--inner", type=positive, default=3, help="our prefill timings per process (median)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=("default", "max-autotune"),
                        help="also run ours with Llama.build(compile=MODE), where it exists (default mode: default)")
    parser.add_argument("--pure", action="store_true", help="llama-quantize --pure: every tensor in q8_0/q4_0 (default: "
                        "llama.cpp's own mix, which may keep output.weight at a higher precision)")
    parser.add_argument("--llama_cpp", type=Path, help="folder with llama-bench and llama-quantize (default: PATH, else built "
                        "once into WORK_DIR/llama.cpp)")
    parser.add_argument("--check_greedy", action="store_true", help="first compare greedy text of the bundled demo model "
                        "(float32) with llama.cpp's llama-simple on its GGUF conversion")
    parser.add_argument("--build_jobs", type=positive, default=2, help="parallel jobs when building llama.cpp")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "llama-bench",
                        help="cache of the checkpoints, GGUF files and llama.cpp build")
    parser.add_argument("--out", type=Path, help="write the table here, and every run's figures beside it with the suffix .json")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one worker may take")
    cli = parser.parse_args()
    if cli.new_tokens < 2:
        parser.error(f"--new_tokens must be at least 2 (decode is timed after the first token), got {cli.new_tokens}")
    if cli.llama_cpp is not None and not cli.llama_cpp.is_dir():
        parser.error(f"--llama_cpp {cli.llama_cpp}: not a folder; pass the folder holding llama-bench and llama-quantize")
    return cli


def main() -> None:
    cli = parse_args()
    cache = cli.work_dir / "llama.cpp"
    tools = find_tools(cli.llama_cpp, cache, cli.build_jobs)
    if cli.llama_cpp is None and "llama-quantize" in tools and tools["llama-quantize"].parent != cache / "bin":
        cli.llama_cpp = tools["llama-quantize"].parent  # from PATH: its convert_hf_to_gguf.py may sit beside it
    convert = converter_script(cli.llama_cpp, cache)
    if cli.check_greedy:
        greedy_check(tools, convert, cache)
    options = bench_generate.build_options()
    checkpoints = {shape: _common.checkpoint_dir(cli.work_dir, shape, False) for shape in cli.shapes}
    types = [PRECISIONS[p][0] for p in cli.precisions]
    ggufs = {shape: gguf_files(ckpt, types, tools, convert, cli.pure) for shape, ckpt in checkpoints.items()}
    gguf_bytes = {(shape, kind): gguf_decode_bytes(path, convert) for shape, files in ggufs.items() for kind, path in files.items()}

    bandwidths = [_common.read_bandwidth(cli.threads)]
    groups = schedule(cli, options)
    total = cli.reps * sum(len(group) for group in groups)
    results: Dict[Key, List[Dict[str, Any]]] = {}
    start, done = time.perf_counter(), 0
    for rep in range(cli.reps):
        for group in groups:
            # Odd repetitions run each group in the other order, so that a drift of the machine favours neither side.
            for key, variant in group if rep % 2 == 0 else group[::-1]:
                side, shape, precision, compiled = key
                kind = PRECISIONS[precision][0]
                if side == "llama.cpp":
                    result = run_llama_bench(tools["llama-bench"], ggufs[shape][kind], cli.threads, cli.new_tokens, cli.timeout)
                    result.setdefault("weight_bytes", gguf_bytes[(shape, kind)])
                else:
                    params = _common.SHAPES[shape]
                    spec = {"side": "ours", "ckpt": str(checkpoints[shape]), "batch": 1, "new_tokens": cli.new_tokens,
                            "threads": cli.threads, "inner": cli.inner, "vocab_size": params["vocab_size"], "dim": params["dim"], **variant}
                    result = bench_generate.run_worker(spec, cli.timeout)
                results.setdefault(key, []).append(result)
                done += 1
                summary = result.get("error") or (f"decode {result['decode_tok_s']:.1f} tok/s, "
                                                  f"prefill 128 {PREFILL / result['prefill_128_s']:.1f} tok/s")
                print(f"[{done}/{total}, {time.perf_counter() - start:.0f} s] {side} {shape} {precision}"
                      f"{' compiled' if compiled else ''}: {summary}", file=sys.stderr, flush=True)
    bandwidths.append(_common.read_bandwidth(cli.threads))
    bandwidth = max(bandwidths)  # the bound is what the machine can read; take the better of the start and the end

    build = next((run["build"] for runs in results.values() for run in runs if "build" in run), "?")
    sdists = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if tools["llama-bench"].parent == cache / "bin" and sdists:  # built from the sdist, which carries no git commit
        build = f"as vendored in {sdists[-1].name.removesuffix('.tar.gz').replace('_', '-')}"
    header = (f"CPU: {_common.cpu_description()}; {cli.threads} threads on both sides; torch {torch.__version__}, llama.cpp "
              f"{build}; read bandwidth {bandwidth / 1e9:.1f} GB/s (sum over 1 GiB of float32, best of 5; at start and end "
              f"{' and '.join(f'{b / 1e9:.1f}' for b in bandwidths)}). Random weights, batch 1, greedy: decode tok/s over "
              f"{cli.new_tokens} tokens after a {DECODE_DEPTH}-token prompt (llama-bench -n {cli.new_tokens} -d {DECODE_DEPTH}), "
              f"prefill of {PREFILL} tokens (llama-bench -p {PREFILL}); llama.cpp quantized with llama-quantize"
              f"{' --pure' if cli.pure else ''}; the bound is read bandwidth / bytes each side reads per token; medians of "
              f"{cli.reps} fresh processes per side, alternating.")
    text, rows = table(results, cli, options, bandwidth, header)
    meta = {"cpu": _common.cpu_description(), "threads": cli.threads, "torch": torch.__version__, "llama_cpp_build": build,
            "bandwidths_bytes_s": bandwidths, "new_tokens": cli.new_tokens, "reps": cli.reps, "pure": cli.pure,
            "build_options": options, "gguf_decode_bytes": {f"{s} {k}": v for (s, k), v in gguf_bytes.items()}}
    _common.write_results(cli.out, text, meta, rows)


if __name__ == "__main__":
    main()
