"""One rank of a multi-process test: ``python tests/dist_worker.py SPEC_JSON OUT_DIR``, under torchrun or as a raw process.

SPEC_JSON holds ``{"cases": [...], "fault": FAULT}`` (``fault`` optional). Each case builds a ``Llama`` (repeated builds
in one process are part of what is tested) and generates; its keys are ``name``, ``ckpt_dir`` (or ``ckpt_dirs``, one
per rank), ``prompts`` (or ``prompts_per_rank``), ``max_gen_len``, and optionally ``temperature`` (default 0; or
``temperature_per_rank``),
``top_p``, ``seed`` plus ``seed_per_rank`` (added times the rank), ``model_parallel_size``, ``compile``, ``keep`` (a name to keep the
Llama under), ``reuse`` (generate with the Llama kept under that name instead of building), ``fault`` (a FAULT for
this case only), ``shm_reserve_fails_on_rank`` (that rank cannot reserve the shared-memory segment: ENOSPC) and
``expect_error`` (record the exception in the result and go on with the next case).
A FAULT is ``{"rank": R, "how": "kill" | "hang" | "pause", "at_forward": F}``: at rank R's F-th Transformer.forward,
SIGKILL the process, hang it, or pause it for ``seconds`` (default 1); with ``"at": "shm_attach"`` instead of
``at_forward``, it happens when rank R opens the shared-memory segment (and OUT_DIR/segment names the segment's path).
Writes ``OUT_DIR/rank{RANK}.json``: ``{"rank", "world_size", "pid", "results": {name: {"tokens", "logprobs", "seed",
"transport", "warnings"} or {"error", "seconds", "warnings"}}, "error"}``, where ``error`` is ``{"type", "message"}``
of an exception that is then re-raised, so the exit status shows it too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from llama import Llama, distributed, shm_group  # noqa: E402
from llama.model import Transformer  # noqa: E402


def strike(how: str, seconds: float = 1.0) -> None:
    """SIGKILL this process (no cleanup, no goodbye to the peers), hang it (sleep until killed) or pause it."""
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "pause":
        time.sleep(seconds)
        return
    while True:
        time.sleep(60)


@contextlib.contextmanager
def fault_injected(fault: Optional[Dict[str, Any]], rank: int, out_dir: Path) -> Iterator[None]:
    """Within the block, strike as fault says if it names this rank; the counts start at the block's start."""
    if not fault or fault["rank"] != rank:
        yield
        return
    how, seconds = fault["how"], fault.get("seconds", 1.0)
    if fault.get("at") == "shm_attach":
        cls, attribute = shm_group.SharedMemoryGroup, "__init__"
        attach = cls.__init__

        def replacement(self: Any, path: Path, *args: Any, **kwargs: Any) -> None:
            (out_dir / "segment").write_text(str(path))
            strike(how, seconds)
            attach(self, path, *args, **kwargs)
    else:
        cls, attribute = Transformer, "forward"
        forward = Transformer.forward
        calls = 0

        def replacement(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[misc]
            nonlocal calls
            calls += 1
            if calls == fault["at_forward"]:
                strike(how, seconds)
            return forward(self, *args, **kwargs)

    original = getattr(cls, attribute)
    setattr(cls, attribute, replacement)
    try:
        yield
    finally:
        setattr(cls, attribute, original)


@contextlib.contextmanager
def no_room_in_shm(enabled: bool) -> Iterator[None]:
    """Make reserving a file's space fail as on a full /dev/shm (ENOSPC), if enabled."""
    if not enabled:
        yield
        return

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    posix_fallocate = getattr(os, "posix_fallocate", None)
    os.posix_fallocate = full  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if posix_fallocate is None:
            del os.posix_fallocate
        else:
            os.posix_fallocate = posix_fallocate  # type: ignore[attr-defined]


class Recorder(logging.Handler):
    """Keeps the messages of the warnings the package logs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_case(case: Dict[str, Any], rank: int, kept: Dict[str, Llama], out_dir: Path) -> Dict[str, Any]:
    ckpt_dir = Path(case["ckpt_dirs"][rank] if "ckpt_dirs" in case else case["ckpt_dir"])
    seed = case.get("seed", 1) + (rank * case.get("seed_per_rank", 0))
    prompts = case["prompts_per_rank"][rank] if "prompts_per_rank" in case else case["prompts"]
    temperature = case["temperature_per_rank"][rank] if "temperature_per_rank" in case else case.get("temperature", 0.0)
    with fault_injected(case.get("fault"), rank, out_dir), no_room_in_shm(case.get("shm_reserve_fails_on_rank") == rank):
        if "reuse" in case:
            generator = kept[case["reuse"]]
        else:
            generator = Llama.build(
                str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
                model_parallel_size=case.get("model_parallel_size"), seed=seed, device="cpu", dtype=torch.float32,
                compile=case.get("compile", False),
            )
        if "keep" in case:
            kept[case["keep"]] = generator
        tokens, logprobs = generator.generate(
            prompts, case["max_gen_len"], temperature=temperature, top_p=case.get("top_p", 0.9), logprobs=True,
        )
    return {"tokens": tokens, "logprobs": logprobs, "seed": seed, "transport": distributed.collectives_transport(generator.group)}


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # a reader never sees half a file


def main() -> None:
    spec_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    recorder = Recorder()
    logging.basicConfig(level=logging.WARNING)  # warnings go to stderr as well
    logging.getLogger("llama").addHandler(recorder)
    report: Dict[str, Any] = {"rank": rank, "world_size": world_size, "pid": os.getpid(), "results": {}, "error": None}
    kept: Dict[str, Llama] = {}
    error: Optional[BaseException] = None
    try:
        with fault_injected(spec.get("fault"), rank, out_dir):
            for case in spec["cases"]:
                del recorder.messages[:]
                start = time.monotonic()
                try:
                    result = run_case(case, rank, kept, out_dir)
                except Exception as e:
                    if not case.get("expect_error"):
                        raise
                    result = {"error": {"type": type(e).__name__, "message": str(e)}, "seconds": time.monotonic() - start}
                report["results"][case["name"]] = {**result, "warnings": list(recorder.messages)}
    except Exception as e:
        report["error"] = {"type": type(e).__name__, "message": str(e)}
        error = e
    write_json(out_dir / f"rank{rank}.json", report)
    if error is not None:
        raise error


if __name__ == "__main__":
    main()
