"""Each promise of the core pinned by a test that fails when the promise is broken (checked by seeding faults into the code).

The sampling tests draw thousands of first tokens through ``Llama.generate`` and compare them with the distribution computed
from Hugging Face's Llama on the same weights (tests/hf_oracle.py). Each statistical check allows 6 standard errors, so it
fails by chance with odds below 1e-8 (normal approximation); the faults it guards against move the statistic by 14 or more
standard errors, which the tests assert. The samples come from a seeded generator, so every run draws the same ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

import pytest
import torch
from transformers import LlamaForCausalLM

from llama import Llama, ModelArgs
from llama import model as llama_model
from llama import parallel_layers
from llama.checkpoint import load_checkpoint, state_dict_for_rank
from llama.demo import random_state_dict
from tests.conftest import TINY_PARAMS, build
from tests.hf_oracle import hf_model

N_SAMPLES = 4096  # per sampled distribution; with max_batch_size 256 each draw of 4096 takes well under a second
TOLERANCE_SE = 6.0  # two-sided normal tail beyond 6 standard errors: 2e-9
POWER_SE = 14.0  # a fault must move the statistic by at least this many standard errors for the test to count
NO_TOKEN = -5  # an eos_id no token can equal: rows run to max_gen_len


@pytest.fixture(scope="module")
def oracle(ckpt_dir: Path, generator: Llama) -> LlamaForCausalLM:
    args = ModelArgs.from_params(dict(generator.model.params.__dict__))
    return hf_model(args, load_checkpoint(ckpt_dir, args, 1, 0))


@pytest.fixture(scope="module")
def sampler(ckpt_dir: Path) -> Llama:
    """A model of its own (seeded) for drawing many first tokens at once."""
    return build(ckpt_dir, max_seq_len=16, max_batch_size=256, seed=3)


def encode(llama: Llama, text: str) -> List[int]:
    return llama.tokenizer.encode(text, bos=True, eos=False)


def oracle_next_logprobs(oracle: LlamaForCausalLM, prompt: Sequence[int]) -> torch.Tensor:
    """(vocab_size,) float64 log-probabilities of the token after prompt."""
    with torch.no_grad():
        return torch.log_softmax(oracle(torch.tensor([list(prompt)])).logits[0, -1].double(), dim=-1)


def oracle_scores(oracle: LlamaForCausalLM, tokens: Sequence[int]) -> List[float]:
    """Log-probability of each token given the ones before it (one full forward pass); 0.0 for the first."""
    with torch.no_grad():
        logprobs = torch.log_softmax(oracle(torch.tensor([list(tokens)])).logits[0], dim=-1)
    return [0.0] + [float(logprobs[i - 1, t]) for i, t in enumerate(tokens) if i > 0]


def draw_first_tokens(llama: Llama, prompt: List[int], temperature: float, top_p: float) -> torch.Tensor:
    """N_SAMPLES first tokens sampled after prompt; an empty generation is a sampled EOS."""
    tokens, _ = llama.generate([prompt] * N_SAMPLES, max_gen_len=1, temperature=temperature, top_p=top_p)
    return torch.tensor([row[0] if row else llama.tokenizer.eos_id for row in tokens])


def mean_and_sd(q: torch.Tensor, statistic: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of statistic[token] for a token drawn from q."""
    mean = (q * statistic).sum()
    return float(mean), float(((q * statistic**2).sum() - mean**2).clamp(min=0).sqrt())


