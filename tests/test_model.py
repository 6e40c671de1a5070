"""The transformer against Hugging Face's Llama, and KV-cache decoding against full forward passes."""

from __future__ import annotations

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.demo import random_state_dict
from tests.conftest import TINY_PARAMS
from tests.hf_oracle import hf_model

VOCAB = 512


def tiny_model(params: dict = TINY_PARAMS, max_seq_len: int = 48, max_batch_size: int = 3, seed: int = 0) -> tuple[Transformer, ModelArgs, dict]:
    """A float32 CPU model of one rank with seeded random weights, and its full state dict."""
    from llama import distributed

    distributed.init_process_group(torch.device("cpu"))
    distributed.init_model_parallel(1)
    args = ModelArgs.from_params(params, vocab_size=VOCAB, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    state = random_state_dict(args, seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True, strict=True)
    model.setup_caches(max_batch_size, max_seq_len, torch.device("cpu"), torch.float32)
    return model, args, state


@pytest.mark.parametrize(
    "params",
    [
        TINY_PARAMS,  # grouped-query attention: 4 query heads share 2 KV heads
        dict(TINY_PARAMS, n_kv_heads=4, ffn_dim_multiplier=1.3, rope_theta=500000.0, norm_eps=1e-6),
        dict(TINY_PARAMS, n_kv_heads=1, n_heads=8, n_layers=3),
    ],
    ids=["gqa", "mha-ffn-multiplier-theta", "mqa"],
)
def test_logits_equal_hugging_face(params: dict) -> None:
    model, args, state = tiny_model(params)
    reference = hf_model(args, state)
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    ours = model.forward(tokens, 0)
    with torch.no_grad():
        theirs = reference(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_kv_cache_decode_equals_full_forward() -> None:
    model, _, _ = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model.forward(tokens, 0)
    prefill = 10
    logits = [model.forward(tokens[:, :prefill], 0)]
    for pos in range(prefill, tokens.shape[1]):
        logits.append(model.forward(tokens[:, pos : pos + 1], pos))
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_at_start_pos_equals_full_forward() -> None:
    model, _, _ = tiny_model()
    tokens = torch.randint(0, VOCAB, (3, 33), generator=torch.Generator().manual_seed(3))
    full = model.forward(tokens, 0)
    chunks = [(0, 7), (7, 19), (19, 20), (20, 33)]  # uneven chunks, one of a single token
    logits = torch.cat([model.forward(tokens[:, a:b], a) for a, b in chunks], dim=1)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_last_logits_only_is_the_last_position() -> None:
    model, _, _ = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    full = model.forward(tokens, 0)
    last = model.forward(tokens, 0, last_logits_only=True)
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)


def test_forward_past_the_cache_names_the_limits() -> None:
    model, _, _ = tiny_model(max_seq_len=16, max_batch_size=2)
    with pytest.raises(ValueError, match=r"start_pos=10 .*max_batch_size=2, max_seq_len=16"):
        model.forward(torch.zeros(1, 8, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"batch of 3 x 1"):
        model.forward(torch.zeros(3, 1, dtype=torch.long), 0)
