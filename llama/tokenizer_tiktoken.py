"""Llama 3's tokenizer: Meta's tiktoken BPE ``tokenizer.model`` (lines of '<base64 token> <rank>') and its 256 special tokens."""

from __future__ import annotations

import base64
import binascii
import logging
import re
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Sequence, Union

import tiktoken

from llama.tokenizer import BaseTokenizer, Family, check_text

logger = logging.getLogger(__name__)

# Meta's split pattern (llama_models/llama3/tokenizer.py).
PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

NUM_RESERVED_SPECIAL_TOKENS = 256
# The names Meta gives the first special tokens (Llama 3.1 onwards); the rest are reserved.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
]
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# tiktoken panics on strings over ~400k characters, and is quadratic on long runs without a split point
# (https://github.com/openai/tiktoken/issues/195): Meta cuts the text at these lengths, and so do we, at the same places.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def load_bpe_ranks(path: Path) -> Dict[bytes, int]:
    """token bytes -> rank from a tiktoken BPE file; ValueError naming the first bad line."""
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path} line {lineno} is {line[:60]!r}, not '<base64 token> <rank>' as in a tiktoken BPE file") from None
    return ranks


class Llama3Tokenizer(BaseTokenizer):
    """Encodes and decodes text with Meta's Llama 3 tiktoken ``tokenizer.model``, as ``llama_models`` does."""

    family: Family = "llama3"

    def __init__(self, model_path: Union[str, Path]) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found: pass the path of Meta's tokenizer.model as tokenizer_path")
        mergeable_ranks = load_bpe_ranks(path)
        n_base = len(mergeable_ranks)
        self.special_tokens: Dict[str, int] = {token: n_base + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=path.name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        logger.debug("Loaded tiktoken tokenizer with %d tokens from %s", n_base, path)

        self.n_words: int = n_base + len(SPECIAL_TOKENS)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids: FrozenSet[int] = frozenset(self.special_tokens[name] for name in STOP_TOKENS)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        t: List[int] = []
        for piece in meta_chunks(check_text(s)):
            t.extend(self.model.encode_ordinary(piece))  # special-token text stays plain text
        return self._with_bos_eos(t, bos, eos)

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(list(t))


def meta_chunks(s: str) -> Iterator[str]:
    """s in the pieces Meta's Llama 3 tokenizer encodes one by one: 400k-character chunks, long runs cut at 25k."""
    for start in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
        yield from split_long_runs(s[start : start + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS)


def split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """s cut so that no piece holds more than max_run consecutive whitespace or non-whitespace characters.

    The same cuts as Meta's ``_split_whitespaces_or_nonwhitespaces``: a run of one kind is cut every max_run characters
    from its start. Found with a regex (``\\s`` is ``str.isspace``) rather than a Python loop over every character.
    """
    long_run = re.compile(rf"\s{{{max_run + 1},}}|\S{{{max_run + 1},}}")
    start = 0
    for match in long_run.finditer(s):
        for cut in range(match.start() + max_run, match.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]
