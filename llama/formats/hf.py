"""Hugging Face's Llama layout: tensor names, and the rotary row order of its q and k projections."""

from __future__ import annotations

from typing import Dict, Mapping

import torch

from llama.args import ModelArgs

# Meta's name within a layer -> Hugging Face's.
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent feature pairs, HF the two halves of each head: reorder w's rows (out, in) to match."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def to_hf_state_dict(state: Mapping[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """A full (unsharded) Meta state dict under HF's names, q and k rows reordered for HF's rotary layout."""
    assert args.n_kv_heads is not None
    hf_state = {hf: state[meta] for meta, hf in TOP_NAMES.items()}
    for i in range(args.n_layers):
        for meta, hf in LAYER_NAMES.items():
            tensor = state[f"layers.{i}.{meta}"]
            if meta == "attention.wq.weight":
                tensor = permute_rotary(tensor, args.n_heads)
            elif meta == "attention.wk.weight":
                tensor = permute_rotary(tensor, args.n_kv_heads)
            hf_state[f"model.layers.{i}.{hf}"] = tensor
    return hf_state
