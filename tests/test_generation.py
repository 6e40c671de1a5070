"""Llama.generate / text_completion against Hugging Face's Llama on the same weights, and its edge cases."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import pytest
import torch
from transformers import LlamaForCausalLM

from llama import Llama, ModelArgs
from llama.checkpoint import load_checkpoint
from tests.conftest import build
from tests.hf_oracle import hf_model

PROMPTS = ["The llama is", "Once upon a time, a shepherd", "A"]


@pytest.fixture(scope="module")
def oracle(ckpt_dir: Path, generator: Llama) -> LlamaForCausalLM:
    args = ModelArgs.from_params(dict(generator.model.params.__dict__))
    return hf_model(args, load_checkpoint(ckpt_dir, args, 1, 0))


def hf_greedy(model: LlamaForCausalLM, prompt: List[int], max_gen_len: int, eos_id: int) -> tuple[List[int], List[float]]:
    """Greedy decoding by a full forward pass over the whole sequence at every step (no cache)."""
    tokens, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(max_gen_len):
            scores = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1], dim=-1)
            token = int(scores.argmax())
            if token == eos_id:
                break
            tokens.append(token)
            logprobs.append(float(scores[token]))
    return tokens[len(prompt) :], logprobs


def hf_prompt_logprobs(model: LlamaForCausalLM, tokens: List[int]) -> List[float]:
    """Log-likelihood of each token given the ones before it; 0.0 for the first."""
    with torch.no_grad():
        scores = torch.log_softmax(model(torch.tensor([tokens])).logits[0], dim=-1)
    return [0.0] + [float(scores[i - 1, t]) for i, t in enumerate(tokens) if i > 0]


def encode(generator: Llama, prompts: List[str]) -> List[List[int]]:
    return [generator.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def test_greedy_tokens_and_logprobs_equal_hugging_face(generator: Llama, oracle: LlamaForCausalLM) -> None:
    prompts = encode(generator, PROMPTS)  # unequal lengths: rows run inside their prompt while others generate
    tokens, logprobs = generator.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    for prompt, got_tokens, got_logprobs in zip(prompts, tokens, logprobs):
        want_tokens, want_logprobs = hf_greedy(oracle, prompt, 12, generator.tokenizer.eos_id)
        assert got_tokens == want_tokens
        assert got_logprobs == pytest.approx(want_logprobs, abs=1e-4)


def test_batch_of_unequal_prompts_equals_each_prompt_alone(generator: Llama) -> None:
    prompts = encode(generator, PROMPTS)
    batch_tokens, batch_logprobs = generator.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    for i, prompt in enumerate(prompts):
        alone_tokens, alone_logprobs = generator.generate([prompt], max_gen_len=10, temperature=0, logprobs=True)
        assert batch_tokens[i] == alone_tokens[0]
        assert batch_logprobs[i] == pytest.approx(alone_logprobs[0], abs=1e-5)


def test_more_prompts_than_max_batch_size_run_in_order(ckpt_dir: Path, generator: Llama) -> None:
    small = build(ckpt_dir, max_batch_size=2)
    prompts = encode(generator, PROMPTS + ["Bread is", "Rivers"])
    chunked, _ = small.generate(prompts, max_gen_len=6, temperature=0)
    assert chunked == [generator.generate([p], max_gen_len=6, temperature=0)[0][0] for p in prompts]


def test_empty_batch_returns_empty(generator: Llama) -> None:
    assert generator.generate([], max_gen_len=5) == ([], None)
    assert generator.text_completion([]) == []
    assert generator.chat_completion([]) == []


def test_echo_logprobs_score_the_prompt(generator: Llama, oracle: LlamaForCausalLM) -> None:
    prompt = encode(generator, ["The llama is a domesticated camelid"])[0]
    tokens, logprobs = generator.generate([prompt], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    assert tokens[0][: len(prompt)] == prompt
    assert logprobs[0] == pytest.approx(hf_prompt_logprobs(oracle, tokens[0]), abs=1e-4)


def test_max_gen_len_zero_with_echo_scores_each_token_by_its_prefix(generator: Llama, oracle: LlamaForCausalLM) -> None:
    """Meta's reference scored each token against the logits of its own position on this path."""
    prompts = encode(generator, ["Tea needs fresh water", "Trains leave"])
    tokens, logprobs = generator.generate(prompts, max_gen_len=0, logprobs=True, echo=True)
    assert tokens == prompts
    for prompt, got in zip(prompts, logprobs):
        assert got == pytest.approx(hf_prompt_logprobs(oracle, prompt), abs=1e-4)


