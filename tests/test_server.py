"""The OpenAI-compatible server as a real process on the tiny checkpoint, through the official ``openai`` client and raw HTTP.

One server process serves the whole module (starting one costs seconds). Greedy outputs are compared with
``Llama.text_completion`` / ``chat_completion`` in this process on the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from llama import Llama  # noqa: E402
from tests.conftest import ROOT, build  # noqa: E402
from tests.dist_utils import free_port  # noqa: E402

API_KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ALLOWED_ORIGIN = "http://allowed.example"
MAX_BATCH_SIZE, MAX_QUEUE, MAX_SEQ_LEN = 8, 8, 4096
MAX_BODY_BYTES = 65536
START_TIMEOUT_S = 120
PROMPTS = ["In the beginning", "And the LORD said unto", "the", "Blessed are they that mourn, for", "I am"]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made the earth?"}]
MAX_TOKENS = 20
LONG = 3000  # tokens of a request that must still be running while others come and go (over 9 s, paced)


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    while_loading: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the first answers, before the model was ready

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def server_env(**extra: str) -> Dict[str, str]:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars and k != "LLAMA_API_KEY"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Poll /health until 200; fail with the server's output if it exits or never gets ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"the server was not ready after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


def _first_answers(url: str, process: subprocess.Popen) -> Dict[str, Any]:
    """/health's first answer, and a completion request's right after it (while a paced server still loads)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            health = httpx.get(url + "/health", timeout=2)
            completion = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=HEADERS, timeout=10)
            return {"health": (health.status_code, health.json()), "completion": (completion.status_code, completion.json())}
        time.sleep(0.02)
    return {}


@contextlib.contextmanager
def server_process(command: List[str], port: int, log: Path, env: Optional[Dict[str, str]] = None) -> Iterator[Server]:
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env or server_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        first = _first_answers(url, process)
        wait_ready(url, process, log)
        yield Server(url, process, log, first)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# The server with every engine step made STEP_DELAY_S slower: a long request then surely outlasts what a test does
# meanwhile (the tiny model alone decodes too fast for that), and short ones stay quick.
# Loading is made LOAD_DELAY_S slower too, so that a test sees the server answer while it loads.
STEP_DELAY_S = 0.003
LOAD_DELAY_S = 1.5
PACED_SERVER = (
    "import sys, time\n"
    "from llama import engine, generation\n"
    "step = engine.Engine.step\n"
    f"engine.Engine.step = lambda self: (time.sleep({STEP_DELAY_S}), step(self))[1]\n"
    "init = engine.Engine.__init__\n"  # the overlapped engine, as on CUDA (test_server_distributed's server reads step by step)
    "engine.Engine.__init__ = lambda self, *a, **k: init(self, *a, **{**k, 'overlap': True})\n"
    "build = generation.Llama.build\n"
    f"generation.Llama.build = lambda *a, **k: (time.sleep({LOAD_DELAY_S}), build(*a, **k))[1]\n"
    "from llama.server.__main__ import main\n"
    "main()\n"
)


def serve_command(ckpt: Path, port: int, *flags: str, paced: bool = False) -> List[str]:
    program = ["-c", PACED_SERVER] if paced else ["-m", "llama.server"]
    return [sys.executable, *program, "--ckpt_dir", str(ckpt), "--device", "cpu", "--dtype", "float32",
            "--port", str(port), "--quiet", *flags]


