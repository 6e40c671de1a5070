"""What a server asks of the engine: seeds per sequence, penalties, top logprobs, prefill interleaved with decoding, cancelling."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List

import pytest
import torch

from llama import Llama
from llama.engine import Engine, Sampling, Sequence
from llama.model import Transformer
from tests.conftest import build

GREEDY = Sampling(temperature=0.0, top_p=1.0, logprobs=True)
SEEDED = Sampling(temperature=1.0, top_p=0.95, logprobs=True, seed=1234)


def encode(generator: Llama, text: str, bos: bool = True) -> List[int]:
    return generator.tokenizer.encode(text, bos=bos, eos=False)


def long_prompt(generator: Llama) -> List[int]:
    """47 tokens: six prefill chunks of 8."""
    prompt = encode(generator, "Once upon a time, a shepherd went down to the river") + encode(generator, "Bread is baked in ovens of clay", bos=False)
    assert len(prompt) == 47
    return prompt


def alone(model: Transformer, prompt: List[int], max_gen_len: int, sampling: Sampling = GREEDY) -> Sequence:
    """The sequence run by itself on a fresh engine (its generator seeded differently from every test's)."""
    sequence = Sequence(prompt, len(prompt) + max_gen_len, sampling)
    Engine(model, (), torch.Generator().manual_seed(101)).run([sequence])
    return sequence


def assert_same_as_alone(model: Transformer, sequence: Sequence, sampling: Sampling = GREEDY) -> None:
    want = alone(model, sequence.prompt, sequence.max_len - len(sequence.prompt), sampling)
    assert sequence.generated == want.generated
    assert sequence.logprobs == pytest.approx(want.logprobs, abs=1e-5)


@torch.inference_mode()
def next_logits(model: Transformer, tokens: List[int]) -> torch.Tensor:
    """Logits (vocab,) after ``tokens``, from a full forward from position 0."""
    return model.forward(torch.tensor([tokens]), 0)[0, -1]


def assert_rows_laid_out(runner: Engine) -> None:
    """Decoding rows are the first ones, in order; the prefilling group's rows are contiguous above them."""
    assert [s.row for s in runner.decoding] == list(range(len(runner.decoding)))
    assert [s.row for s in runner.prefilling] == list(range(runner.prefill_row, runner.prefill_row + len(runner.prefilling)))
    assert len(runner.decoding) <= runner.prefill_row or not runner.prefilling


@pytest.fixture(scope="module")
def two_rows(ckpt_dir: Path) -> Llama:
    return build(ckpt_dir, max_batch_size=2)


def test_a_seeded_sequence_draws_the_same_tokens_whatever_shares_its_batch(generator: Llama) -> None:
    """Alone, beside rows that sample otherwise (one alike but unseeded), and joining a running batch mid-prefill."""
    model = generator.model
    prompt = encode(generator, "Bread is baked in ovens of clay")  # 19 tokens: three chunks of 8
    want = alone(model, prompt, 12, SEEDED)
    others = [encode(generator, "The llama is"), encode(generator, "A")]

    batch = [
        Sequence(others[0], len(others[0]) + 12, GREEDY),
        Sequence(others[1], len(others[1]) + 12, Sampling(temperature=1.0, top_p=0.95)),  # would share the seeded row's draw
        Sequence(prompt, len(prompt) + 12, SEEDED),
        Sequence(others[1], len(others[1]) + 12, dataclasses.replace(SEEDED, seed=99)),
    ]
    Engine(model, (), torch.Generator().manual_seed(5)).run(batch)
    assert batch[2].generated == want.generated
    assert batch[2].logprobs == pytest.approx(want.logprobs, abs=1e-5)

    runner = Engine(model, (), torch.Generator().manual_seed(6), prefill_chunk=8)
    for sequence in (Sequence(p, len(p) + 20, Sampling(temperature=0.8, top_p=0.9)) for p in others):
        runner.add(sequence)
    for _ in range(3):
        runner.step()
    late = Sequence(prompt, len(prompt) + 12, SEEDED)
    runner.run([late])
    assert late.generated == want.generated

    assert alone(model, prompt, 12, dataclasses.replace(SEEDED, seed=1235)).generated != want.generated  # the seed decides


PENALTIES = [(1.0, 0.0), (0.0, -0.4), (-0.4, 0.0), (0.8, -0.5)]  # (presence, frequency): each changes greedy's choice here


def test_penalties_equal_the_openai_formula_over_generated_tokens(generator: Llama) -> None:
    """Greedy rows, so the penalised logits decide every token; logprobs stay the model's own; a plain row beside is unchanged."""
    model = generator.model
    prompt = encode(generator, "A")
    n = 24
    rows = [Sequence(prompt, len(prompt) + n, dataclasses.replace(GREEDY, presence_penalty=p, frequency_penalty=f)) for p, f in PENALTIES]
    plain = Sequence(prompt, len(prompt) + n, GREEDY)
    Engine(model, ()).run(rows + [plain])
    assert_same_as_alone(model, plain)
    for (presence, frequency), sequence in zip(PENALTIES, rows):
        tokens, logprobs = list(prompt), []
        counts = torch.zeros(model.vocab_size)  # generated tokens only: the prompt's do not count
        for _ in range(n):
            logits = next_logits(model, tokens)
            token = int(torch.argmax(logits - presence * (counts > 0).float() - frequency * counts))
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            counts[token] += 1
            tokens.append(token)
        assert sequence.generated == tokens[len(prompt) :], (presence, frequency)
        assert sequence.generated != plain.generated, "this penalty changes nothing here: it tests nothing"
        assert sequence.logprobs[len(prompt) :] == pytest.approx(logprobs, abs=1e-4)


def test_top_logprobs_are_the_models_most_likely_tokens_at_each_step(generator: Llama) -> None:
    """Log-softmax top-k of a full forward recomputed from scratch, whatever the temperature and penalties; cut with the tokens."""
    model = generator.model
    prompts = [encode(generator, "The llama is"), encode(generator, "A"), encode(generator, "Bread is baked in ovens of clay")]
    samplings = [
        Sampling(temperature=0.5, top_p=0.9, logprobs=True, top_logprobs=5, frequency_penalty=0.7, seed=3),
        dataclasses.replace(GREEDY, top_logprobs=2),
        GREEDY,
    ]
    sequences = [Sequence(p, len(p) + 10, s) for p, s in zip(prompts, samplings)]
    Engine(model, ()).run(sequences)
    for sequence in sequences:
        k = sequence.sampling.top_logprobs
        assert len(sequence.top_logprobs) == (len(sequence.generated) if k else 0)
        for j, (token, top) in enumerate(zip(sequence.generated, sequence.top_logprobs)):
            want = torch.log_softmax(next_logits(model, sequence.tokens[: len(sequence.prompt) + j]), -1)
            values, ids = want.topk(k)
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
            assert sequence.logprobs[len(sequence.prompt) + j] == pytest.approx(float(want[token]), abs=1e-4)
    sequences[0].keep_generated(3)
    assert len(sequences[0].top_logprobs) == len(sequences[0].generated) == 3


def test_a_long_prompt_is_prefilled_between_the_running_rows_decode_steps(generator: Llama, forward_calls: List[tuple]) -> None:
    """Each step: one decode step for the two running rows, then one chunk of the newcomer's prompt; the newcomer is
    returned from the step of its last chunk on; every row's tokens and logprobs equal its run alone."""
    model = generator.model
    runner = Engine(model, (), prefill_chunk=8)
    running = [Sequence(p, len(p) + 30, GREEDY) for p in (encode(generator, "The llama is"), encode(generator, "A"))]
    for sequence in running:
        runner.add(sequence)
    runner.step()
    runner.step()
    newcomer = Sequence(long_prompt(generator), 47 + 6, GREEDY)
    runner.add(newcomer)
    forward_calls.clear()
    for chunk in range(6):
        before = [len(s.tokens) for s in running]
        stepped = runner.step()
        assert forward_calls == [(2, 1), (1, min(8, 47 - 8 * chunk))]
        forward_calls.clear()
        assert [len(s.tokens) for s in running] == [n + 1 for n in before]
        assert all(s in stepped for s in running)
        assert (newcomer in stepped) == (chunk == 5) and len(newcomer.generated) == (chunk == 5)
        assert_rows_laid_out(runner)
    runner.run([])
    for sequence in running + [newcomer]:
        assert_same_as_alone(model, sequence)


def test_rows_leave_and_join_while_a_group_is_prefilled(generator: Llama) -> None:
    """A decoding row finishes mid-prefill, so the group's rows that finish their prompts move down to the decoding rows."""
    model = generator.model
    runner = Engine(model, (), prefill_chunk=8)
    leaving = Sequence(encode(generator, "The llama is"), 4 + 3, GREEDY)
    staying = Sequence(encode(generator, "A"), 2 + 30, GREEDY)
    runner.add(leaving)
    runner.add(staying)
    runner.step()
    group = [Sequence(long_prompt(generator), 47 + 5, GREEDY), Sequence(encode(generator, "Bread is baked in ovens of clay"), 19 + 8, GREEDY)]
    for sequence in group:
        runner.add(sequence)
    moved = False
    while runner.waiting or runner.running:
        runner.step()
        assert_rows_laid_out(runner)
        moved |= leaving.finished and group[1] in runner.decoding and group[0] in runner.prefilling
    assert moved, "the short group member never joined the decoding rows while the long one prefilled"
    for sequence in [leaving, staying] + group:
        assert_same_as_alone(model, sequence)


def test_cancel_a_waiting_then_a_decoding_sequence_frees_its_row_for_the_next_step(two_rows: Llama, forward_calls: List[tuple]) -> None:
    model = two_rows.model
    prompts = [encode(two_rows, t) for t in ("The llama is", "A", "Bread is baked in ovens of clay", "Once upon a time")]
    a, b, c, d = (Sequence(p, len(p) + 10, GREEDY) for p in prompts)
    runner = Engine(model, ())
    for sequence in (a, b, c, d):
        runner.add(sequence)
    runner.step()  # a and b take both rows; c and d wait
    runner.cancel(d)
    assert d.finish_reason == "cancelled" and runner.waiting == [c]
    runner.step()
    runner.cancel(a)
    assert a.finish_reason == "cancelled" and a.row == -1 and runner.running == [b]
    forward_calls.clear()
    stepped = runner.step()  # c takes a's row at once
    assert forward_calls == [(1, 1), (1, len(c.prompt))] and c in stepped and c.row == 1
    runner.run([])
    assert d.generated == [] and len(a.generated) == 2
    for sequence in (b, c):
        assert_same_as_alone(model, sequence)


def test_cancel_during_prefill(generator: Llama, forward_calls: List[tuple]) -> None:
    """The middle of a prefilling group (the shorter prompt before it moves up a row), then the group's last member:
    a sequence waiting for the group is admitted at the next step."""
    model = generator.model
    runner = Engine(model, (), prefill_chunk=8)
    short = Sequence(encode(generator, "The llama is"), 4 + 20, GREEDY)
    medium = Sequence(encode(generator, "Bread is baked in ovens of clay"), 19 + 8, GREEDY)
    middle = Sequence(encode(generator, "Once upon a time, a shepherd went down to the river"), 29 + 8, GREEDY)
    long = Sequence(long_prompt(generator), 47 + 5, GREEDY)
    for sequence in (short, medium, middle, long):
        runner.add(sequence)
    runner.step()  # short is decoding; the others are 8 tokens into their prompts
    assert runner.prefilling == [medium, middle, long]
    runner.cancel(middle)
    assert middle.finish_reason == "cancelled" and middle.row == -1 and runner.prefilling == [medium, long]
    assert_rows_laid_out(runner)
    late = Sequence(encode(generator, "A"), 2 + 6, GREEDY)
    runner.add(late)
    while medium in runner.prefilling:
        runner.step()
    runner.step()
    assert runner.prefilling == [long] and runner.waiting == [late]  # late waits for the group to be prefilled
    runner.cancel(long)
    assert long.finish_reason == "cancelled" and not runner.prefilling and long not in runner.running
    forward_calls.clear()
    stepped = runner.step()
    assert forward_calls == [(2, 1), (1, 2)] and late in stepped
    runner.run([])
    assert middle.generated == [] and long.generated == []
    for sequence in (short, medium, late):
        assert_same_as_alone(model, sequence)


def test_sampling_and_engine_arguments_are_checked(generator: Llama) -> None:
    with pytest.raises(ValueError, match="top_logprobs=21 is out of range; expected 0 to 20"):
        Sampling(top_logprobs=21)
    with pytest.raises(TypeError, match="seed must be an int or None, got str"):
        Sampling(seed="7")
    with pytest.raises(ValueError, match="frequency_penalty must be a finite number, got nan"):
        Sampling(frequency_penalty=float("nan"))
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int, got 0"):
        Engine(generator.model, (), prefill_chunk=0)
    assert {Sampling(seed=3, top_logprobs=2), Sampling(seed=3, top_logprobs=2)} == {Sampling(seed=3, top_logprobs=2)}  # hashable
