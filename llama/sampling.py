"""Next-token choice and token scoring: pure tensor functions."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability mass reaches p (nucleus sampling).

    probs: (bsz, vocab_size) rows summing to 1; returns (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # A token stays when the mass before it is at most p, so the first token always stays.
    probs_sort.masked_fill_(probs_sum - probs_sort > p, 0.0)  # a mask, not boolean indexing, which waits for the device
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, draw(probs_sort, generator))


def draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of probs (bsz, vocab_size) -> (bsz, 1): ``torch.multinomial(probs, 1, generator=generator)``.

    The same exponential race multinomial runs for one sample (the same draws from the generator, so the same
    tokens), without its input check, which reads a value back from the device and so stalls every CUDA step.
    """
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / race, dim=-1, keepdim=True)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(bsz, vocab_size) logits -> (bsz,) token ids: argmax at temperature 0, else top-p sampling."""
    if temperature > 0:
        # Shifted so the largest logit is 0: a tiny temperature sends the others to -inf, never the top one to inf
        # (inf - inf would be NaN). Below 1e-30 every float32 gap is already -inf, so the floor changes nothing.
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, 1e-30)
        probs = torch.softmax(scaled, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.argmax(logits, dim=-1)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: ``logits - presence * (counts > 0) - frequency * counts``.

    logits, counts: (bsz, vocab_size), counts being how often each token was generated so far; penalties: (bsz,).
    """
    counts = counts.to(logits.dtype)
    return logits - presence_penalty[:, None] * (counts > 0) - frequency_penalty[:, None] * counts


def top_logprobs(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row, most likely first: (bsz, vocab_size) -> log-probabilities and ids, each (bsz, k)."""
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return values, ids


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Log-probability of each target under the logits at the same position: (bsz, seqlen, vocab) -> (bsz, seqlen).

    Targets equal to ignore_index (padding) score 0.
    """
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=ignore_index)
