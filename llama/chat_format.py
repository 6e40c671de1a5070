"""Llama 2 chat format: dialogs checked and turned into prompt tokens."""

from __future__ import annotations

from typing import Callable, List, Literal, Optional, Sequence, TypedDict

from llama.errors import InputError

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

Encode = Callable[[str, bool, bool], List[int]]


def has_special_tags(dialog: Sequence[Message]) -> bool:
    """True when a message holds one of the tags the format itself uses (the reference refuses those)."""
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def check_dialog(dialog: Sequence[Message], index: Optional[int] = None) -> None:
    """Raise ``InputError``/``TypeError`` unless dialog is (system?) then user/assistant alternating, ending with user."""
    where = "dialog" if index is None else f"dialogs[{index}]"
    if not isinstance(dialog, (list, tuple)):
        raise TypeError(f"{where} must be a list of messages, got {type(dialog).__name__}")
    if not dialog:
        raise InputError(f"{where} is empty: a dialog needs at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise TypeError(f"{where}[{i}] must be a dict with 'role' and 'content', got {msg!r:.80}")
        if msg["role"] not in ("system", "user", "assistant"):
            raise InputError(f"{where}[{i}] has unknown role {msg['role']!r}; roles are 'system', 'user' and 'assistant'")
        if not isinstance(msg["content"], str):
            raise TypeError(f"{where}[{i}]['content'] must be a str, got {type(msg['content']).__name__}")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            position = i + len(dialog) - len(turns)
            raise InputError(
                f"{where}[{position}] has role {msg['role']!r} where {expected!r} was expected: "
                "a dialog is an optional 'system' message, then 'user' and 'assistant' alternating, starting with 'user'"
            )
    if not turns or turns[-1]["role"] != "user":
        raise InputError(f"{where} must end with a 'user' message, got {dialog[-1]['role']!r}")


def encode_dialog(dialog: Sequence[Message], encode: Encode) -> List[int]:
    """Prompt tokens of a checked dialog, exactly as Meta's ``chat_completion`` builds them."""
    messages = list(dialog)
    if messages[0]["role"] == "system":
        merged = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
        messages = [{"role": messages[1]["role"], "content": merged}] + messages[2:]
    tokens: List[int] = []
    for prompt, answer in zip(messages[::2], messages[1::2]):
        tokens += encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", True, True)
    tokens += encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", True, False)
    return tokens
