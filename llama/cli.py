"""Command-line flags of the example scripts (and of console scripts to come): one parser, every value checked before loading.

Meta's command lines keep working: ``--flag value``, ``--flag=value``, fire's hyphen spelling (``--max-seq-len``),
and ``ckpt_dir`` / ``tokenizer_path`` as the first two positional arguments.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from llama import devices
from llama.errors import InputError

# Positionals fill these, in this order, when their flags are not given (as fire did).
_POSITIONAL = ("ckpt_dir", "tokenizer_path")


@dataclass(frozen=True)
class CliArgs:
    """The checked flags, ready for ``Llama.build`` and the completion calls."""

    ckpt_dir: Optional[str]  # None: the bundled demo model
    tokenizer_path: Optional[str]  # None: the one in ckpt_dir
    temperature: float
    top_p: float
    max_seq_len: int
    max_gen_len: Optional[int]
    max_batch_size: int
    device: Optional[str]
    dtype: Optional[str]
    quantize: Optional[str] = None
    compile: Optional[str] = None  # None, "default" or "max-autotune"
    stop: Tuple[str, ...] = ()
    stream: Optional[bool] = None  # None: when printing to a terminal
    quiet: bool = False
    verbose: bool = False
    prompt: Tuple[str, ...] = ()  # text completion: prompts to complete instead of the examples
    interactive: bool = False  # chat: a prompt loop instead of the example dialogs
    system: Optional[str] = None  # chat: the system prompt of the prompt loop

    def build_options(self) -> Dict[str, Any]:
        """The keyword arguments of ``Llama.build`` these flags set."""
        names = ("ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "device", "dtype", "quantize", "compile")
        return {name: getattr(self, name) for name in names}

    def streaming(self) -> bool:
        return sys.stdout.isatty() if self.stream is None else self.stream


def _number(value: str, convert: Callable[[str], float], expected: str, ok: Callable[[float], bool]) -> float:
    try:
        number = convert(value)
    except ValueError:
        number = None
    if number is None or not ok(number):
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected {expected}")
    return number


def _optional(convert: Callable[[str], object]) -> Callable[[str], object]:
    """``convert``, but fire's literal ``None`` keeps the default of None."""

    def parse(value: str) -> object:
        return None if value in ("None", "none") else convert(value)

    return parse


def temperature(value: str) -> float:
    return _number(value, float, "a finite number >= 0 (0 decodes greedily)", lambda t: math.isfinite(t) and t >= 0)


def top_p(value: str) -> float:
    return _number(value, float, "a number in (0, 1]", lambda p: 0 < p <= 1)


def positive_int(value: str) -> int:
    return int(_number(value, int, "a positive integer", lambda n: n >= 1))


def non_negative_int(value: str) -> int:
    return int(_number(value, int, "an integer >= 0", lambda n: n >= 0))


def dtype_name(value: str) -> str:
    try:
        devices.resolve_dtype(value, torch.device("cpu"))
    except InputError:
        names = ", ".join(sorted(devices.DTYPE_NAMES))
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected one of {names}") from None
    return value


def device_name(value: str) -> str:
    try:
        devices.resolve_device(value)
    except InputError as e:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: {e}") from None
    return value


def existing_dir(value: str) -> str:
    if not os.path.isdir(value):
        what = "a file, not a folder" if os.path.exists(value) else "no such folder"
        raise argparse.ArgumentTypeError(f"invalid value {value!r} ({what}): expected the checkpoint folder")
    return value


def existing_file(value: str) -> str:
    if not os.path.isfile(value):
        what = "a folder, not a file" if os.path.isdir(value) else "no such file"
        raise argparse.ArgumentTypeError(f"invalid value {value!r} ({what}): expected the tokenizer file, e.g. tokenizer.model")
    return value