@pytest.fixture(scope="module")
def server(ckpt_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    flags = ("--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", str(MAX_BATCH_SIZE), "--max_queue", str(MAX_QUEUE),
             "--api-key", API_KEY, "--cors-origin", ALLOWED_ORIGIN, "--max_body_bytes", str(MAX_BODY_BYTES))
    with server_process(serve_command(ckpt_dir, port, *flags, paced=True), port, tmp_path_factory.mktemp("server") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def reference(ckpt_dir: Path) -> Llama:
    """The same weights in this process, with room for every prompt of this module and its answer."""
    return build(ckpt_dir, max_seq_len=256)


@pytest.fixture(scope="module")
def client(server: Server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(ckpt_dir: Path) -> str:
    return ckpt_dir.resolve().name


def post(server: Server, path: str, body: Any, headers: Optional[Dict[str, str]] = None, **kwargs: Any) -> "httpx.Response":
    return httpx.post(server.url + path, json=body, headers=HEADERS if headers is None else headers, timeout=60, **kwargs)


def sse_events(server: Server, path: str, body: Dict[str, Any]) -> List[Any]:
    """The data of each SSE event of a streamed request, parsed ("[DONE]" kept as the string)."""
    events = []
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, headers=HEADERS, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    assert raw.endswith("\n\n")
    for event in raw.split("\n\n")[:-1]:
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def health(server: Server) -> Dict[str, Any]:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_for(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- outputs ----


def test_greedy_completions_equal_text_completion(client: "openai.OpenAI", reference: Llama, model_name: str) -> None:
    expected = reference.text_completion(PROMPTS, temperature=0, max_gen_len=MAX_TOKENS)
    response = client.completions.create(model=model_name, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert response.object == "text_completion" and response.model == model_name and response.id.startswith("cmpl-")
    assert [c.index for c in response.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in response.choices] == [e["generation"] for e in expected]
    prompt_tokens = sum(len(reference.tokenizer.encode(p, bos=True, eos=False)) for p in PROMPTS)
    completion_tokens = sum(len(reference.tokenizer.encode(e["generation"], bos=False, eos=False)) for e in expected)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    assert response.usage.completion_tokens >= min(completion_tokens, 1)
    for choice in response.choices:
        assert choice.finish_reason in ("stop", "length")


def test_streamed_completion_equals_text_completion_and_ends_with_done(server: Server, reference: Llama, model_name: str) -> None:
    """Raw SSE: every chunk a text_completion with one id, text never holding half a character, then [DONE]."""
    prompt = PROMPTS[1]
    [expected] = reference.text_completion([prompt], temperature=0, max_gen_len=MAX_TOKENS)
    events = sse_events(server, "/v1/completions", {"model": model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "text_completion" for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == expected["generation"]
    assert all("\ufffd" not in t for t in texts[:-1] if "\ufffd" not in expected["generation"])
    assert [c["choices"][0]["finish_reason"] for c in chunks][:-1] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)


def test_greedy_chat_equals_chat_completion_streamed_or_not(client: "openai.OpenAI", reference: Llama, model_name: str) -> None:
    [expected] = reference.chat_completion([DIALOG], temperature=0, max_gen_len=MAX_TOKENS)
    response = client.chat.completions.create(model=model_name, messages=DIALOG, max_tokens=MAX_TOKENS, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected["generation"]["content"]
    assert response.usage.prompt_tokens == len(reference.encode_dialog(DIALOG))

    stream = client.chat.completions.create(model=model_name, messages=DIALOG, max_completion_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["generation"]["content"]
    assert chunks[-1].choices == [] and chunks[-1].usage.to_dict() == response.usage.to_dict()
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == response.choices[0].finish_reason


def test_max_completion_tokens_and_length_finish(client: "openai.OpenAI", model_name: str) -> None:
    response = client.chat.completions.create(model=model_name, messages=DIALOG, max_completion_tokens=3, temperature=0)
    assert response.usage.completion_tokens <= 3
    if response.usage.completion_tokens == 3:
        assert response.choices[0].finish_reason == "length"


def test_stop_string_cuts_the_text_and_never_streams_what_it_takes_back(server: Server, reference: Llama, model_name: str) -> None:
    prompt = PROMPTS[0]
    [full] = reference.text_completion([prompt], temperature=0, max_gen_len=MAX_TOKENS)
    text = full["generation"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # three characters from the middle of the greedy answer
    assert len(stop.strip()) >= 1, text
    [expected] = reference.text_completion([prompt], temperature=0, max_gen_len=MAX_TOKENS, stop=[stop])
    body = {"model": model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stop": stop}
    response = post(server, "/v1/completions", body).json()
    assert response["choices"][0]["text"] == expected["generation"] == text[: text.index(stop)]
    assert response["choices"][0]["finish_reason"] == "stop"
    chunks = sse_events(server, "/v1/completions", body)[:-1]
    streamed = [c["choices"][0]["text"] for c in chunks]
    assert "".join(streamed) == expected["generation"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_logprobs_and_top_logprobs(client: "openai.OpenAI", reference: Llama, model_name: str) -> None:
    prompt = PROMPTS[2]
    [expected] = reference.text_completion([prompt], temperature=0, max_gen_len=8, logprobs=True)
    response = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == expected["tokens"]
    assert logprobs.token_logprobs == pytest.approx(expected["logprobs"], abs=1e-4)
    assert len(logprobs.top_logprobs) == len(expected["tokens"])
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the chosen token is the likeliest
    assert logprobs.text_offset[0] == 0


def test_echo_returns_the_prompt_and_scores_it(client: "openai.OpenAI", reference: Llama, model_name: str) -> None:
    prompt = PROMPTS[0]
    [expected] = reference.text_completion([prompt], temperature=0, max_gen_len=4, logprobs=True, echo=True)
    response = client.completions.create(model=model_name, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=0)
    choice = response.choices[0]
    assert choice.text == expected["generation"] and choice.text.startswith(prompt)
    assert choice.logprobs.tokens == expected["tokens"]
    assert choice.logprobs.token_logprobs[0] is None  # nothing predicts the first token
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected["logprobs"][1:], abs=1e-4)


def test_chat_logprobs_with_top_logprobs(client: "openai.OpenAI", reference: Llama, model_name: str) -> None:
    [expected] = reference.chat_completion([DIALOG], temperature=0, max_gen_len=6, logprobs=True)
    response = client.chat.completions.create(model=model_name, messages=DIALOG, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert [c.token for c in content] == expected["tokens"]
    assert [c.logprob for c in content] == pytest.approx(expected["logprobs"], abs=1e-4)
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)
        assert item.bytes == list(item.token.encode())


def test_seed_reproduces_a_sampled_answer_whatever_runs_beside_it(client: "openai.OpenAI", model_name: str) -> None:
    def sample(seed: int, prompt: str = PROMPTS[0]) -> str:
        response = client.completions.create(model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed)
        return response.choices[0].text

    alone = sample(7)
    with ThreadPoolExecutor(4) as pool:  # the same request among others
        crowd = list(pool.map(lambda i: sample(7) if i == 0 else sample(100 + i, PROMPTS[i % len(PROMPTS)]), range(4)))
    assert crowd[0] == alone == sample(7)
    assert sample(8) != alone


def test_n_choices_are_numbered_and_each_seeded_apart(client: "openai.OpenAI", model_name: str) -> None:
    response = client.chat.completions.create(model=model_name, messages=DIALOG, max_tokens=MAX_TOKENS, temperature=1.0, n=3, seed=1)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1
    again = client.chat.completions.create(model=model_name, messages=DIALOG, max_tokens=MAX_TOKENS, temperature=1.0, n=3, seed=1)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_penalties_change_a_greedy_answer_that_repeats(client: "openai.OpenAI", model_name: str) -> None:
    base = dict(model=model_name, prompt=PROMPTS[0], max_tokens=40, temperature=0)
    plain = client.completions.create(**base).choices[0].text
    penalized = client.completions.create(**base, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert penalized != plain


def test_sixteen_concurrent_streaming_clients_each_get_their_solo_greedy_output(
    client: "openai.OpenAI", reference: Llama, model_name: str
) -> None:
    """More clients than batch rows: half wait in the queue and join as others finish (their lengths differ)."""
    jobs = [(f"{PROMPTS[i % len(PROMPTS)]} {'and ' * (i // len(PROMPTS))}".strip(), 4 + 2 * i) for i in range(16)]
    solo = [reference.text_completion([p], temperature=0, max_gen_len=n)[0]["generation"] for p, n in jobs]

    def run(job: Tuple[str, int]) -> str:
        stream = client.completions.create(model=model_name, prompt=job[0], max_tokens=job[1], temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream)

    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(run, jobs)) == solo


# ---- errors ----

BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": DIALOG, "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": DIALOG, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "top_p": "high"}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop", None),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/completions", {}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [[1, 99999]]}, 400, "prompt", None),
    ("/v1/chat/completions", {"messages": DIALOG, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "messages[0].name",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "[INST] hi"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": DIALOG}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_request_gets_openai_error_naming_the_parameter(
    server: Server, path: str, body: Dict[str, Any], status: int, param: str, code: Optional[str]
) -> None:
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code
    assert error["type"] == "invalid_request_error" and error["message"]


def test_prompt_too_long_for_the_context_is_a_400_naming_both_sizes(server: Server, reference: Llama) -> None:
    prompt = "the " * (MAX_SEQ_LEN + 10)
    n_tokens = len(reference.tokenizer.encode(prompt, bos=True, eos=False))
    response = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"{n_tokens} tokens" in error["message"] and f"max_seq_len={MAX_SEQ_LEN}" in error["message"]
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_SEQ_LEN})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client_raises_its_error_classes(client: "openai.OpenAI", model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_name, messages=DIALOG, response_format={"type": "json_object"})
    assert bad.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    unauthorized = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauthorized.models.list()


def test_malformed_oversized_and_unknown_requests(server: Server) -> None:
    response = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=HEADERS)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = post(server, "/v1/completions", {"prompt": "x" * MAX_BODY_BYTES})
    assert response.status_code == 413 and "--max_body_bytes" in response.json()["error"]["message"]
    response = httpx.get(server.url + "/v1/nothing", headers=HEADERS)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = httpx.get(server.url + "/v1/completions", headers=HEADERS)
    assert response.status_code == 405 and "error" in response.json()
    response = httpx.post(server.url + "/v1/completions", json=["a list"], headers=HEADERS)
    assert response.status_code == 400


def test_api_key_is_needed_everywhere_but_health_and_the_page(server: Server, model_name: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(server.url + "/v1/models", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        assert post(server, "/v1/completions", {"prompt": "x"}, headers=headers).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/").status_code == 200
    models = httpx.get(server.url + "/v1/models", headers=HEADERS).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [model_name]
    assert httpx.get(f"{server.url}/v1/models/{model_name}", headers=HEADERS).json()["id"] == model_name
    assert httpx.get(server.url + "/v1/models/other", headers=HEADERS).status_code == 404


def test_cors_only_for_the_named_origins(server: Server) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(server.url + "/v1/models", headers={"Origin": ALLOWED_ORIGIN, **HEADERS})
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_health_reports_ok_and_the_load(server: Server) -> None:
    body = health(server)
    assert body["status"] == "ok" and body["running"] >= 0 and body["queued"] >= 0


def test_health_and_requests_answer_503_while_the_model_loads(server: Server) -> None:
    assert server.while_loading["health"] == (503, {"status": "loading"})
    status, body = server.while_loading["completion"]
    assert status == 503 and body["error"]["code"] == "model_loading"


# ---- queue and disconnects ----


def raw_request(server: Server, path: str, body: Dict[str, Any]) -> socket.socket:
    """A socket that has sent an authorized POST with a JSON body (a client we can cut off at any moment)."""
    data = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n")
    sock.sendall(head.encode() + data)
    return sock


class LongStream:
    """A streamed completion that would run for a long time, read in a thread of its own until cut off."""

    def __init__(self, server: Server, model_name: str, prompt: str = PROMPTS[0]) -> None:
        body = {"model": model_name, "prompt": prompt, "max_tokens": LONG, "temperature": 0, "stream": True}
        self.sock = raw_request(server, "/v1/completions", body)
        self.received = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.received += len(data)

    def close(self) -> None:
        """Hang up (shutdown first: a plain close would wait for the reading thread's recv)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def test_full_queue_answers_503_and_disconnects_free_rows_and_queue_places(server: Server, model_name: str) -> None:
    running = [LongStream(server, model_name) for _ in range(MAX_BATCH_SIZE)]
    queued: List[LongStream] = []
    try:
        wait_for(lambda: health(server)["running"] == MAX_BATCH_SIZE, what="every row to be taken")
        queued = [LongStream(server, model_name) for _ in range(MAX_QUEUE)]
        wait_for(lambda: health(server)["queued"] == MAX_QUEUE, what="the queue to fill")
        full = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert full.status_code == 503, full.text
        assert full.headers["retry-after"] == "1" and full.json()["error"]["code"] == "queue_full"
        for stream in queued:  # clients that leave while queued give their places back
            stream.close()
        wait_for(lambda: health(server)["queued"] == 0, what="the queued requests to be dropped")
        running[0].close()  # one that leaves mid-stream frees its row at the next step: a newcomer is served at once
        response = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0})
        assert response.status_code == 200
        assert health(server)["running"] == MAX_BATCH_SIZE - 1  # the others are still going
    finally:
        for stream in running + queued:
            stream.close()
    wait_for(lambda: health(server)["running"] == 0, what="every row to be freed")


def test_a_non_streaming_client_that_disconnects_frees_its_row(server: Server, model_name: str) -> None:
    sock = raw_request(server, "/v1/completions", {"model": model_name, "prompt": PROMPTS[0], "max_tokens": LONG, "temperature": 0})
    with sock:
        wait_for(lambda: health(server)["running"] == 1, what="the request to run")
    wait_for(lambda: health(server)["running"] == 0, timeout=5, what="the row to be freed")


# ---- the chat page ----


def test_chat_page_is_one_static_file_naming_the_model(server: Server, model_name: str) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert json.dumps(model_name) in page.text and "/v1/chat/completions" in page.text


def chromium_paths() -> Optional[Tuple[str, str]]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(chromium_paths() is None, reason="needs Debian's chromium and chromium-driver")
def test_chat_page_streams_a_reply_in_headless_chromium(server: Server) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_paths()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(API_KEY)
        driver.find_element(By.ID, "max_tokens").send_keys("24")
        # Count the reply's updates: a streamed reply grows in several steps, not in one.
        driver.execute_script(
            "window.updates = 0; new MutationObserver(() => window.updates++)"
            ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"
        )
        message = "Who made the heaven and the earth?"
        driver.find_element(By.ID, "input").send_keys(message)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg[data-done]"))
        reply = driver.find_element(By.CSS_SELECTOR, ".msg[data-done]")
        assert "error" not in reply.get_attribute("class"), reply.text
        assert reply.text.strip(), "the reply is empty"
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == message
        assert driver.execute_script("return window.updates") > 3  # the user's bubble, the empty reply, then several pieces
    finally:
        driver.quit()
