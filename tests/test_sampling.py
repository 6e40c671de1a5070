"""Top-p and temperature sampling."""

from __future__ import annotations

import torch

from llama.sampling import apply_penalties, draw, next_token, sample_top_p, token_logprobs, top_logprobs


def test_top_p_never_samples_outside_the_nucleus() -> None:
    # Sorted mass: 0.5, 0.8, 0.95, 1.0 -> with p=0.75 the nucleus is the two most likely tokens.
    probs = torch.tensor([[0.05, 0.3, 0.15, 0.5]]).repeat(4000, 1)
    samples = sample_top_p(probs, 0.75, torch.Generator().manual_seed(0)).flatten()
    assert set(samples.tolist()) == {1, 3}
    share_of_3 = (samples == 3).float().mean().item()
    assert abs(share_of_3 - 0.5 / 0.8) < 0.03  # renormalised inside the nucleus


def test_top_p_keeps_the_most_likely_token_even_below_p() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    samples = sample_top_p(probs.repeat(500, 1), 0.01, torch.Generator().manual_seed(0))
    assert set(samples.flatten().tolist()) == {1}


def test_top_p_of_one_can_sample_every_token() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).repeat(2000, 1)
    samples = sample_top_p(probs, 1.0, torch.Generator().manual_seed(0))
    assert set(samples.flatten().tolist()) == {0, 1, 2, 3}


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next_token(logits, 0.0, 0.9), logits.argmax(dim=-1))


def test_low_temperature_sampling_concentrates_on_the_argmax() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    sampled = next_token(logits, 1e-3, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(sampled, logits.argmax(dim=-1))


def test_sampling_is_reproducible_with_a_seeded_generator() -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(3))
    first = next_token(logits, 1.0, 0.9, torch.Generator().manual_seed(4))
    second = next_token(logits, 1.0, 0.9, torch.Generator().manual_seed(4))
    assert torch.equal(first, second)


def test_token_logprobs_score_targets_and_zero_padding() -> None:
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([[1, 2, 3], [4, -1, -1]])
    scores = token_logprobs(logits, targets, ignore_index=-1)
    expected = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(scores[0], expected[0, torch.arange(3), targets[0]])
    assert scores[1, 0] == expected[1, 0, 4] and scores[1, 1:].eq(0).all()


def test_penalties_subtract_presence_once_and_frequency_per_occurrence() -> None:
    logits = torch.zeros(2, 4)
    counts = torch.tensor([[0, 1, 3, 0], [2, 0, 0, 1]])
    got = apply_penalties(logits, counts, torch.tensor([0.5, 0.0]), torch.tensor([0.25, -1.0]))
    assert torch.equal(got, torch.tensor([[0.0, -0.75, -1.25, 0.0], [2.0, 0.0, 0.0, 1.0]]))


def test_top_logprobs_are_log_softmax_top_k_most_likely_first() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    values, ids = top_logprobs(logits, 2)
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(values, torch.log_softmax(logits, -1)[:, [1, 2]])


def test_draw_is_multinomial_without_its_device_read() -> None:
    """``draw`` replaced ``torch.multinomial`` (whose input check stalls CUDA): the same tokens from the same generator state."""
    probs = torch.softmax(torch.randn(6, 300, generator=torch.Generator().manual_seed(3)) * 4, dim=-1)
    probs[:, 150:] = 0  # as after top-p
    for seed in range(30):
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(draw(probs, torch.Generator().manual_seed(seed)), want)
