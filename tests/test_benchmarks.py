"""Smoke test of benchmarks/bench_generate.py at its --quick tiny size: it runs, and its table has the promised shape.
And benchmarks/bench_llamacpp.py's reading of llama-bench, against a stand-in script (nothing is built)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_generate_quick_table(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    out = tmp_path / "table.md"
    command = [sys.executable, "benchmarks/bench_generate.py", "--quick", "--shapes", "S", "--dtypes", "float32,int4", "--batches", "1",
               "--reps", "1", "--new_tokens", "4", "--threads", "1", "--work_dir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    lines = out.read_text().splitlines()
    assert lines[0].startswith("CPU: ") and "GB/s" in lines[0] and "torch " in lines[0]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert [cell.strip() for cell in header[:6]] == ["shape", "dtype", "batch", "ours tok/s", "transformers tok/s", "ratio"]
    assert all(len(row) == len(header) for row in body)
    labels = [(row[0].strip(), row[1].strip().split()[0], row[2].strip()) for row in body]
    report = json.loads(out.with_suffix(".json").read_text())
    options = report["meta"]["build_options"]
    variants = 2 if options["compile"] else 1  # eager, and compiled where Llama.build takes compile=
    expected = [("S", "float32", "1")] * variants + [("S", "int4", "1")] * (variants if options["quantize"] else 1)
    assert labels == expected

    fp32 = body[0]
    assert float(fp32[3]) > 0 and float(fp32[4]) > 0 and fp32[5].strip().endswith("x")
    first = report["rows"][0]
    # Same weights on both sides: float32 greedy decoding of the tiny model agrees token for token with transformers.
    assert first["greedy_agree"] == 4 and not first["errors"]
    if not report["meta"]["build_options"]["quantize"]:
        assert body[-1][3].strip() == "n/a"


# A stand-in llama-bench: answers only the two tests bench_llamacpp asks for, in llama-bench's JSON output.
FAKE_LLAMA_BENCH = """#!{python}
import json, sys
argv = sys.argv[1:]
arg = lambda flag, default: argv[argv.index(flag) + 1] if flag in argv else default
test = (arg("-p", "512"), arg("-n", "128"), arg("-d", "0"), arg("-t", "?"), arg("-r", "5"), arg("-o", "md"))
speeds = {{("128", "0", "0", "3", "1", "json"): 400.0, ("0", "128", "32", "3", "1", "json"): 50.0}}
if test not in speeds:
    sys.exit(f"unexpected test {{test}}")
print(json.dumps([{{"build_commit": "abc", "build_number": 1, "n_prompt": int(test[0]), "n_gen": int(test[1]),
                   "n_depth": int(test[2]), "avg_ts": speeds[test]}}]))
"""


def _bench_llamacpp():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_llamacpp
    finally:
        sys.path.pop(0)
    return bench_llamacpp


def test_bench_llamacpp_reads_llama_bench(tmp_path: Path) -> None:
    """Decode is read from a run of 128 tokens after 32 of context, prefill from a run of 128 prompt tokens."""
    bench_llamacpp = _bench_llamacpp()
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    result = bench_llamacpp.run_llama_bench(fake, tmp_path / "model.gguf", threads=3, new_tokens=128, timeout=60)
    assert result["decode_tok_s"] == 50.0 and result["steps_s"] == 50.0
    assert result["prefill_128_s"] == pytest.approx(128 / 400.0)
    assert result["build"] == "abc (1)"
    failed = bench_llamacpp.run_llama_bench(fake, tmp_path / "model.gguf", threads=3, new_tokens=64, timeout=60)
    assert "unexpected test" in failed["error"]


def test_bench_llamacpp_names_missing_tools(tmp_path: Path) -> None:
    bench_llamacpp = _bench_llamacpp()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-bench").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "llama-bench").chmod(0o755)
    with pytest.raises(FileNotFoundError, match=r"--llama_cpp .*: no llama-quantize in it"):
        bench_llamacpp.find_tools(tmp_path, tmp_path / "cache")


def test_bench_cuda_table_relates_each_variant_to_transformers() -> None:
    """The GPU benchmark's table (its workers need CUDA): ratios to transformers' row and the share of the bound."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import bench_cuda

    def run(tok_s: float, tokens: list, weight_bytes: int = 0) -> dict:
        batch = {"decode_tok_s": tok_s, "steps_s": tok_s, "prefill_32_s": 0.01, "prefill_128_s": 0.02, "ttft_s": 0.1, "tokens": tokens}
        return {"batches": {"1": batch}, "peak_gpu_mb": 100.0, **({"weight_bytes": weight_bytes} if weight_bytes else {})}

    results = {"ours": [run(300.0, [5, 6, 7], weight_bytes=10**9)], "transformers": [run(100.0, [5, 6, 9])], "ours compiled": [{"error": "boom"}]}
    text = bench_cuda.table(results, argparse.Namespace(batches=[1], new_tokens=3), bandwidth=2e12)
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| 1 "))}
    assert rows["ours"][2:5] == ["300", "3.00x", "15% (2000)"]
    assert rows["transformers"][3] == "1.00x" and rows["transformers"][8] == "2/3"
    assert rows["ours compiled"][2] == "-" and "- ours compiled: boom" in text
