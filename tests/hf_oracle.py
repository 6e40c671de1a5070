"""Hugging Face transformers' Llama on the same weights: the independent oracle for logits."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from llama.args import ModelArgs
from llama.checkpoint import StateDict
from llama.formats.hf import to_hf_state_dict


def hf_model(args: ModelArgs, state: StateDict) -> LlamaForCausalLM:
    """A float32 ``LlamaForCausalLM`` holding Meta-format full weights."""
    assert args.n_kv_heads is not None
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False,
    )
    hf_state = to_hf_state_dict(state, args)
    model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict(hf_state, strict=True)
    return model
