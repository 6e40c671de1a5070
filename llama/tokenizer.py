"""The tokenizer interface, Llama 2's sentencepiece tokenizer, and ``load_tokenizer``, which reads a file's format from its content.

Llama 3's tiktoken tokenizer lives in ``tokenizer_tiktoken.py``, Hugging Face's ``tokenizer.json`` in ``tokenizer_hf.py``.
"""

from __future__ import annotations

import abc
import base64
import binascii
import logging
from pathlib import Path
from typing import Dict, FrozenSet, List, Literal, Sequence, Union

from sentencepiece import SentencePieceProcessor

from llama.errors import InputError

logger = logging.getLogger(__name__)

Family = Literal["llama2", "llama3"]

FORMATS_HINT = (
    "a tokenizer file is one of: a sentencepiece model (Llama 2's binary tokenizer.model, a protobuf starting with byte 0x0a), "
    "a tiktoken BPE file (Llama 3's tokenizer.model, text lines of '<base64 token> <rank>'), "
    "or a Hugging Face tokenizer.json (a JSON object with a 'model' entry)"
)


def check_text(s: object, who: str = "Tokenizer.encode") -> str:
    """s itself if it is a str that encodes to UTF-8; TypeError or InputError (naming the bad character) otherwise."""
    if not isinstance(s, str):
        raise TypeError(f"{who} takes a str, got {type(s).__name__}: {s!r:.80}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"text holds {s[e.start:e.end]!r} at index {e.start}, which is not valid Unicode (a lone surrogate); "
            "decode bytes with errors='replace' or 'surrogatepass' first"
        ) from None
    return s


class BaseTokenizer(abc.ABC):
    """What every tokenizer offers: ids of the special tokens, the stop set, encode and decode."""

    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1 where the vocabulary has no padding token
    stop_ids: FrozenSet[int]  # generation of a row ends at any of these
    special_tokens: Dict[str, int]  # name -> id of the special tokens the chat formats need
    family: Family  # picks the chat format

    @abc.abstractmethod
    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of s (special-token text in s is plain text), with BOS/EOS added when asked."""

    @abc.abstractmethod
    def decode(self, t: Sequence[int]) -> str:
        """Text of token ids; invalid UTF-8 byte sequences decode to U+FFFD."""

    def _with_bos_eos(self, t: List[int], bos: bool, eos: bool) -> List[int]:
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])


class Tokenizer(BaseTokenizer):
    """Encodes and decodes text with a sentencepiece ``tokenizer.model`` (Llama 2, CodeLlama)."""

    family: Family = "llama2"

    def __init__(self, model_path: Union[str, Path]) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found: pass the path of Meta's tokenizer.model as tokenizer_path")
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from e
        logger.debug("Loaded sentencepiece tokenizer from %s", path)

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path} defines no BOS or EOS piece (bos_id={self.bos_id}, eos_id={self.eos_id})")
        self.stop_ids: FrozenSet[int] = frozenset({self.eos_id})
        ids = [self.sp_model.unk_id(), self.bos_id, self.eos_id, self.pad_id]
        self.special_tokens: Dict[str, int] = {self.sp_model.id_to_piece(i): i for i in ids if i >= 0}

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        t = self.sp_model.encode(check_text(s))
        return self._with_bos_eos(t, bos, eos)

    def decode(self, t: Sequence[int]) -> str:
        return self.sp_model.decode(t)


def load_tokenizer(path: Union[str, Path]) -> BaseTokenizer:
    """The tokenizer in the file at path, its format read from the file's content.

    A folder stands for its ``tokenizer.model`` if it has one, else its ``tokenizer.json`` (Hugging Face folders).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(
                f"the folder {path} holds neither tokenizer.model nor tokenizer.json: pass the tokenizer file as tokenizer_path"
            )
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} not found: pass the path of Meta's tokenizer.model as tokenizer_path")
    kind = detect_format(path)
    if kind == "sentencepiece":
        return Tokenizer(path)
    if kind == "tiktoken":
        from llama.tokenizer_tiktoken import Llama3Tokenizer

        return Llama3Tokenizer(path)
    from llama.tokenizer_hf import HFTokenizer

    return HFTokenizer(path)


def detect_format(path: Path) -> Literal["sentencepiece", "tiktoken", "hf"]:
    """Which tokenizer format the file at path holds, from its first bytes; ValueError when none."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip().startswith(b"{"):  # the tokenizers library checks the rest (and names what is missing)
        return "hf"
    if _is_tiktoken_line(head.split(b"\n", 1)[0]):
        return "tiktoken"
    if head[:1] == b"\x0a":  # protobuf field 1 (ModelProto.pieces), length-delimited
        return "sentencepiece"
    raise ValueError(f"{path} is not a tokenizer file (it starts with {head[:16]!r}); {FORMATS_HINT}")


def _is_tiktoken_line(line: bytes) -> bool:
    """True for a line '<base64 token> <rank>', as in tiktoken BPE files."""
    parts = line.strip().split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True