def test_eos_stops_each_row_alone(generator: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = encode(generator, PROMPTS[:2])
    free_run, _ = generator.generate(prompts, max_gen_len=8, temperature=0)
    stop_token = free_run[0][3]  # make row 0's fourth generated token the EOS
    assert stop_token not in free_run[1], "pick prompts whose runs differ"
    monkeypatch.setattr(generator.tokenizer, "stop_ids", frozenset({stop_token}))
    stopped, _ = generator.generate(prompts, max_gen_len=8, temperature=0)
    assert stopped[0] == free_run[0][: free_run[0].index(stop_token)]
    assert stopped[1] == free_run[1]


def test_eos_inside_an_echoed_prompt_does_not_cut_it(generator: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = encode(generator, ["The llama is a domesticated camelid"])[0]
    generated, _ = generator.generate([prompt], max_gen_len=4, temperature=0)
    monkeypatch.setattr(generator.tokenizer, "stop_ids", frozenset({prompt[3]}))
    echoed, _ = generator.generate([prompt], max_gen_len=4, temperature=0, echo=True)
    assert echoed[0][: len(prompt)] == prompt
    assert prompt[3] not in generated[0], "the token chosen as EOS must not also be generated"
    assert echoed[0] == prompt + generated[0]


def test_text_completion_returns_meta_shapes(generator: Llama) -> None:
    results = generator.text_completion(PROMPTS[:2], temperature=0, max_gen_len=5, logprobs=True)
    for prompt, result in zip(PROMPTS, results):
        tokens = generator.generate(encode(generator, [prompt]), max_gen_len=5, temperature=0)[0][0]
        assert result["generation"] == generator.tokenizer.decode(tokens)
        assert result["tokens"] == [generator.tokenizer.decode([t]) for t in tokens]
        assert len(result["logprobs"]) == len(tokens) and all(lp <= 0 for lp in result["logprobs"])
    assert set(generator.text_completion(PROMPTS[:1], max_gen_len=3)[0]) == {"generation"}


def test_same_seed_gives_the_same_sample(ckpt_dir: Path) -> None:
    first = build(ckpt_dir, seed=7).text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=16)
    torch.manual_seed(12345)  # user code touching the global RNG must not change our samples
    second = build(ckpt_dir, seed=7).text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=16)
    other = build(ckpt_dir, seed=8).text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=16)
    assert first == second
    assert first != other


def test_build_twice_in_one_process(ckpt_dir: Path, generator: Llama) -> None:
    again = build(ckpt_dir)
    prompts = encode(generator, PROMPTS)
    assert again.generate(prompts, 5, temperature=0) == generator.generate(prompts, 5, temperature=0)


def test_build_after_the_process_group_was_destroyed(ckpt_dir: Path, generator: Llama) -> None:
    """A script that tears its group down and builds again gets fresh model-parallel groups, not stale ones."""
    torch.distributed.destroy_process_group()
    again = build(ckpt_dir)
    prompts = encode(generator, PROMPTS)
    assert again.generate(prompts, 5, temperature=0) == generator.generate(prompts, 5, temperature=0)


def test_generation_stops_at_max_seq_len(generator: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generator.tokenizer, "stop_ids", frozenset({-5}))  # no token ends a row early
    tokens, _ = generator.generate(encode(generator, ["A"]), max_gen_len=1000, temperature=0)
    assert len(tokens[0]) == generator.model.params.max_seq_len - 2  # BOS and "A" take the first two places


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(prompt_tokens=[[1] * 65]), ValueError, r"prompt_tokens\[0\] has 65 tokens, which exceeds max_seq_len=64"),
        (dict(prompt_tokens=[[1, 5], []]), ValueError, r"prompt_tokens\[1\] is empty"),
        (dict(prompt_tokens=[[1, 99999]]), ValueError, r"prompt_tokens\[0\] holds 99999, which is not a token id in \[0, 512\)"),
        (dict(temperature=-0.1), ValueError, r"temperature must be >= 0 \(0 is greedy\), got -0.1"),
        (dict(top_p=0.0), ValueError, r"top_p must be > 0 and <= 1, got 0.0"),
        (dict(top_p=1.5), ValueError, r"top_p must be > 0 and <= 1, got 1.5"),
        (dict(max_gen_len=-1), ValueError, r"max_gen_len must be an integer >= 0, got -1"),
    ],
)
def test_generate_rejects_bad_input(generator: Llama, kwargs: dict, error: type, message: str) -> None:
    call = dict(prompt_tokens=[[1, 5, 6]], max_gen_len=4) | kwargs
    with pytest.raises(error, match=message) as raised:
        generator.generate(**call)
    assert isinstance(raised.value, AssertionError), "callers that caught the reference's asserts keep working"


def test_text_completion_rejects_non_strings(generator: Llama) -> None:
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str, got int"):
        generator.text_completion(["fine", 42])
    with pytest.raises(TypeError, match="got a single str"):
        generator.text_completion("not a list")


def test_logprobs_are_finite_log_probabilities(generator: Llama) -> None:
    _, logprobs = generator.generate(encode(generator, PROMPTS), max_gen_len=6, temperature=0.9, logprobs=True)
    assert all(math.isfinite(x) and x <= 0 for row in logprobs for x in row)
