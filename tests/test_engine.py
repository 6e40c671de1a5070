"""The decode engine: per-row positions, one prefill for unequal prompts, rows that leave and join between steps."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch

from llama import Llama, decode_step, engine
from llama.engine import Engine, Sampling, Sequence
from tests.conftest import build

PROMPTS = ["The llama is", "Once upon a time, a shepherd went down to the river", "A", "Bread is baked in ovens of clay"]
GREEDY = Sampling(temperature=0.0, top_p=1.0, logprobs=True)


def encode(generator: Llama, prompts: List[str]) -> List[List[int]]:
    return [generator.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def alone(generator: Llama, prompt: List[int], max_gen_len: int) -> tuple:
    tokens, logprobs = generator.generate([prompt], max_gen_len, temperature=0, logprobs=True)
    return tokens[0], logprobs[0]


def test_rows_at_their_own_positions_equal_each_row_run_alone(generator: Llama) -> None:
    """One decode step over rows at positions 3, 9 and 5 gives each row's logits as if it ran alone."""
    model = generator.model
    prompts = [p[:n] for p, n in zip(encode(generator, PROMPTS[1:] * 2), (4, 10, 6))]
    nexts = [11, 12, 13]
    want = []
    for prompt, token in zip(prompts, nexts):
        model.forward(torch.tensor([prompt]), 0)
        want.append(model.forward(torch.tensor([[token]]), len(prompt))[0, -1])
    for row, prompt in enumerate(prompts):  # the same prefixes, each in its own cache row
        model.forward(torch.tensor([prompt]), 0, rows=slice(row, row + 1))
    got = model.forward(torch.tensor([[t] for t in nexts]), torch.tensor([len(p) for p in prompts]))[:, -1]
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_unequal_prompts_are_prefilled_in_one_forward_then_one_token_per_step(generator: Llama, forward_calls: List[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generator.tokenizer, "stop_ids", frozenset({-5}))  # every row runs to max_gen_len
    prompts = encode(generator, PROMPTS)
    generator.generate(prompts, max_gen_len=6, temperature=0)
    longest = max(len(p) for p in prompts)
    assert forward_calls == [(len(prompts), longest)] + [(len(prompts), 1)] * 5


def test_a_finished_row_stops_costing_compute(generator: Llama, forward_calls: List[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = encode(generator, PROMPTS[:2])
    free_run, _ = generator.generate(prompts, max_gen_len=8, temperature=0)
    stop = free_run[0][2]  # row 0 stops at its third generated token
    assert stop not in free_run[1]
    monkeypatch.setattr(generator.tokenizer, "stop_ids", frozenset({stop}))
    forward_calls.clear()
    stopped, _ = generator.generate(prompts, max_gen_len=8, temperature=0)
    assert stopped == [free_run[0][:2], free_run[1]]
    assert [bsz for bsz, _ in forward_calls] == [2, 2, 2] + [1] * 5  # prefill, two steps for both, then row 1 alone


def test_more_prompts_than_rows_join_as_rows_free_and_equal_each_alone(ckpt_dir: Path, generator: Llama) -> None:
    small = build(ckpt_dir, max_batch_size=2)
    prompts = encode(generator, PROMPTS)
    gen_lens = [3, 9, 5, 7]
    sequences = [Sequence(p, len(p) + n, GREEDY) for p, n in zip(prompts, gen_lens)]
    Engine(small.model, {small.tokenizer.eos_id}).run(sequences)
    for sequence, prompt, n in zip(sequences, prompts, gen_lens):
        tokens, logprobs = alone(generator, prompt, n)
        assert sequence.generated == tokens
        assert sequence.logprobs[len(prompt) :] == pytest.approx(logprobs, abs=1e-5)


def test_a_sequence_joins_a_running_batch_between_steps(generator: Llama) -> None:
    prompts = encode(generator, PROMPTS[:3])
    runner = Engine(generator.model, {generator.tokenizer.eos_id})
    first, second = (Sequence(p, len(p) + 10, GREEDY) for p in prompts[:2])
    runner.add(first)
    runner.add(second)
    for _ in range(4):
        runner.step()
    late = Sequence(prompts[2], len(prompts[2]) + 10, GREEDY)
    runner.add(late)
    while runner.running or runner.waiting:
        runner.step()
    for sequence, prompt in zip((first, second, late), prompts):
        assert sequence.generated == alone(generator, prompt, 10)[0]


def test_a_cancelled_sequence_frees_its_row_for_the_others(generator: Llama) -> None:
    prompts = encode(generator, PROMPTS[:3])
    runner = Engine(generator.model, {generator.tokenizer.eos_id})
    sequences = [Sequence(p, len(p) + 8, GREEDY) for p in prompts]
    for sequence in sequences:
        runner.add(sequence)
    runner.step()
    runner.step()
    runner.cancel(sequences[0])
    assert sequences[0].finish_reason == "cancelled" and len(runner.running) == 2
    while runner.running:
        runner.step()
    for sequence, prompt in zip(sequences[1:], prompts[1:]):
        assert sequence.generated == alone(generator, prompt, 8)[0]


def test_chunked_prefill_equals_one_chunk(generator: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = encode(generator, PROMPTS)
    whole = generator.generate(prompts, 6, temperature=0, logprobs=True, echo=True)
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 3)  # prompts of 2 to 13 tokens end in different chunks
    chunked = generator.generate(prompts, 6, temperature=0, logprobs=True, echo=True)
    assert chunked[0] == whole[0]
    for got, want in zip(chunked[1], whole[1]):
        assert got == pytest.approx(want, abs=1e-5)


def test_finish_reasons(generator: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = encode(generator, PROMPTS[:2])
    free_run, _ = generator.generate(prompts, max_gen_len=6, temperature=0)
    sequences = [Sequence(p, len(p) + 6, GREEDY) for p in prompts]
    Engine(generator.model, {free_run[0][1]}).run(sequences)
    assert [s.finish_reason for s in sequences] == ["stop", "length"]
    full = Sequence(prompts[0], len(prompts[0]), GREEDY)  # no room to generate: finished without a forward
    Engine(generator.model, {0}).add(full)
    assert full.finish_reason == "length" and full.generated == []


@pytest.mark.parametrize("mode", [True, "max-autotune"])
def test_compiled_decode_step_equals_eager(ckpt_dir: Path, generator: Llama, monkeypatch: pytest.MonkeyPatch, mode: object) -> None:
    """One compilation serves every batch size (rows leave as they finish); tokens and logprobs equal eager decoding."""
    compiled = build(ckpt_dir, compile=mode)
    prompts = encode(generator, PROMPTS)
    free_run, _ = generator.generate(prompts, 10, temperature=0)
    monkeypatch.setattr(generator.tokenizer, "stop_ids", frozenset({free_run[0][2]}))  # row 0 leaves early: the batch shrinks
    monkeypatch.setattr(compiled.tokenizer, "stop_ids", frozenset({free_run[0][2]}))
    want = generator.generate(prompts, 10, temperature=0, logprobs=True)
    got = compiled.generate(prompts, 10, temperature=0, logprobs=True)
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1]):
        assert g == pytest.approx(w, abs=1e-4)
    assert compiled.generate(prompts[:1], 10, temperature=0)[0] == generator.generate(prompts[:1], 10, temperature=0)[0]


def test_compiled_step_attends_over_a_growing_span_without_recompiling(ckpt_dir: Path, generator: Llama) -> None:
    """The compiled step reads a span of the cache that doubles as the context grows (256, then 512 positions), not
    the whole cache: one compilation serves every span, and tokens and logprobs equal eager decoding across the change."""
    eager, compiled = build(ckpt_dir, max_seq_len=600, max_batch_size=1), build(ckpt_dir, max_seq_len=600, max_batch_size=1, compile=True)
    prompt = encode(generator, PROMPTS[:1])
    for llama in (eager, compiled):
        llama.tokenizer.stop_ids = frozenset()  # run the whole length
    compiled.generate(prompt, 8, temperature=0)  # compiles, at span 256
    want = eager.generate(prompt, 320, temperature=0, logprobs=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate(prompt, 320, temperature=0, logprobs=True)  # past 256 positions: span 512
    assert got[0] == want[0]
    assert got[1][0] == pytest.approx(want[1][0], abs=1e-4)
    assert decode_step.attention_span(257, 600) == 512 and decode_step.attention_span(513, 600) == 600 and decode_step.attention_span(9, 64) == 64


@pytest.mark.parametrize("mode", ["yes", 1, "reduce-overhead"])
def test_compile_takes_a_bool_or_a_mode(ckpt_dir: Path, mode: object) -> None:
    with pytest.raises(ValueError, match=r"compile must be True, False or one of 'default', 'max-autotune', got"):
        build(ckpt_dir, compile=mode)


def test_rows_that_sample_differently_share_a_batch(generator: Llama) -> None:
    """A sampled row beside a greedy one: each group draws on its own, and the greedy row is unchanged."""
    prompts = encode(generator, PROMPTS[:2])
    greedy = Sequence(prompts[0], len(prompts[0]) + 8, GREEDY)
    sampled = Sequence(prompts[1], len(prompts[1]) + 8, Sampling(temperature=1.0, top_p=0.9, logprobs=True))
    Engine(generator.model, {generator.tokenizer.eos_id}, torch.Generator().manual_seed(0)).run([greedy, sampled])
    assert greedy.generated == alone(generator, prompts[0], 8)[0]
    assert len(sampled.logprobs) == len(sampled.tokens) and all(lp <= 0 for lp in sampled.logprobs)
