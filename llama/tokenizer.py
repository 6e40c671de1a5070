"""The sentencepiece tokenizer of Llama 2 checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Union

from sentencepiece import SentencePieceProcessor

from llama.errors import InputError

logger = logging.getLogger(__name__)


class Tokenizer:
    """Encodes and decodes text with a sentencepiece ``tokenizer.model``."""

    def __init__(self, model_path: Union[str, Path]) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found: pass the path of Meta's tokenizer.model as tokenizer_path")
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from e
        logger.info("Loaded sentencepiece tokenizer from %s", path)

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path} defines no BOS or EOS piece (bos_id={self.bos_id}, eos_id={self.eos_id})")

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(s).__name__}: {s!r:.80}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"text holds {s[e.start:e.end]!r} at index {e.start}, which is not valid Unicode (a lone surrogate); "
                "decode bytes with errors='replace' or 'surrogatepass' first"
            ) from None
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(t)


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """The tokenizer in the file at path, its format read from the file's content."""
    return Tokenizer(path)
