"""The Llama 2 transformer: RMSNorm, rotary embeddings, grouped-query attention with a KV cache, SwiGLU.

Pure ``nn`` code. Linear layers are fairscale's model-parallel ones, so each rank holds its slice of
every split tensor exactly as Meta's ``consolidated.NN.pth`` shards lay them out.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from llama.args import ModelArgs, local_head_counts
from llama.errors import InputError
from llama.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype, as Meta's reference does.
        return self._norm(x.float()).type_as(x) * self.weight


def precompute_rope(head_dim: int, end: int, theta: float, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (end, head_dim // 2), in float32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (Meta's interleaved layout) of x: (bsz, seqlen, n_heads, head_dim)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (bsz, seqlen, n_heads, head_dim // 2, 2)
    x0, x1 = pairs.unbind(-1)
    cos = cos[None, :, None, :]  # (1, seqlen, 1, head_dim // 2)
    sin = sin[None, :, None, :]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, (max_batch_size, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store xk, xv (bsz, n_kv_heads, seqlen, head_dim) at start_pos; return all keys and values up to them."""
        bsz, _, seqlen, _ = xk.shape
        end = start_pos + seqlen
        self.k[:bsz, :, start_pos:end] = xk
        self.v[:bsz, :, start_pos:end] = xv
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        model_parallel_size = get_model_parallel_world_size()
        self.n_local_heads, self.n_local_kv_heads = local_head_counts(args, model_parallel_size)
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        kv_features = self.n_local_kv_heads * model_parallel_size * self.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim)
        self.wk = ColumnParallelLinear(args.dim, kv_features)
        self.wv = ColumnParallelLinear(args.dim, kv_features)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim)
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, cos, sin)
        xk = apply_rotary_emb(xk, cos, sin)
        assert self.cache is not None, "Transformer.setup_caches was not called"
        keys, values = self.cache.update(start_pos, xk.transpose(1, 2), xv.transpose(1, 2))
        # Query heads that share a KV head are stacked along the sequence axis, so no KV copy is made:
        # (bsz, n_local_kv_heads, n_rep * seqlen, head_dim); the mask is repeated to match.
        q = xq.transpose(1, 2).reshape(bsz, self.n_local_kv_heads, self.n_rep * seqlen, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.view(bsz, self.n_local_heads, seqlen, self.head_dim).transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim)
        self.w2 = RowParallelLinear(hidden_dim, dim)
        self.w3 = ColumnParallelLinear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids (bsz, seqlen) at start_pos -> float32 logits (bsz, seqlen, vocab_size).

    Built under ``torch.device("meta")``, the weights cost nothing until ``load_state_dict(..., assign=True)``;
    then call ``setup_caches`` to allocate the KV caches and rotary tables on the real device.
    """

    def __init__(self, params: ModelArgs) -> None:
        super().__init__()
        if params.vocab_size <= 0:
            raise InputError(f"ModelArgs.vocab_size must be set from the tokenizer, got {params.vocab_size}")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, gather_output=True)
        self.n_rep = self.layers[0].attention.n_rep
        self.setup_caches(params.max_batch_size, params.max_seq_len, dtype=torch.get_default_dtype())

    def setup_caches(self, max_batch_size: int, max_seq_len: int, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        """(Re)allocate the KV caches and the float32 rotary tables on device."""
        self.params.max_batch_size = max_batch_size
        self.params.max_seq_len = max_seq_len
        dtype = dtype or self.output.weight.dtype
        for layer in self.layers:
            attention = layer.attention
            attention.cache = KVCache(max_batch_size, max_seq_len, attention.n_local_kv_heads, attention.head_dim, dtype).to(device)
        # Twice max_seq_len, as Meta's freqs_cis, so that positions past the cache still have angles.
        cos, sin = precompute_rope(self.params.head_dim, max_seq_len * 2, self.params.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_logits_only: bool = False) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        if bsz > self.params.max_batch_size or start_pos + seqlen > self.params.max_seq_len:
            raise InputError(
                f"a batch of {bsz} x {seqlen} tokens at start_pos={start_pos} does not fit the KV cache of "
                f"max_batch_size={self.params.max_batch_size}, max_seq_len={self.params.max_seq_len}"
            )
        h = self.tok_embeddings(tokens)
        cos = self.rope_cos[start_pos : start_pos + seqlen]
        sin = self.rope_sin[start_pos : start_pos + seqlen]
        mask = None
        if seqlen > 1:
            # Causal over the cached prefix and the new tokens: (n_rep * seqlen, start_pos + seqlen).
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device).tril(start_pos)
            mask = mask.repeat(self.n_rep, 1)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        h = self.norm(h)
        if last_logits_only:
            h = h[:, -1:]
        return self.output(h).float()
