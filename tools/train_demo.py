"""Train the demo model shipped in ``llama/data/demo/``: a small Llama 2 and its tokenizer, on the King James Bible.

Corpus: the King James Version (1611) from Debian's ``bible-kjv-text`` package (``apt-get install bible-kjv-text``),
read through its ``bible`` program: ``bible -l0 gen1:1-rev22:21`` prints every chapter as a ``Book N`` heading and one
``  N text`` line per verse (31,102 verses, 1,189 chapters, 4.3 MB). The text's copyright has long expired: it is in the
public domain (see /usr/share/doc/bible-kjv-text/copyright). Each chapter becomes one document, its verses joined by
spaces. The book of Ruth (4 chapters, 85 verses) is held out: never trained on, shipped as ``heldout.txt`` (one chapter
a line) for the test of the held-out loss. ``words.txt`` lists every word of the training text, for the test that the
generated text is English.

Tokenizer: sentencepiece BPE as ``llama.demo.train_tokenizer`` trains it (unk 0, bos 1, eos 2, byte fallback), on the
training verses. Model: ``llama.model``'s Llama 2 architecture, trained through ``forward`` below, which computes what
``Transformer.forward`` does (RMSNorm, the same interleaved RoPE, causal SDPA with grouped-query heads, SwiGLU) without
the KV cache, over a dict of weights under Meta's state-dict keys. Documents are BOS + chapter + EOS, concatenated;
each training row is a window of ``seq_len + 1`` tokens from that stream at a seeded random offset. AdamW, linear
warmup then cosine decay, gradient clipping at 1.0, one CPU thread: the same seed gives the same weights on the same
torch build. Weights are stored in bfloat16 (``consolidated.00.pth``, through ``llama.checkpoint.write_shards``).

Recorded run (``python tools/train_demo.py``, defaults, one thread of a 2-core shared machine, torch 2.13 CPU):
1,123,603 training tokens (3.67 characters a token), vocabulary 2048, 3,262,208 parameters (dim 256, 3 layers, 8 heads,
4 KV heads, SwiGLU hidden 704); 3000 steps of 16 x 128 tokens (6.1M tokens, about 5.5 epochs), lr 3e-3 (100 warmup steps,
cosine to 3e-4), AdamW betas (0.9, 0.95), weight decay 0.1, seed 0. 1366 s of training (4,500 tokens/s), 23 minutes in
all. Loss curve (training batch / held-out Ruth):

    step     0   7.682 / 7.659        step  2000   2.600 / 3.382
    step   500   3.556 / 3.901        step  2500   2.767 / 3.363
    step  1000   3.229 / 3.759        step  2999   2.505 / 3.347
    step  1500   2.986 / 3.513

Final, with the stored bfloat16 weights: train loss 2.613 (40 random training chapters), held-out loss 3.347 nats a token;
uniform is ln 2048 = 7.625. Greedy continuation of "In the beginning God": " of the earth is the glory of the LORD: for he
is the LORD's." (then EOS). Files: consolidated.00.pth 6,535,289 bytes, tokenizer.model 31,038, params.json 158.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout: import the package beside it
    sys.path.insert(0, str(ROOT))

from llama.args import ModelArgs  # noqa: E402
from llama.model import apply_rotary_emb, precompute_rope  # noqa: E402

Weights = Dict[str, torch.Tensor]

HELDOUT_BOOK = "Ruth"
PARAMS = {
    "dim": 256,
    "n_layers": 3,
    "n_heads": 8,
    "n_kv_heads": 4,
    "vocab_size": -1,
    "multiple_of": 32,
    "norm_eps": 1e-05,
    "rope_theta": 10000.0,
}
_HEADING = re.compile(r"(.+) (\d+)")
_VERSE = re.compile(r" +(\d+) (.+)")
_WORD = re.compile(r"[A-Za-z]+")


def read_kjv(bible: str = "bible") -> List[Tuple[str, List[str]]]:
    """Every chapter of the KJV as (``"Genesis 1"``, [verse texts]), read through Debian's ``bible`` program."""
    try:
        out = subprocess.run([bible, "-l0", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise FileNotFoundError(f"no {bible!r} program: install Debian's bible-kjv-text (apt-get install bible-kjv-text)") from None
    chapters: List[Tuple[str, List[str]]] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        verse = _VERSE.fullmatch(line)
        if verse:
            chapters[-1][1].append(verse.group(2).strip())
        elif _HEADING.fullmatch(line):
            chapters.append((line, []))
        else:
            raise ValueError(f"unexpected line in the output of {bible}: {line!r}")
    if len(chapters) != 1189 or sum(len(v) for _, v in chapters) != 31102:
        raise ValueError(f"expected 1189 chapters and 31102 verses from {bible}, got {len(chapters)} and {sum(len(v) for _, v in chapters)}")
    return chapters


def split_corpus(chapters: Sequence[Tuple[str, List[str]]]) -> Tuple[List[str], List[str], List[str]]:
    """(training chapters, held-out chapters, training verses): chapters as single lines of text."""
    train, heldout, verses = [], [], []
    for title, chapter_verses in chapters:
        text = " ".join(chapter_verses)
        if title.rsplit(" ", 1)[0] == HELDOUT_BOOK:
            heldout.append(text)
        else:
            train.append(text)
            verses.extend(chapter_verses)
    return train, heldout, verses


def init_weights(args: ModelArgs, seed: int) -> Weights:
    """Seeded float32 weights under Meta's keys: normal(0, 0.02), residual outputs scaled by 1/sqrt(2 n_layers), norms one."""
    generator = torch.Generator().manual_seed(seed)
    assert args.n_kv_heads is not None
    kv = args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.dim, args.dim),
            p + "attention.wk.weight": (kv, args.dim),
            p + "attention.wv.weight": (kv, args.dim),
            p + "attention.wo.weight": (args.dim, args.dim),
            p + "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            p + "feed_forward.w3.weight": (args.hidden_dim, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        })
    shapes.update({"norm.weight": (args.dim,), "output.weight": (args.vocab_size, args.dim)})
    weights = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            weights[key] = torch.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * args.n_layers) if key.endswith(("wo.weight", "w2.weight")) else 0.02
            weights[key] = torch.randn(shape, generator=generator) * std
    return weights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def forward(weights: Weights, args: ModelArgs, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits (bsz, seqlen, vocab_size) of tokens (bsz, seqlen) from position 0: the Llama 2 forward, no cache."""
    assert args.n_kv_heads is not None
    bsz, seqlen = tokens.shape
    head_dim, n_rep = args.head_dim, args.n_heads // args.n_kv_heads
    cos, sin = precompute_rope(head_dim, seqlen, args.rope_theta, device=tokens.device)
    cos, sin = cos[None], sin[None]  # (1, seqlen, head_dim // 2)
    h = F.embedding(tokens, weights["tok_embeddings.weight"])  # (bsz, seqlen, dim)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = _rms_norm(h, weights[p + "attention_norm.weight"], args.norm_eps)
        xq = F.linear(x, weights[p + "attention.wq.weight"]).view(bsz, seqlen, args.n_heads, head_dim)
        xk = F.linear(x, weights[p + "attention.wk.weight"]).view(bsz, seqlen, args.n_kv_heads, head_dim)
        xv = F.linear(x, weights[p + "attention.wv.weight"]).view(bsz, seqlen, args.n_kv_heads, head_dim)
        xq = apply_rotary_emb(xq, cos, sin)
        xk = apply_rotary_emb(xk, cos, sin)
        # Query head j reads KV head j // n_rep, as Meta's repeat_kv: (bsz, n_heads, seqlen, head_dim) each.
        q = xq.transpose(1, 2)
        k = xk.transpose(1, 2).repeat_interleave(n_rep, dim=1)
        v = xv.transpose(1, 2).repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(bsz, seqlen, args.dim)
        h = h + F.linear(out, weights[p + "attention.wo.weight"])
        x = _rms_norm(h, weights[p + "ffn_norm.weight"], args.norm_eps)
        gate = F.silu(F.linear(x, weights[p + "feed_forward.w1.weight"])) * F.linear(x, weights[p + "feed_forward.w3.weight"])
        h = h + F.linear(gate, weights[p + "feed_forward.w2.weight"])
    return F.linear(_rms_norm(h, weights["norm.weight"], args.norm_eps), weights["output.weight"]).float()


def greedy(weights: Weights, args: ModelArgs, prompt_tokens: List[int], max_gen_len: int, stop_id: int) -> List[int]:
    """Greedy continuation by re-running ``forward`` over the whole sequence at every step (no cache)."""
    tokens = list(prompt_tokens)
    with torch.no_grad():
        for _ in range(max_gen_len):
            next_id = int(forward(weights, args, torch.tensor([tokens]))[0, -1].argmax())
            if next_id == stop_id:
                break
            tokens.append(next_id)
    return tokens[len(prompt_tokens):]


def load_weights(ckpt_dir: Path) -> Tuple[Weights, ModelArgs]:
    """The single-shard checkpoint in ckpt_dir as float32 weights, with its ModelArgs."""
    params = json.loads((ckpt_dir / "params.json").read_text())
    state = torch.load(ckpt_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in state.items()}, ModelArgs.from_params(params)


def chunk_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], documents: Sequence[List[int]], seq_len: int) -> float:
    """Mean next-token loss over documents (token lists, BOS first), each cut into windows of seq_len + 1 tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in documents:
            for start in range(0, len(doc) - 1, seq_len):
                window = torch.tensor([doc[start : start + seq_len + 1]])
                logits = logits_fn(window[:, :-1])
                total += float(F.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
                count += window.shape[1] - 1
    return total / count


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to lr, then cosine decay to min_ratio * lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cli: argparse.Namespace) -> None:
    from llama.checkpoint import write_shards
    from llama.demo import train_tokenizer
    from llama.tokenizer import Tokenizer

    torch.set_num_threads(cli.threads)
    torch.manual_seed(cli.seed)
    start = time.time()
    train_text, heldout_text, verses = split_corpus(read_kjv())
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = train_tokenizer(Path(tmp) / "tokenizer.model", cli.vocab_size, "\n".join(verses))
        tokenizer = Tokenizer(tok_path)
        tok_bytes = tok_path.read_bytes()
    args = ModelArgs.from_params(PARAMS, vocab_size=tokenizer.n_words)
    stream = torch.tensor([t for text in train_text for t in tokenizer.encode(text, bos=True, eos=True)])
    heldout_docs = [tokenizer.encode(text, bos=True, eos=False) for text in heldout_text]
    weights = init_weights(args, cli.seed)
    n_params = sum(w.numel() for w in weights.values())
    print(f"{len(train_text)} training chapters, {stream.numel()} tokens ({sum(map(len, train_text)) / stream.numel():.2f} chars/token); "
          f"held out: {HELDOUT_BOOK}, {sum(map(len, heldout_docs))} tokens; vocab {args.vocab_size}; {n_params} parameters; "
          f"tokenizer {time.time() - start:.0f}s", flush=True)

    params = [w.requires_grad_() for w in weights.values()]
    decay = [w for w in params if w.dim() == 2]
    no_decay = [w for w in params if w.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cli.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cli.lr, betas=(0.9, 0.95)
    )
    data_generator = torch.Generator().manual_seed(cli.seed)
    offsets = torch.arange(cli.seq_len + 1)
    train_start = time.time()
    for step in range(cli.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cli.steps, cli.lr, cli.warmup)
        starts = torch.randint(0, stream.numel() - cli.seq_len - 1, (cli.batch_size,), generator=data_generator)
        batch = stream[starts[:, None] + offsets]  # (batch_size, seq_len + 1)
        logits = forward(weights, args, batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % cli.log_every == 0 or step == cli.steps - 1:
            line = f"step {step:5d}  loss {loss.item():.3f}  lr {optimizer.param_groups[0]['lr']:.2e}  {time.time() - train_start:6.0f}s"
            if step % cli.eval_every == 0 or step == cli.steps - 1:
                line += f"  held-out {chunk_loss(lambda t: forward(weights, args, t), heldout_docs, cli.seq_len):.3f}"
            print(line, flush=True)
    train_seconds = time.time() - train_start

    final = {k: w.detach().to(torch.bfloat16) for k, w in weights.items()}
    stored = {k: w.float() for k, w in final.items()}  # what the shipped checkpoint computes

    def stored_logits(t: torch.Tensor) -> torch.Tensor:
        return forward(stored, args, t)

    heldout = chunk_loss(stored_logits, heldout_docs, cli.seq_len)
    sample = torch.Generator().manual_seed(cli.seed + 1)
    train_docs = [tokenizer.encode(train_text[int(i)], bos=True, eos=True) for i in torch.randint(0, len(train_text), (40,), generator=sample)]
    train_loss = chunk_loss(stored_logits, train_docs, cli.seq_len)
    print(f"trained {cli.steps} steps in {train_seconds:.0f}s ({cli.steps * cli.batch_size * cli.seq_len / train_seconds:.0f} tokens/s); "
          f"bfloat16 weights: train loss {train_loss:.3f} (40 random chapters), held-out loss {heldout:.3f}, "
          f"uniform {math.log(args.vocab_size):.3f}", flush=True)

    out = cli.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(dict(PARAMS, vocab_size=args.vocab_size), indent=2) + "\n")
    write_shards(out, [final], args, 1)
    (out / "tokenizer.model").write_bytes(tok_bytes)
    (out / "heldout.txt").write_text("\n".join(heldout_text) + "\n")
    words = sorted({w.lower() for text in train_text for w in _WORD.findall(text)})
    (out / "words.txt").write_text("\n".join(words) + "\n")
    prompt = "In the beginning God"
    continuation = greedy(stored, args, tokenizer.encode(prompt, bos=True, eos=False), 32, tokenizer.eos_id)
    print(f"greedy: {prompt}{tokenizer.decode(continuation)!r}")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} into {out} ({time.time() - start:.0f}s in all)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "llama" / "data" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine it was trained on was shared)")
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--eval_every", type=int, default=500)
    main_args = parser.parse_args()
    train(main_args)


if __name__ == "__main__":
    main()