def assert_drawn_from(samples: torch.Tensor, q: torch.Tensor, logprobs: torch.Tensor, alternatives: Sequence[torch.Tensor] = ()) -> None:
    """The samples fit distribution q: the mean model log-prob of the sampled tokens, and the share of each of q's
    10 likeliest tokens, lie within TOLERANCE_SE standard errors of their values under q.

    Each alternative (the distribution a fault would sample from) must be at least POWER_SE standard errors away.
    """
    mean, sd = mean_and_sd(q, logprobs)
    se = sd / math.sqrt(len(samples))
    for alternative in alternatives:
        assert abs(mean_and_sd(alternative, logprobs)[0] - mean) > POWER_SE * se, "the test could not tell this fault apart"
    got = float(logprobs[samples].mean())
    assert abs(got - mean) < TOLERANCE_SE * se, f"mean log-prob of the samples {got:.4f}, expected {mean:.4f} +- {se:.4f}"
    counts = torch.bincount(samples, minlength=len(q)).double() / len(samples)
    for token in q.argsort(descending=True)[:10].tolist():
        share, want = float(counts[token]), float(q[token])
        assert abs(share - want) < TOLERANCE_SE * math.sqrt(want * (1 - want) / len(samples)), (token, share, want)


def nucleus(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask of the top-p nucleus: the tokens whose sorted predecessors hold at most p of the mass."""
    probs_sort, order = probs.sort(descending=True)
    before = probs_sort.cumsum(0) - probs_sort
    # float32 logits of our model and of the oracle differ by ~1e-6: no token may sit that close to the edge
    assert float((before - p).abs().min()) > 1e-4, "a token is too close to the nucleus edge for this test to be exact"
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[order[before <= p]] = True
    return mask


def test_top_p_samples_only_the_nucleus_and_top_p_one_samples_everything(sampler: Llama, oracle: LlamaForCausalLM) -> None:
    """A top_p that is ignored (or applied when it is 1) fails here: at p=0.5 half the mass lies outside the nucleus."""
    prompt = encode(sampler, "A")
    logprobs = oracle_next_logprobs(oracle, prompt)
    probs = logprobs.exp()
    inside = nucleus(probs, 0.5)
    assert 10 < int(inside.sum()) < 200 and 0.45 < float(probs[inside].sum()) < 0.6

    in_nucleus = draw_first_tokens(sampler, prompt, temperature=1.0, top_p=0.5)
    outside_samples = sorted(set(in_nucleus[~inside[in_nucleus]].tolist()))
    assert not outside_samples, f"tokens {outside_samples} lie outside the top-p=0.5 nucleus"
    renormalised = torch.where(inside, probs, 0.0) / probs[inside].sum()
    assert_drawn_from(in_nucleus, renormalised, logprobs, alternatives=[probs])

    everything = draw_first_tokens(sampler, prompt, temperature=1.0, top_p=1.0)
    outside_mass = 1 - float(probs[inside].sum())
    share = float((~inside[everything]).double().mean())
    assert abs(share - outside_mass) < TOLERANCE_SE * math.sqrt(outside_mass * (1 - outside_mass) / N_SAMPLES)
    assert_drawn_from(everything, probs, logprobs, alternatives=[renormalised])


@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_temperature_scales_the_logits(sampler: Llama, oracle: LlamaForCausalLM, temperature: float) -> None:
    """Samples follow softmax(logits / T); a temperature ignored, applied twice, or multiplied instead of divided fails."""
    prompt = encode(sampler, "A")
    logprobs = oracle_next_logprobs(oracle, prompt)
    q = torch.softmax(logprobs / temperature, dim=-1)
    faults = [torch.softmax(logprobs / t, dim=-1) for t in (1.0, temperature**2, 1 / temperature)]
    samples = draw_first_tokens(sampler, prompt, temperature=temperature, top_p=1.0)
    assert_drawn_from(samples, q, logprobs, alternatives=faults)


def equal_length_prompts(llama: Llama) -> List[List[int]]:
    first = encode(llama, "The llama is a camelid")
    second = encode(llama, "Once upon a time, a shepherd walked")[: len(first)]
    assert len(second) == len(first) and second != first
    return [first, second]


@pytest.mark.parametrize("case", ["equal lengths", "one prompt"])
def test_max_gen_len_zero_with_echo_scores_each_token_by_its_prefix(generator: Llama, oracle: LlamaForCausalLM, case: str) -> None:
    """All prompts of one length and max_gen_len=0 take the prefill-only branch, where the reference scored each token
    against the logits of its own position."""
    prompts = equal_length_prompts(generator) if case == "equal lengths" else [encode(generator, "Tea needs fresh water")]
    tokens, logprobs = generator.generate(prompts, max_gen_len=0, logprobs=True, echo=True)
    assert tokens == prompts
    for prompt, got in zip(prompts, logprobs):
        assert got == pytest.approx(oracle_scores(oracle, prompt), abs=1e-4)
    assert generator.generate(prompts, max_gen_len=0, logprobs=True) == ([[] for _ in prompts], [[] for _ in prompts])


def test_prompts_that_fill_max_seq_len_are_scored_with_echo(generator: Llama, oracle: LlamaForCausalLM) -> None:
    """Prompts of max_seq_len tokens leave no room to generate, so max_gen_len > 0 takes the prefill-only branch too."""
    max_seq_len = generator.model.params.max_seq_len
    story = encode(generator, "Once upon a time, a shepherd walked his llamas over the hills to the river. " * 8)
    prompts = [story[:max_seq_len], [story[0]] + story[-(max_seq_len - 1) :]]
    tokens, logprobs = generator.generate(prompts, max_gen_len=4, logprobs=True, echo=True)
    assert tokens == prompts
    for prompt, got in zip(prompts, logprobs):
        assert got == pytest.approx(oracle_scores(oracle, prompt), abs=1e-4)


@pytest.mark.parametrize("echo", [True, False])
def test_sampled_tokens_are_scored_by_the_untempered_model(ckpt_dir: Path, oracle: LlamaForCausalLM, echo: bool) -> None:
    """Logprobs, with and without echo, in a batch of unequal prompts: each returned token's log-probability under the
    model itself (the temperature shapes sampling only), and echo returns the exact prompt first."""
    llama = build(ckpt_dir, seed=11)
    prompts = [encode(llama, text) for text in ("The llama is", "Once upon a time, a shepherd", "A")]
    tokens, logprobs = llama.generate(prompts, max_gen_len=8, temperature=1.3, top_p=0.95, logprobs=True, echo=echo)
    for prompt, got_tokens, got_logprobs in zip(prompts, tokens, logprobs):
        if echo:
            assert got_tokens[: len(prompt)] == prompt
            sequence, want = got_tokens, oracle_scores(oracle, got_tokens)
        else:
            sequence = prompt + got_tokens
            want = oracle_scores(oracle, sequence)[len(prompt) :]
        assert len(sequence) > len(prompt), "nothing was generated: this row does not test the generated tokens' scores"
        assert got_logprobs == pytest.approx(want, abs=1e-4)


def test_eos_in_a_prompt_neither_cuts_it_nor_stops_its_row_and_a_generated_eos_stops_only_its_own(
    generator: Llama, oracle: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two prompts cut from one greedy run, so both meet the same token X; X is made the EOS.

    The long prompt holds X at a position the short row generates from; the short row generates X and stops there while the
    long row, inside its prompt at that step, goes on until it generates X itself. An EOS cut searched from the start of an
    echoed row, or an EOS counted inside a prompt, cuts the long row.
    """
    monkeypatch.setattr(generator.tokenizer, "stop_ids", frozenset({NO_TOKEN}))
    base = encode(generator, "The llama is")
    (run,), _ = generator.generate([base], max_gen_len=30, temperature=0)
    # X: a token the run makes twice, first at i >= 2
    i = next(i for i, x in enumerate(run) if i >= 2 and x not in run[:i] and x in run[i + 1 :])
    x = run[i]
    short = base + run[: i - 2]  # generates run[i - 2], run[i - 1], then X
    long = base + run[: i + 1]  # X is its last prompt token, at the step where the short row generates X
    max_gen_len = 24
    (free_long, free_short), _ = generator.generate([long, short], max_gen_len, temperature=0)
    assert free_short[2] == x and x not in free_short[:2]
    j = free_long.index(x)
    assert 0 < j < max_gen_len - 1 and len(long) + j > len(short) + 2, "the long row must generate past the short row's EOS"

    monkeypatch.setattr(generator.tokenizer, "stop_ids", frozenset({x}))
    tokens, logprobs = generator.generate([long, short], max_gen_len, temperature=0, logprobs=True, echo=True)
    assert tokens == [long + free_long[:j], short + free_short[:2]]
    for row, scores in zip(tokens, logprobs):
        assert scores == pytest.approx(oracle_scores(oracle, row), abs=1e-4)
    tokens, _ = generator.generate([long, short], max_gen_len, temperature=0)
    assert tokens == [free_long[:j], free_short[:2]]


def test_chat_completion_uses_metas_format_for_a_system_prompt_and_two_exchanges(ckpt_dir: Path) -> None:
    """The expected tokens are written out as Meta's chat_completion builds them: each finished exchange its own
    BOS ... EOS, contents stripped, the system prompt inside the first user turn."""
    generator = build(ckpt_dir, max_seq_len=160)  # the tiny tokenizer spends a token on most characters of the tags
    dialog = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Hi there\n"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "  What do llamas eat?"},
        {"role": "assistant", "content": "Grass.\n"},
        {"role": "user", "content": " And alpacas? "},
    ]
    tok = generator.tokenizer
    expected = (
        tok.encode("[INST] <<SYS>>\n Be brief. \n<</SYS>>\n\nHi there [/INST] Hello! ", bos=True, eos=True)
        + tok.encode("[INST] What do llamas eat? [/INST] Grass. ", bos=True, eos=True)
        + tok.encode("[INST] And alpacas? [/INST]", bos=True, eos=False)
    )
    assert expected.count(tok.bos_id) == 3 and expected.count(tok.eos_id) == 2
    (answer,), (answer_logprobs,) = generator.generate([expected], max_gen_len=6, temperature=0, logprobs=True)
    (result,) = generator.chat_completion([dialog], temperature=0, max_gen_len=6, logprobs=True)
    assert result["generation"] == {"role": "assistant", "content": tok.decode(answer)}
    assert result["tokens"] == [tok.decode([t]) for t in answer]
    assert result["logprobs"] == pytest.approx(answer_logprobs, abs=1e-6)


