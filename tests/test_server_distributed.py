"""The server over two model-parallel processes (gloo, CPU): the same outputs as one process, and a dead rank ends it cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from llama import Llama  # noqa: E402
from tests.conftest import ROOT, build  # noqa: E402
from tests.dist_utils import free_port  # noqa: E402
from tests.test_server import PACED_SERVER, server_env, wait_ready  # noqa: E402

PROMPTS = ["In the beginning", "And the LORD said unto", "the", "Blessed are they that mourn, for"]
DIALOG = [{"role": "user", "content": "Who made the earth?"}]
MAX_TOKENS = 16
# What rank 0 says, whether gloo or the shared-memory collectives saw the death first.
DEAD_PEER = r"the server stopped: rank 0: (another rank failed|rank 1 of the model-parallel group exited)"
EXIT_TIMEOUT_S = 60  # a server that outlives its dead rank by this much hangs


def server_flags(ckpt: Path, port: int) -> List[str]:
    return ["--ckpt_dir", str(ckpt), "--device", "cpu", "--dtype", "float32", "--port", str(port), "--max_seq_len", "256",
            "--max_batch_size", "4", "--quiet"]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_two_process_torchrun_server_equals_one_process(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    reference: Llama = build(make_checkpoint(), max_seq_len=256)
    expected = [e["generation"] for e in reference.text_completion(PROMPTS, temperature=0, max_gen_len=MAX_TOKENS)]
    [chat] = reference.chat_completion([DIALOG], temperature=0, max_gen_len=MAX_TOKENS)
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "llama.server", *server_flags(make_checkpoint(n_shards=2), port)]
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=server_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, log)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        model = client.models.list().data[0].id
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # all at once: the rows join and leave the batch on both ranks alike
            outputs = list(pool.map(lambda prompt: _complete(client, model, prompt), PROMPTS))
        assert outputs == expected
        response = client.chat.completions.create(model=model, messages=DIALOG, max_tokens=MAX_TOKENS, temperature=0)
        assert response.choices[0].message.content == chat["generation"]["content"]
    finally:
        stop(process)  # torchrun itself exits 1 on SIGTERM, whatever its workers did


def _complete(client: "openai.OpenAI", model: str, prompt: str) -> str:
    """A streamed greedy completion's text."""
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    return "".join(chunk.choices[0].text for chunk in stream)


def test_a_rank_that_dies_makes_the_server_answer_503_and_exit_with_a_clear_error(
    make_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """Raw processes (no torchrun, which would kill rank 0 itself): rank 0 must see the death on its own."""
    port, master_port = free_port(), free_port()
    ckpt = make_checkpoint(n_shards=2)
    processes: List[subprocess.Popen] = []
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    for rank in range(2):
        env = server_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(master_port), LLAMA_DIST_TIMEOUT="30")
        with open(logs[rank], "w") as out:  # paced: the request below is still running when rank 1 dies
            command = [sys.executable, "-c", PACED_SERVER, *server_flags(ckpt, port)]
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, processes[0], logs[0])
        answers: Dict[str, httpx.Response] = {}
        running = threading.Event()

        def long_request() -> None:
            with httpx.Client(timeout=EXIT_TIMEOUT_S) as http:
                answers["long"] = http.post(url + "/v1/completions", json={"prompt": "In the beginning", "max_tokens": 200})

        thread = threading.Thread(target=long_request, daemon=True)
        thread.start()
        while httpx.get(url + "/health", timeout=10).json().get("running") != 1:
            running.wait(0.02)
        os.kill(processes[1].pid, signal.SIGKILL)
        thread.join(EXIT_TIMEOUT_S)
        response = answers["long"]
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "server_failed" and re.match(DEAD_PEER, error["message"]), error
        processes[0].wait(EXIT_TIMEOUT_S)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = logs[0].read_text()
    assert processes[0].returncode not in (0, None), output[-4000:]
    assert re.search("llama-serve: " + DEAD_PEER, output), output[-4000:]
