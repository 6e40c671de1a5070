"""The Llama 2/3 transformer: RMSNorm, rotary embeddings (with 3.1's scaling), grouped-query attention with a KV cache, SwiGLU.

Pure ``nn`` code. Linear layers are fairscale's model-parallel ones, so each rank holds its slice of
every split tensor as Meta's Llama 2 ``consolidated.NN.pth`` shards lay them out (Llama 3's shards split the token
embedding by vocabulary instead; ``llama.checkpoint`` re-cuts it on loading).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from llama.args import ModelArgs, RopeScaling, local_head_counts
from llama.errors import InputError
from llama.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

Positions = Union[int, torch.Tensor]

_rms_norm = getattr(F, "rms_norm", None)
try:  # torch 2.3+
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Every backend but cuDNN's, which builds a plan for each new shape (~40 ms on an H100): each new KV length of an
    # eager decode step would pay it. Compiled steps attend over the whole cache, one shape, and keep every backend.
    _EAGER_CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:
    sdpa_kernel = None
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if _rms_norm is not None:  # one kernel where torch has it (2.4+): the same values, twice as fast here
            return _rms_norm(x, (x.shape[-1],), eps=self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype, as Meta's reference does.
        return self._norm(x.float()).type_as(x) * self.weight


def precompute_rope(
    head_dim: int, end: int, theta: float, device: Optional[torch.device] = None, scaling: Optional[RopeScaling] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (end, head_dim // 2), in float32; ``scaling``: Llama 3.1's, as ``use_scaled_rope``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        freqs = scale_rope_freqs(freqs, scaling)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def scale_rope_freqs(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's ``apply_scaling``: wavelengths past the original context's are slowed by ``factor``, those under
    ``original_max_seq_len / high_freq_factor`` kept, and those between blended smoothly (float32, as Meta's and HF's)."""
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * torch.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, freqs)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, (1 - smooth) * scaled / scaling.factor + smooth * scaled, scaled)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate adjacent pairs (Meta's interleaved layout) of x: (bsz, seqlen, n_heads, head_dim).

    cos, sin: (bsz or 1, seqlen, head_dim // 2), the angles of each row's positions; rotation: the same angles as
    complex numbers (bsz or 1, seqlen, 1, head_dim // 2), which eager mode multiplies in one kernel (as Meta's
    reference does). Compiled graphs use the real form, which inductor fuses; it handles complex tensors poorly.
    """
    if rotation is not None:
        rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rotation
        return torch.view_as_real(rotated).flatten(-2).type_as(x)
    pairs = x.float().unflatten(-1, (-1, 2))  # (bsz, seqlen, n_heads, head_dim // 2, 2)
    x0, x1 = pairs.unbind(-1)
    cos = cos[:, :, None, :]  # (bsz or 1, seqlen, 1, head_dim // 2)
    sin = sin[:, :, None, :]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, (max_batch_size, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, first_row: int, positions: Positions, xk: torch.Tensor, xv: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store xk, xv (bsz, seqlen, n_kv_heads, head_dim) in cache rows [first_row, first_row + bsz) at ``positions``;
        return those rows' keys and values at positions [0, kv_len), each (bsz, n_kv_heads, kv_len, head_dim).

        positions: an int (every row's first position) or a (bsz, seqlen) tensor of each token's position.
        """
        bsz = xk.shape[0]
        k, v = self.k[first_row : first_row + bsz], self.v[first_row : first_row + bsz]
        if isinstance(positions, int):
            k[:, :, positions : positions + xk.shape[1]] = xk.transpose(1, 2)
            v[:, :, positions : positions + xv.shape[1]] = xv.transpose(1, 2)
        else:
            # Into the whole buffers, not the rows' view: a compiled graph then writes in place, where through the
            # view it copied the rows' whole caches at each step (S, batch 8, max_seq_len 256: 10.2 ms a step, 6.8 now).
            rows = torch.arange(first_row, first_row + bsz, device=xk.device)[:, None]  # (bsz, 1), against positions (bsz, seqlen)
            self.k[rows, :, positions] = xk  # advanced indices first: the target is (bsz, seqlen, n_kv_heads, head_dim)
            self.v[rows, :, positions] = xv
        return k[:, :, :kv_len], v[:, :, :kv_len]


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

    def forward(self, x: torch.Tensor, step: "Step") -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, step.cos, step.sin, step.rotation)
        xk = apply_rotary_emb(xk, step.cos, step.sin, step.rotation)
        assert self.cache is not None, "Transformer.setup_caches was not called"
        keys, values = self.cache.update(step.first_row, step.positions, xk, xv, step.kv_len)
        # Query heads that share a KV head are stacked along the sequence axis, so no KV copy is made:
        # (bsz, n_local_kv_heads, n_rep * seqlen, head_dim); the mask is repeated to match.
        q = xq.transpose(1, 2).reshape(bsz, self.n_local_kv_heads, self.n_rep * seqlen, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask)
        out = out.reshape(bsz, self.n_local_heads, seqlen, self.head_dim).transpose(1, 2).reshape(bsz, seqlen, -1)
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

    def forward(self, x: torch.Tensor, step: "Step") -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), step)
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
        cos, sin = precompute_rope(self.params.head_dim, max_seq_len * 2, self.params.rope_theta, device, self.params.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Positions,
        *,
        rows: Optional[slice] = None,
        kv_len: Optional[int] = None,
        last_logits_only: bool = False,
        logits_at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab_size) of ``tokens`` (bsz, seqlen), in float32.

        start_pos: the position of every row's first token (an int), or each row's own (a (bsz,) tensor).
        rows: the KV-cache rows these sequences own (default the first bsz). kv_len: how many cached positions
        attention reads (default: up to the last token; pass it with per-row positions to spare a device sync).
        last_logits_only / logits_at ((bsz,) indices into seqlen): logits of one position per row, (bsz, 1, vocab).
        """
        bsz, seqlen = tokens.shape
        rows = slice(0, bsz) if rows is None else rows
        step = self._step(tokens, start_pos, rows, kv_len)
        h = self.tok_embeddings(tokens)
        eager_cuda = tokens.device.type == "cuda" and sdpa_kernel is not None and not _is_compiling()
        with sdpa_kernel(_EAGER_CUDA_ATTENTION) if eager_cuda else contextlib.nullcontext():
            for layer in self.layers:
                h = layer(h, step)
        if logits_at is not None:
            h = h[torch.arange(bsz, device=h.device), logits_at][:, None]  # (bsz, 1, dim)
        elif last_logits_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def _step(self, tokens: torch.Tensor, start_pos: Positions, rows: slice, kv_len: Optional[int]) -> "Step":
        bsz, seqlen = tokens.shape
        device = tokens.device
        if isinstance(start_pos, int):
            positions: Positions = start_pos
            kv_len = start_pos + seqlen if kv_len is None else kv_len
            cos = self.rope_cos[start_pos : start_pos + seqlen][None]
            sin = self.rope_sin[start_pos : start_pos + seqlen][None]
            mask = None
            if seqlen > 1:  # causal over the cached prefix and the new tokens: (n_rep * seqlen, kv_len)
                mask = torch.ones(seqlen, kv_len, dtype=torch.bool, device=device).tril(start_pos).repeat(self.n_rep, 1)
        else:
            positions = start_pos.to(device)[:, None] + torch.arange(seqlen, device=device)  # (bsz, seqlen)
            kv_len = int(positions.max()) + 1 if kv_len is None else kv_len
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (bsz, seqlen, head_dim // 2)
            # Each token sees the cached positions up to its own: (bsz, 1, n_rep * seqlen, kv_len).
            mask = (torch.arange(kv_len, device=device) <= positions[..., None])[:, None].repeat(1, 1, self.n_rep, 1)
        if rows.start + bsz > self.params.max_batch_size or kv_len > self.params.max_seq_len or rows.stop - rows.start != bsz:
            raise InputError(
                f"a batch of {bsz} x {seqlen} tokens at start_pos={start_pos if isinstance(start_pos, int) else start_pos.tolist()} "
                f"in cache rows [{rows.start}, {rows.stop}) does not fit the KV cache of "
                f"max_batch_size={self.params.max_batch_size}, max_seq_len={self.params.max_seq_len}"
            )
        rotation = None if _is_compiling() else torch.complex(cos, sin)[:, :, None, :]
        return Step(rows.start, positions, kv_len, cos, sin, rotation, mask)


@dataclass
class Step:
    """Where one forward pass reads and writes: shared by every layer."""

    first_row: int  # the batch's KV-cache rows are [first_row, first_row + bsz)
    positions: Positions  # first position of every row (int), or each token's position (bsz, seqlen)
    kv_len: int  # attention reads cached positions [0, kv_len)
    cos: torch.Tensor  # (bsz or 1, seqlen, head_dim // 2)
    sin: torch.Tensor
    rotation: Optional[torch.Tensor]  # the same angles as complex numbers (bsz or 1, seqlen, 1, head_dim // 2), eager only
    mask: Optional[torch.Tensor]  # None: every position up to kv_len is visible
