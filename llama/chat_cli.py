"""``llama-chat`` (and example_chat_completion.py): answer the example dialogs, or chat in a prompt loop."""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable, List, Optional, Sequence, TextIO

from llama import cli, distributed
from llama.chat_format import Dialog
from llama.console import as_chunks, print_in_order
from llama.generation import Llama

logger = logging.getLogger(__name__)

EXAMPLE_DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "Paris has the Eiffel Tower, the Louvre and Notre-Dame, and walks along the Seine."},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [{"role": "system", "content": "Always answer with Haiku"}, {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "system", "content": "Always answer with emojis"}, {"role": "user", "content": "How to go from Beijing to NY?"}],
    [
        {
            "role": "system",
            "content": "You are a helpful, respectful and honest assistant. If you don't know the answer "
            "to a question, please don't share false information.",
        },
        {"role": "user", "content": "Write a brief birthday message to John"},
    ],
    [{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}],
]
SEPARATOR = "\n\n==================================\n\n"
DEFAULTS = dict(max_seq_len=512, max_batch_size=8, max_gen_len=None)
HELP = "Chat with the model. /reset starts a new dialog; Ctrl-C stops a reply; Ctrl-D (or /exit) quits."


def run(args: cli.CliArgs) -> None:
    """The prompt loop with --interactive, else the example dialogs with their answers."""
    cli.setup_logging(args)
    generator = Llama.build(**args.build_options())
    options = dict(max_gen_len=args.max_gen_len, temperature=args.temperature, top_p=args.top_p, stop=list(args.stop))
    if args.interactive:
        chat_loop(generator, system=args.system, **options)
        return
    dialogs = EXAMPLE_DIALOGS
    if args.streaming():
        chunks = generator.stream_chat_completion(dialogs, **options)
    else:
        chunks = as_chunks(result["generation"]["content"] for result in generator.chat_completion(dialogs, **options))

    def before(i: int) -> str:
        return "".join(f"{msg['role'].capitalize()}: {msg['content']}\n\n" for msg in dialogs[i]) + "> Assistant: "

    print_in_order(chunks, len(dialogs), before, lambda i: SEPARATOR)


def chat_loop(
    generator: Llama,
    system: Optional[str] = None,
    read: Callable[[str], str] = input,
    out: Optional[TextIO] = None,
    **options: object,
) -> None:
    """Read a message, stream the answer, keep the dialog; ``options`` go to ``stream_chat_completion``.

    When the dialog and room for an answer no longer fit max_seq_len, the oldest exchanges are dropped, with a warning.
    """
    out = out or sys.stdout
    if distributed.world_size() > 1:
        raise ValueError("the interactive chat runs in one process; run it without torchrun (any shard count loads on one process)")
    if not logger.isEnabledFor(logging.DEBUG):  # a tokens/s line after each answer would only interrupt the dialog
        logging.getLogger("llama.generation").setLevel(logging.WARNING)
    start: Dialog = [{"role": "system", "content": system}] if system else []
    dialog: Dialog = list(start)
    out.write(HELP + "\n")
    while True:
        try:
            line = read("\nYou: ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        message = line.strip()
        if message in ("/exit", "/quit"):
            return
        if message == "/reset":
            dialog = list(start)
            out.write("(a new dialog)\n")
            continue
        if not message:
            continue
        fitted = _fit(generator, dialog + [{"role": "user", "content": message}], options.get("max_gen_len"))
        if fitted is None:
            continue
        dialog = fitted
        out.write("Assistant: ")
        out.flush()
        answer = ""
        stream = generator.stream_chat_completion([dialog], **options)
        try:
            for chunk in stream:
                out.write(chunk["text"])
                out.flush()
                answer += chunk["text"]
        except KeyboardInterrupt:
            stream.close()
            out.write(" [stopped]")
        out.write("\n")
        dialog.append({"role": "assistant", "content": answer})


def _fit(generator: Llama, dialog: Dialog, max_gen_len: object) -> Optional[Dialog]:
    """The dialog with its oldest exchanges dropped until it leaves room for an answer within max_seq_len
    (None, with a warning, when its last message alone does not)."""
    max_seq_len = generator.model.params.max_seq_len
    room = max_gen_len if isinstance(max_gen_len, int) else max_seq_len // 4
    limit = max(1, max_seq_len - min(room, max_seq_len // 2))
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(system) :]
    dropped = 0
    while len(turns) > 1 and len(generator.encode_dialog(system + turns)) > limit:
        turns = turns[2:]  # one user message and its answer
        dropped += 1
    if dropped:
        logger.warning("dropped the oldest %d exchange(s) of the dialog to fit max_seq_len=%d", dropped, max_seq_len)
    n_tokens = len(generator.encode_dialog(system + turns))
    if n_tokens > limit:
        logger.warning(
            "this message is %d tokens with the system prompt, more than the %d that leave room for an answer within "
            "max_seq_len=%d; send a shorter one, or restart with a larger --max_seq_len", n_tokens, limit, max_seq_len,
        )
        return None
    return system + turns


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = cli.build_parser("Chat with a Llama checkpoint (--interactive), or answer the example dialogs.", chat=True, **DEFAULTS)
    run(cli.parse_args(parser, argv))


def run_example(**flags: object) -> None:
    """example_chat_completion.main: the flags as keyword arguments, the rest at their defaults."""
    defaults = dataclasses.asdict(cli.parse_args(cli.build_parser("", chat=True, **DEFAULTS), []))
    run(cli.CliArgs(**{**defaults, **flags}))


if __name__ == "__main__":
    main()
