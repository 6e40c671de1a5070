"""Hugging Face transformers' Llama on the same weights: the independent oracle for logits."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama.args import ModelArgs
from llama.checkpoint import StateDict


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent feature pairs, HF rotates the two halves of each head: reorder the rows to match."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


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
    hf_state = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(args.n_layers):
        meta, hf = f"layers.{i}.", f"model.layers.{i}."
        hf_state.update({
            hf + "self_attn.q_proj.weight": _permute_rotary(state[meta + "attention.wq.weight"], args.n_heads),
            hf + "self_attn.k_proj.weight": _permute_rotary(state[meta + "attention.wk.weight"], args.n_kv_heads),
            hf + "self_attn.v_proj.weight": state[meta + "attention.wv.weight"],
            hf + "self_attn.o_proj.weight": state[meta + "attention.wo.weight"],
            hf + "mlp.gate_proj.weight": state[meta + "feed_forward.w1.weight"],
            hf + "mlp.down_proj.weight": state[meta + "feed_forward.w2.weight"],
            hf + "mlp.up_proj.weight": state[meta + "feed_forward.w3.weight"],
            hf + "input_layernorm.weight": state[meta + "attention_norm.weight"],
            hf + "post_attention_layernorm.weight": state[meta + "ffn_norm.weight"],
        })
    model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict(hf_state, strict=True)
    return model