def module_for(model: torch.nn.Module, key: str) -> torch.nn.Module:
    return model.get_submodule(key.rsplit(".", 1)[0])


@pytest.mark.parametrize("n_ranks", [2, 4])
def test_each_rank_gets_the_slice_its_fairscale_layer_holds(n_ranks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split table against the layers themselves: a model built for n ranks (mocked world size) has each rank's
    tensor shapes, and the ranks' slices put back along the dimension the layer type splits give the full tensor.

    A wrong SPLIT_DIM entry for a square weight (wq, wo) round-trips through split and merge unnoticed; here it cannot.
    """
    args = ModelArgs.from_params({**TINY_PARAMS, "vocab_size": 512})
    full = random_state_dict(args)
    for module in (llama_model, parallel_layers):
        monkeypatch.setattr(module, "get_model_parallel_world_size", lambda: n_ranks)
    with torch.device("meta"):
        model = llama_model.Transformer(args)
    params = dict(model.named_parameters())
    ranks = [state_dict_for_rank([full], args, n_ranks, rank) for rank in range(n_ranks)]
    assert set(params) == set(full)
    for key, tensor in full.items():
        assert all(shard[key].shape == params[key].shape for shard in ranks), (key, ranks[0][key].shape, params[key].shape)
        layer = module_for(model, key)
        if isinstance(layer, (parallel_layers.RowParallelLinear, parallel_layers.ParallelEmbedding)):
            dim = 1  # input features, or the embedding dimension
        elif isinstance(layer, parallel_layers.ColumnParallelLinear):
            dim = 0  # output features
        else:
            assert isinstance(layer, llama_model.RMSNorm), f"{key}: a layer type this test does not know"
            assert all(torch.equal(shard[key], tensor) for shard in ranks), key
            continue
        if key.endswith(("wk.weight", "wv.weight")) and n_ranks > args.n_kv_heads:
            continue  # replicated KV heads: tests/test_checkpoint_sharding.py checks which head each rank holds
        assert torch.equal(torch.cat([shard[key] for shard in ranks], dim=dim), tensor), key
