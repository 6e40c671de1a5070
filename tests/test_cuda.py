"""CUDA: the same tokens as the CPU, eager and compiled, in float and quantized (skipped without a GPU)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List

import pytest
import torch

from llama import Llama
from tests.conftest import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = ["The llama is", "Once upon a time, a shepherd went down to the river", "A"]


def encode(generator: Llama, prompts: List[str]) -> List[List[int]]:
    return [generator.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def test_float32_on_cuda_equals_cpu(ckpt_dir: Path, generator: Llama) -> None:
    cuda = build(ckpt_dir, device="cuda")
    assert cuda.model.output.weight.device.type == "cuda"
    prompts = encode(generator, PROMPTS)
    want = generator.generate(prompts, 12, temperature=0, logprobs=True, echo=True)
    got = cuda.generate(prompts, 12, temperature=0, logprobs=True, echo=True)
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1]):
        assert g == pytest.approx(w, abs=1e-3)


def test_default_dtype_and_sampling_on_cuda(ckpt_dir: Path) -> None:
    cuda = Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), 64, 4)
    assert cuda.model.output.weight.dtype in (torch.bfloat16, torch.float16)
    first = cuda.text_completion(PROMPTS, temperature=0.8, max_gen_len=10)
    again = Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), 64, 4).text_completion(PROMPTS, temperature=0.8, max_gen_len=10)
    assert first == again  # the seeded generator lives on the GPU too


def test_compiled_decode_on_cuda_equals_eager(ckpt_dir: Path, generator: Llama) -> None:
    eager, compiled = build(ckpt_dir, device="cuda"), build(ckpt_dir, device="cuda", compile=True)
    prompts = encode(generator, PROMPTS)
    assert compiled.generate(prompts, 10, temperature=0)[0] == eager.generate(prompts, 10, temperature=0)[0]


def test_compiled_generation_in_another_thread_on_cuda(ckpt_dir: Path, generator: Llama) -> None:
    """The server generates in a worker thread: CUDA graphs recorded in one thread give the same tokens in another."""
    compiled = build(ckpt_dir, device="cuda", compile=True)
    prompts = encode(generator, PROMPTS)
    want = compiled.generate(prompts, 10, temperature=0)[0]
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["tokens"] = compiled.generate(prompts, 10, temperature=0)[0]
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert outcome.get("tokens") == want, outcome.get("error")


def test_eager_decode_on_cuda_leaves_out_cudnn_attention(ckpt_dir: Path, generator: Llama) -> None:
    """cuDNN's attention builds a plan for each new shape (about 40 ms on an H100): eager decode steps, each at a new
    KV length, must not use it."""
    cuda = build(ckpt_dir, device="cuda", dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        cuda.generate(encode(generator, PROMPTS), 4, temperature=0)
    names = {event.key for event in profile.key_averages()}
    assert any("scaled_dot_product" in name for name in names), sorted(names)
    assert not any("cudnn_attention" in name for name in names), sorted(n for n in names if "attention" in n)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_on_cuda_equals_quantized_on_cpu(make_checkpoint, generator: Llama, kind: str) -> None:
    """CUDA dequantizes for each matmul, the CPU runs packed kernels: the same weights give the same logits."""
    ckpt = make_checkpoint(params=dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=64))
    tokens = torch.tensor(encode(generator, PROMPTS[1:2]))
    logits = []
    for device in ("cpu", "cuda"):
        model = build(ckpt, quantize=kind, dtype=torch.bfloat16, device=device).model
        logits.append(model.forward(tokens.to(device), 0)[0].float().cpu())
    cosine = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1)
    assert cosine.min() > 0.995, f"{kind}: per-position cosine of CPU and CUDA logits down to {cosine.min():.4f}"
