"""The overlapped engine (each decode step's tokens read after the next step is launched, as on CUDA) gives what the
step-by-step engine gives; on CUDA its decode steps never wait for the device."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import pytest
import torch

from llama import Llama
from llama.engine import Engine, Sampling, Sequence
from llama.model import Transformer
from tests.conftest import build
from tests.test_engine_requests import GREEDY, encode


def stop_after(n: int):
    """A stop_check that ends a sequence at its (n + 1)th generated token, keeping n (as a stop string would)."""
    return lambda generated: n if len(generated) > n else None


def mixed_run(generator: Llama, model: Transformer, overlap: bool, stop_id: int) -> List[Sequence]:
    """Sequences asking for every feature the engine has, some joining mid-run, more than the batch's rows."""
    texts = ["The llama is", "A", "Bread is baked in ovens of clay", "Once upon a time", "The river", "Why", "Clay"]
    prompts = [encode(generator, t) for t in texts]
    long = encode(generator, "Once upon a time, a shepherd went down to the river") + encode(generator, "Bread is baked in ovens of clay", bos=False)
    specs = [
        (prompts[0], 12, Sampling(temperature=0.0, top_p=1.0, logprobs=True, top_logprobs=3), False, None),
        (prompts[1], 10, Sampling(temperature=1.0, top_p=0.9, logprobs=True, presence_penalty=0.5, frequency_penalty=0.3, seed=7), False, None),
        (prompts[2], 9, GREEDY, False, stop_after(3)),
        (long, 6, GREEDY, True, None),  # scored prompt, prefilled in chunks of 8
        (prompts[3], 1, GREEDY, False, None),
        (prompts[4], 14, Sampling(temperature=0.8, top_p=0.95, seed=3, frequency_penalty=1.0), False, None),
        (prompts[5], 11, GREEDY, False, None),
        (prompts[6], 8, Sampling(temperature=0.0, top_p=1.0, top_logprobs=2), False, stop_after(5)),
    ]
    sequences = [Sequence(p, len(p) + n, sampling, score_prompt=score, stop_check=check) for p, n, sampling, score, check in specs]
    runner = Engine(model, {stop_id}, torch.Generator().manual_seed(0), prefill_chunk=8, overlap=overlap)
    for sequence in sequences[:3]:
        runner.add(sequence)
    for _ in range(3):
        runner.step()
    for sequence in sequences[3:]:  # join while the first ones decode
        runner.add(sequence)
    runner.run([])
    assert runner._launched is None, "a launched step outlived every row it was launched for"
    return sequences


def test_overlapped_steps_give_what_step_by_step_gives(generator: Llama) -> None:
    model = generator.model
    free = Sequence(encode(generator, "Why"), 20, GREEDY)
    Engine(model, ()).run([free])
    stop_id = free.generated[4]  # the greedy row of "Why" meets it mid-run
    want = mixed_run(generator, model, False, stop_id)
    got = mixed_run(generator, model, True, stop_id)
    assert any(s.finish_reason == "stop" and s.stop_check is None for s in want), "no row met the stop token"
    for g, w in zip(got, want):
        assert (g.tokens, g.finish_reason) == (w.tokens, w.finish_reason)
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert [[t for t, _ in top] for top in g.top_logprobs] == [[t for t, _ in top] for top in w.top_logprobs]
        assert [v for top in g.top_logprobs for _, v in top] == pytest.approx([v for top in w.top_logprobs for _, v in top], abs=1e-5)


def test_a_row_that_stops_costs_one_dropped_step(generator: Llama, forward_calls: List[tuple]) -> None:
    """Its stop is read one step late, so it rides along in one more step, whose token is dropped; then no more."""
    prompts = [encode(generator, "The llama is"), encode(generator, "A")]
    free = [Sequence(p, len(p) + 8, GREEDY) for p in prompts]
    Engine(generator.model, ()).run(free)
    stop_id = free[0].generated[2]
    assert stop_id not in free[1].generated
    forward_calls.clear()
    rows = [Sequence(p, len(p) + 8, GREEDY) for p in prompts]
    Engine(generator.model, {stop_id}, overlap=True).run(rows)
    assert rows[0].generated == free[0].generated[:2] and rows[1].generated == free[1].generated
    # prefill; three steps for both (the third launched before the stop is read); row 1 alone to its 8th token
    assert [bsz for bsz, _ in forward_calls] == [2, 2, 2, 2] + [1] * 4


def test_a_row_cancelled_while_its_step_runs_gets_no_more_tokens(generator: Llama) -> None:
    model = generator.model
    a, b = (Sequence(encode(generator, t), 20, GREEDY) for t in ("The llama is", "Once upon a time"))
    runner = Engine(model, (), overlap=True)
    runner.run([])
    for sequence in (a, b):
        runner.add(sequence)
    for _ in range(4):
        runner.step()
    assert runner._launched is not None and a in runner._launched.batch
    kept = list(a.generated)
    runner.cancel(a)
    runner.run([])
    assert a.finish_reason == "cancelled" and a.generated == kept
    alone = Sequence(b.prompt, b.max_len, GREEDY)
    Engine(model, ()).run([alone])
    assert b.generated == alone.generated and b.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_decode_steps_never_wait_for_the_device(ckpt_dir: Path, compile: bool) -> None:
    """After the first steps, whole runs (joins, prefill, sampling, penalties, logprobs) go without one
    synchronizing CUDA call: ``torch.cuda.set_sync_debug_mode("error")`` raises at any."""
    llama = build(ckpt_dir, device="cuda", compile=compile)
    model = llama.model
    samplings = [GREEDY, Sampling(temperature=0.9, top_p=0.8, seed=5, presence_penalty=0.4, top_logprobs=2), Sampling(temperature=0.7)]

    def run(max_gen_len: int, sync_debug: Optional[str]) -> List[Sequence]:
        sequences = [Sequence(encode(llama, t), len(encode(llama, t)) + max_gen_len, s) for t, s in zip(("The llama is", "A", "Bread"), samplings)]
        runner = Engine(model, (), torch.Generator(device="cuda").manual_seed(0), decode=llama._decode)
        assert runner.overlap
        runner.add(sequences[0])
        for _ in range(3):
            runner.step()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(sync_debug or 0)
        try:
            for sequence in sequences[1:]:
                runner.add(sequence)
            runner.run([])
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return sequences

    warm = run(12, None)  # records the CUDA graphs of each batch size, which synchronizes
    checked = run(12, "error")
    assert [s.generated for s in checked] == [s.generated for s in warm]
    assert all(len(s.generated) == 12 for s in checked)
