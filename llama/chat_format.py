"""Chat formats (Llama 2's [INST] tags, Llama 3's headers): dialogs checked and turned into prompt tokens.

``chat_format_for(tokenizer)`` picks the format of a tokenizer's family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Literal, Optional, Sequence, TypedDict

from llama.errors import InputError

if TYPE_CHECKING:
    from llama.tokenizer import BaseTokenizer

Role = Literal["system", "user", "assistant", "ipython", "tool"]  # "ipython"/"tool": Llama 3 only


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


LLAMA3_ROLES = ("system", "user", "assistant", "ipython", "tool")
LLAMA3_ANSWERED = ("user", "ipython", "tool")  # the roles whose message the assistant answers


def _check_messages(dialog: Sequence[Message], where: str, roles: Sequence[str]) -> None:
    """Raise unless dialog is a non-empty list of {'role', 'content': str} dicts with roles among roles."""
    if not isinstance(dialog, (list, tuple)):
        raise TypeError(f"{where} must be a list of messages, got {type(dialog).__name__}")
    if not dialog:
        raise InputError(f"{where} is empty: a dialog needs at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise TypeError(f"{where}[{i}] must be a dict with 'role' and 'content', got {msg!r:.80}")
        if msg["role"] not in roles:
            raise InputError(f"{where}[{i}] has unknown role {msg['role']!r}; roles are {', '.join(map(repr, roles))}")
        if not isinstance(msg["content"], str):
            raise TypeError(f"{where}[{i}]['content'] must be a str, got {type(msg['content']).__name__}")


def check_dialog(dialog: Sequence[Message], index: Optional[int] = None) -> None:
    """Llama 2: raise ``InputError``/``TypeError`` unless dialog is (system?) then user/assistant alternating, ending with user."""
    where = "dialog" if index is None else f"dialogs[{index}]"
    _check_messages(dialog, where, ("system", "user", "assistant"))
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


def check_llama3_dialog(dialog: Sequence[Message], index: Optional[int] = None) -> None:
    """Raise ``InputError``/``TypeError`` unless dialog is (system?) then turns, ending with a message the assistant answers.

    Turns need not alternate (Llama 3.1 tool use runs user, assistant, ipython, assistant, ...); 'tool' is
    llama-models' name for 'ipython' and gets the same header.
    """
    where = "dialog" if index is None else f"dialogs[{index}]"
    _check_messages(dialog, where, LLAMA3_ROLES)
    for i, msg in enumerate(dialog[1:], 1):
        if msg["role"] == "system":
            raise InputError(f"{where}[{i}] has role 'system': only the first message of a dialog may be the system prompt")
    if dialog[-1]["role"] not in LLAMA3_ANSWERED:
        raise InputError(f"{where} must end with a 'user' (or 'ipython') message, got {dialog[-1]['role']!r}")


class ChatFormat:
    """A dialog format: ``check`` a dialog, say whether it ``refuses`` it, ``encode`` it into prompt tokens."""

    def __init__(self, tokenizer: "BaseTokenizer") -> None:
        self.tokenizer = tokenizer

    def check(self, dialog: Sequence[Message], index: Optional[int] = None) -> None:
        """Raise ``InputError``/``TypeError`` naming ``dialogs[index]`` when roles or order are wrong."""
        raise NotImplementedError

    def refuses(self, dialog: Sequence[Message]) -> bool:
        """True when the dialog is answered with ``UNSAFE_ERROR`` instead of being run."""
        return False

    def encode(self, dialog: Sequence[Message]) -> List[int]:
        """Prompt tokens of a checked dialog, ending where the assistant's answer begins."""
        raise NotImplementedError


class Llama2ChatFormat(ChatFormat):
    """Meta's Llama 2 format: [INST] ... [/INST] turns, each with BOS, <<SYS>> merged into the first; refuses its own tags."""

    def check(self, dialog: Sequence[Message], index: Optional[int] = None) -> None:
        check_dialog(dialog, index)

    def refuses(self, dialog: Sequence[Message]) -> bool:
        return has_special_tags(dialog)

    def encode(self, dialog: Sequence[Message]) -> List[int]:
        return encode_dialog(dialog, self.tokenizer.encode)


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 format, as llama-models' ``ChatFormat.encode_dialog_prompt`` builds it for text messages.

    <|begin_of_text|>, then per message <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, then the
    assistant's header. Content is stripped of surrounding whitespace, as Meta's llama3 reference and transformers'
    chat template do (llama-models 0.3 keeps it); special-token text in it is plain text, so nothing is refused.
    """

    def __init__(self, tokenizer: "BaseTokenizer") -> None:
        super().__init__(tokenizer)
        names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        missing = [name for name in names if name not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"the tokenizer has no special tokens {missing}, which Llama 3's chat format needs")
        self.begin, self.start_header, self.end_header, self.eot = (tokenizer.special_tokens[name] for name in names)

    def check(self, dialog: Sequence[Message], index: Optional[int] = None) -> None:
        check_llama3_dialog(dialog, index)

    def encode_header(self, role: str) -> List[int]:
        """<|start_header_id|>role<|end_header_id|> and a blank line; 'tool' is written 'ipython' as llama-models does."""
        role = "ipython" if role == "tool" else role
        encode = self.tokenizer.encode
        return [self.start_header] + encode(role, False, False) + [self.end_header] + encode("\n\n", False, False)

    def encode(self, dialog: Sequence[Message]) -> List[int]:
        tokens = [self.begin]
        for msg in dialog:
            tokens += self.encode_header(msg["role"]) + self.tokenizer.encode(msg["content"].strip(), False, False) + [self.eot]
        return tokens + self.encode_header("assistant")


def chat_format_for(tokenizer: "BaseTokenizer") -> ChatFormat:
    """The chat format of the tokenizer's family ('llama2' or 'llama3')."""
    if tokenizer.family == "llama3":
        return Llama3ChatFormat(tokenizer)
    return Llama2ChatFormat(tokenizer)
