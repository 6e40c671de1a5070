"""One rank of a multi-process test: ``python tests/dist_worker.py SPEC_JSON OUT_DIR``, under torchrun or as a raw process.

SPEC_JSON holds ``{"cases": [...], "fault": {"rank": R, "at_forward": F, "how": "kill" or "hang"}}`` (``fault``
optional). Each case builds a ``Llama`` (repeated builds in one process are part of what is tested) and generates;
its keys are ``name``, ``ckpt_dir`` (or ``ckpt_dirs``, one per rank), ``prompts``, ``max_gen_len``, and optionally
``temperature`` (default 0), ``top_p``, ``seed`` plus ``seed_per_rank`` (added times the rank) and
``model_parallel_size``. Writes ``OUT_DIR/rank{RANK}.json``:
``{"rank", "world_size", "results": {name: {"tokens", "logprobs", "seed", "transport"}}, "error"}``, where ``error`` is
``{"type", "message"}`` of an exception that is then re-raised, so the exit status shows it too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from llama import Llama, distributed  # noqa: E402
from llama.model import Transformer  # noqa: E402


def fail_at_forward(at_forward: int, how: str) -> None:
    """When Transformer.forward is called for the at_forward-th time, SIGKILL this process (no cleanup, no goodbye to
    the peers) or hang it (sleep until killed)."""
    forward = Transformer.forward
    calls = 0

    def counting_forward(self: Transformer, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == at_forward:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:
                time.sleep(60)
        return forward(self, *args, **kwargs)

    Transformer.forward = counting_forward  # type: ignore[method-assign]


def run_case(case: Dict[str, Any], rank: int) -> Dict[str, Any]:
    ckpt_dir = Path(case["ckpt_dirs"][rank] if "ckpt_dirs" in case else case["ckpt_dir"])
    seed = case.get("seed", 1) + (rank * case.get("seed_per_rank", 0))
    generator = Llama.build(
        str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
        model_parallel_size=case.get("model_parallel_size"), seed=seed, device="cpu", dtype=torch.float32,
    )
    tokens, logprobs = generator.generate(
        case["prompts"], case["max_gen_len"], temperature=case.get("temperature", 0.0), top_p=case.get("top_p", 0.9), logprobs=True,
    )
    return {"tokens": tokens, "logprobs": logprobs, "seed": seed, "transport": distributed.collectives_transport()}


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # a reader never sees half a file


def main() -> None:
    spec_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    fault = spec.get("fault")
    if fault and fault["rank"] == rank:
        fail_at_forward(fault["at_forward"], fault["how"])
    report: Dict[str, Any] = {"rank": rank, "world_size": world_size, "results": {}, "error": None}
    error: Optional[BaseException] = None
    try:
        for case in spec["cases"]:
            report["results"][case["name"]] = run_case(case, rank)
    except Exception as e:
        report["error"] = {"type": type(e).__name__, "message": str(e)}
        error = e
    write_json(out_dir / f"rank{rank}.json", report)
    if error is not None:
        raise error


if __name__ == "__main__":
    main()