def setup_logging(args: CliArgs) -> None:
    """The package's one-line summaries on stderr (none with --quiet; its debug lines and library prints with --verbose)."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def build_parser(
    description: str,
    *,
    max_seq_len: int,
    max_batch_size: int,
    max_gen_len: Optional[int],
    temperature_default: float = 0.6,
    top_p_default: float = 0.9,
    prog: Optional[str] = None,
    chat: bool = False,
) -> argparse.ArgumentParser:
    """The flags every generation script shares, with this script's defaults; ``max_gen_len=None`` makes it optional.

    ``chat`` adds the chat flags (--interactive, --system), else the text-completion ones (--prompt).
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        usage="%(prog)s [--ckpt_dir DIR] [--tokenizer_path FILE] [flags]\n       %(prog)s DIR [FILE] [flags]",
        epilog="A flag may also be written --flag=value, or with hyphens (--max-seq-len 128).",
        allow_abbrev=False,  # a mistyped prefix is an error, not a silent guess
    )
    add = parser.add_argument
    add("--ckpt_dir", metavar="DIR", help="checkpoint folder: Meta's (params.json and shards) or Hugging Face's (config.json and "
        "safetensors); or the first positional argument (default: the small demo model bundled with the package)")
    add("--tokenizer_path", metavar="FILE", help="the tokenizer file, e.g. tokenizer.model; or the second positional argument "
        "(default: the one in the checkpoint folder)")
    add("--temperature", type=temperature, default=temperature_default, metavar="FLOAT",
        help=f"sampling temperature, a number >= 0; 0 decodes greedily (default: {temperature_default})")
    add("--top_p", type=top_p, default=top_p_default, metavar="FLOAT",
        help=f"nucleus sampling keeps the likeliest tokens up to this total probability, a number in (0, 1] (default: {top_p_default})")
    add("--max_seq_len", type=positive_int, default=max_seq_len, metavar="INT",
        help=f"longest prompt plus answer, in tokens, a positive integer (default: {max_seq_len})")
    if max_gen_len is None:
        add("--max_gen_len", type=_optional(non_negative_int), default=None, metavar="INT",
            help="most tokens to generate for each prompt, an integer >= 0 (default: max_seq_len - 1)")
    else:
        add("--max_gen_len", type=non_negative_int, default=max_gen_len, metavar="INT",
            help=f"most tokens to generate for each prompt, an integer >= 0 (default: {max_gen_len})")
    add("--max_batch_size", type=positive_int, default=max_batch_size, metavar="INT",
        help=f"most prompts decoded together, a positive integer (default: {max_batch_size})")
    add("--device", type=_optional(device_name), default=None, metavar="DEVICE",
        help="cpu, mps, cuda or cuda:N (default: cuda:LOCAL_RANK if CUDA is available, else mps, else cpu)")
    add("--dtype", type=_optional(dtype_name), default=None, metavar="DTYPE",
        help="float32, bfloat16 or float16 (also fp32, bf16, fp16, half) "
        "(default: the fastest the device computes well: bfloat16 on CUDA if supported, float16 on MPS)")
    add("--quantize", choices=("int8", "int4"), default=None, help="quantize the linear weights as they load")
    add("--compile", nargs="?", const="default", default=None, choices=("default", "max-autotune"),
        help="run the decode step through torch.compile (pays off for long generations); --compile max-autotune also "
        "times inductor's own GEMM kernels at compile time (slower to compile, faster on CPUs with AMX)")
    add("--stop", action="append", default=[], metavar="TEXT", help="end an answer where its text reaches TEXT (repeatable)")
    add("--stream", action=argparse.BooleanOptionalAction, default=None,
        help="print text as it is generated (default: when printing to a terminal)")
    add("--quiet", action="store_true", help="print only the generated text: no progress bar, no summaries")
    add("--verbose", action="store_true", help="also print the package's debug lines and its libraries' messages")
    if chat:
        add("--interactive", action="store_true", help="chat in a prompt loop instead of answering the example dialogs")
        add("--system", metavar="TEXT", default=None, help="system prompt of the --interactive chat")
    else:
        add("--prompt", action="append", default=[], metavar="TEXT", help="a prompt to complete instead of the examples (repeatable)")
    return parser


def _flags(parser: argparse.ArgumentParser) -> List[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _canonical(args: Sequence[str], flags: Sequence[str]) -> List[str]:
    """Fire's hyphen spelling (``--max-seq-len``) rewritten to the underscore flag; everything after ``--`` kept."""
    out: List[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        name, eq, value = arg.partition("=")
        underscored = "--" + name[2:].replace("-", "_")
        out.append(underscored + eq + value if arg.startswith("--") and underscored in flags else arg)
    return out


def _is_number(arg: str) -> bool:
    try:
        float(arg)
        return True
    except ValueError:
        return False


def _unknown_flag(arg: str, flags: Sequence[str]) -> str:
    name = arg.partition("=")[0]
    guess = difflib.get_close_matches("--" + name.lstrip("-").replace("-", "_"), flags, n=1)
    hint = f"did you mean {guess[0]}?" if guess else f"the flags are {', '.join(flags)}"
    return f"unknown flag {name}; {hint}"


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> CliArgs:
    """Parse and check ``argv`` (default ``sys.argv[1:]``); on a bad flag or value, print why and exit with status 2."""
    flags = _flags(parser)
    args = _canonical(sys.argv[1:] if argv is None else argv, flags)
    namespace, rest = parser.parse_known_args(args)
    unknown = [arg for arg in rest if arg.startswith("-") and arg != "--" and not _is_number(arg)]
    if unknown:
        parser.error("\n".join(_unknown_flag(arg, flags) for arg in unknown))
    positionals = [arg for arg in rest if arg != "--"]
    for name in _POSITIONAL:
        if getattr(namespace, name) is None and positionals:
            setattr(namespace, name, positionals.pop(0))
    if positionals:
        parser.error(f"unexpected positional argument {positionals[0]!r}; only ckpt_dir and tokenizer_path may be given without a flag")
    for name, check in (("ckpt_dir", existing_dir), ("tokenizer_path", existing_file)):
        value = getattr(namespace, name)
        try:
            if value is not None:
                check(value)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --{name}: {e}")
    if namespace.quiet and namespace.verbose:
        parser.error("--quiet and --verbose contradict each other; pass one")
    values = vars(namespace)
    for name in ("stop", "prompt"):
        if name in values:
            values[name] = tuple(values[name])
    return CliArgs(**values)
