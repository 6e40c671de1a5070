"""``llama-complete`` (and example_text_completion.py): complete prompts from the command line."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

from llama import cli
from llama.console import as_chunks, print_in_order
from llama.generation import Llama

EXAMPLE_PROMPTS: List[str] = [
    # The expected answer is the natural continuation of the prompt.
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few-shot: a few examples before the one to complete.
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]
SEPARATOR = "\n\n==================================\n\n"
DEFAULTS = dict(max_seq_len=128, max_batch_size=4, max_gen_len=64)


def run(args: cli.CliArgs) -> None:
    """Complete ``args.prompt`` (else the example prompts) and print each prompt with its completion."""
    cli.setup_logging(args)
    generator = Llama.build(**args.build_options())
    prompts = list(args.prompt) or EXAMPLE_PROMPTS
    options = dict(max_gen_len=args.max_gen_len, temperature=args.temperature, top_p=args.top_p, stop=list(args.stop))
    if args.streaming():
        chunks = generator.stream_text_completion(prompts, **options)
    else:
        chunks = as_chunks(result["generation"] for result in generator.text_completion(prompts, **options))
    print_in_order(chunks, len(prompts), lambda i: f"{prompts[i]}\n> ", lambda i: SEPARATOR)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = cli.build_parser("Complete prompts with a Llama checkpoint (the examples when no --prompt is given).", **DEFAULTS)
    run(cli.parse_args(parser, argv))


def run_example(**flags: object) -> None:
    """example_text_completion.main: the flags as keyword arguments, the rest at their defaults."""
    defaults = dataclasses.asdict(cli.parse_args(cli.build_parser("", **DEFAULTS), []))
    run(cli.CliArgs(**{**defaults, **flags}))


if __name__ == "__main__":
    main()
