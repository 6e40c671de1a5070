"""Smoke test of benchmarks/bench_generate.py at its --quick tiny size: it runs, and its table has the promised shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parent.parent


def test_bench_generate_quick_table(tmp_path: Path) -> None:
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
