"""Hugging Face ``tokenizer.json`` (Llama 2 or Llama 3 vocabularies) through the ``tokenizers`` library."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

from tokenizers import Tokenizer as HFBackend

from llama.tokenizer import FORMATS_HINT, BaseTokenizer, Family, check_text
from llama.tokenizer_tiktoken import STOP_TOKENS, meta_chunks

logger = logging.getLogger(__name__)

# (bos, eos) by vocabulary, when no tokenizer_config.json names them.
DEFAULT_BOS_EOS = (("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>"))


class HFTokenizer(BaseTokenizer):
    """Encodes and decodes with a ``tokenizer.json``; ids equal those of the sentencepiece or tiktoken file it came from.

    BOS/EOS come from ``tokenizer_config.json`` beside the file when present; ``generation_config.json``'s
    ``eos_token_id`` adds to the stop ids. The family is llama3 when the vocabulary has ``<|eot_id|>``.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found: pass the tokenizer.json of the checkpoint as tokenizer_path")
        try:
            self.model = HFBackend.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json the tokenizers library can read ({e}); {FORMATS_HINT}") from None
        # Text such as "<|eot_id|>" typed by a user stays text: special tokens match only as ids we add ourselves
        # (tokenizers >= 0.15.1). Added tokens the file does not mark special would still match; Llama's files have none.
        self.model.encode_special_tokens = True
        vocab = self.model.get_vocab(with_added_tokens=True)
        self.special_tokens: Dict[str, int] = {
            t.content: i for i, t in self.model.get_added_tokens_decoder().items() if t.special
        }
        self.n_words: int = self.model.get_vocab_size(with_added_tokens=True)
        self.family: Family = "llama3" if "<|eot_id|>" in vocab else "llama2"

        config = _read_json(path.parent / "tokenizer_config.json")
        bos, eos = _bos_eos(path, config, vocab)
        self.bos_id: int = vocab[bos]
        self.eos_id: int = vocab[eos]
        pad = _token_name(config.get("pad_token"))
        if pad is None and self.family == "llama3":
            pad = "<|finetune_right_pad_id|>"
        self.pad_id: int = vocab.get(pad, -1) if pad is not None else -1

        stop = {self.eos_id}
        if self.family == "llama3":
            stop |= {vocab[name] for name in STOP_TOKENS if name in vocab}
        stop |= set(_generation_eos_ids(path.parent / "generation_config.json", self.n_words))
        self.stop_ids: FrozenSet[int] = frozenset(stop)
        # sentencepiece decodes BOS/EOS/pad (control pieces) to nothing; tiktoken decodes every special token to its text.
        self._hidden = frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0) if self.family == "llama2" else frozenset()
        logger.debug("Loaded Hugging Face tokenizer (%s, %d tokens) from %s", self.family, self.n_words, path)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        check_text(s)
        # Llama 3: the same cuts as Meta's tiktoken encoder, so that long runs give the same ids.
        pieces = meta_chunks(s) if self.family == "llama3" else [s]
        t: List[int] = []
        for piece in pieces:
            if piece:
                t.extend(self.model.encode(piece, add_special_tokens=False).ids)
        return self._with_bos_eos(t, bos, eos)

    def decode(self, t: Sequence[int]) -> str:
        ids = [i for i in t if i not in self._hidden] if self._hidden else list(t)
        return self.model.decode(ids, skip_special_tokens=False)


def _read_json(path: Path) -> dict:
    """The JSON object in path, or {} if there is no such file."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, expected a JSON object")
    return content


def _token_name(entry: object) -> Optional[str]:
    """A token's text from a tokenizer_config.json entry: a str, or an AddedToken dict with 'content'."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _bos_eos(path: Path, config: dict, vocab: Dict[str, int]) -> Tuple[str, str]:
    """Names of the BOS and EOS tokens: tokenizer_config.json's, else the defaults of the vocabulary."""
    bos, eos = _token_name(config.get("bos_token")), _token_name(config.get("eos_token"))
    config_path = path.parent / "tokenizer_config.json"
    for name, token in (("bos_token", bos), ("eos_token", eos)):
        if token is not None and token not in vocab:
            raise ValueError(f"{config_path} has {name}={token!r}, which is not in the vocabulary of {path}")
    for default_bos, default_eos in DEFAULT_BOS_EOS:
        if default_bos in vocab and default_eos in vocab:
            return bos or default_bos, eos or default_eos
    if bos is None or eos is None:
        raise ValueError(
            f"{path} has no BOS/EOS tokens we know (<|begin_of_text|>/<|end_of_text|> or <s>/</s>) and "
            f"{config_path} names none: add bos_token and eos_token to {config_path}"
        )
    return bos, eos


def _generation_eos_ids(path: Path, n_words: int) -> List[int]:
    """generation_config.json's eos_token_id (an int or a list), the ids a Hugging Face model stops on."""
    ids = _read_json(path).get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < n_words]
    if bad:
        raise ValueError(f"{path} has eos_token_id {bad}, outside the vocabulary of {n_words} tokens")
    return ids
