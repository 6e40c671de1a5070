"""Both example scripts end to end, as a user runs them (plain python, and torchrun on two processes), and their flags."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import pytest

from llama import cli
from tests.conftest import ROOT
from tests.dist_utils import free_port

SEPARATOR = "=================================="


def run(args: List[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def checkpoint_args(ckpt: Path) -> List[str]:
    return ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model")]


def test_text_completion_example(ckpt_dir: Path) -> None:
    # Fire's other spellings, still accepted: positional ckpt_dir and tokenizer_path, hyphens, --flag=value.
    done = run([sys.executable, "example_text_completion.py", str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), "--max-gen-len=8"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(SEPARATOR) == 4
    assert done.stdout.startswith("I believe the meaning of life is\n> ")  # nothing printed before the text
    assert f"loaded {ckpt_dir}: " in done.stderr and " parameters in bfloat16 on cpu, 1 process, in " in done.stderr
    assert "generated " in done.stderr and " tokens/s)" in done.stderr
    assert "initializing" not in done.stdout + done.stderr  # fairscale's prints are kept out of a plain run


def test_verbose_shows_what_a_plain_run_keeps_out_of_the_way(ckpt_dir: Path) -> None:
    done = run([sys.executable, "example_text_completion.py", str(ckpt_dir), "--max_gen_len", "2", "--prompt", "A", "--verbose"])
    assert done.returncode == 0, done.stderr
    assert "fairscale: > initializing model parallel with size 1" in done.stderr and "process group: backend gloo" in done.stderr
    assert done.stdout.startswith("A\n> ")


def test_chat_completion_example(ckpt_dir: Path) -> None:
    done = run([sys.executable, "example_chat_completion.py", *checkpoint_args(ckpt_dir), "--max_gen_len", "8", "--dtype", "float32"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(SEPARATOR) == 6
    assert "System: Always answer with Haiku\n\nUser: I am going to Paris, what should I see?\n\n> Assistant: " in done.stdout
    assert "> Assistant: Error: special tags are not allowed as part of the prompt." in done.stdout


def test_text_completion_example_under_torchrun_prints_once_and_matches_one_process(make_checkpoint: Callable[..., Path]) -> None:
    two_shards = make_checkpoint(n_shards=2)
    flags = [*checkpoint_args(two_shards), "--max_gen_len", "8", "--temperature", "0", "--dtype", "float32"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    distributed = run([*launcher, "example_text_completion.py", *flags])
    alone = run([sys.executable, "example_text_completion.py", *flags])
    assert distributed.returncode == 0, distributed.stderr
    assert distributed.stdout.count(SEPARATOR) == 4  # rank 1's stdout is silenced
    assert completions(distributed.stdout) == completions(alone.stdout)


def completions(stdout: str) -> List[str]:
    return stdout.splitlines()


def test_mistyped_flag_fails_at_once_naming_the_close_match(ckpt_dir: Path) -> None:
    """Fire ran the whole generation with defaults, then complained about --temprature."""
    done = run([sys.executable, "example_text_completion.py", *checkpoint_args(ckpt_dir), "--temprature", "0"], timeout=60)
    assert done.returncode == 2
    assert "unknown flag --temprature; did you mean --temperature?" in done.stderr
    assert "loaded " not in done.stderr and SEPARATOR not in done.stdout


def test_bad_value_fails_before_loading(ckpt_dir: Path) -> None:
    """Fire loaded the model first; only the generate call refused temperature=-1."""
    done = run([sys.executable, "example_chat_completion.py", *checkpoint_args(ckpt_dir), "--temperature", "-1"], timeout=60)
    assert done.returncode == 2
    assert "argument --temperature: invalid value '-1': expected a finite number >= 0" in done.stderr
    assert "loaded " not in done.stderr and SEPARATOR not in done.stdout


def test_help_lists_every_flag_with_its_type_and_default_in_plain_words() -> None:
    """Fire's --help showed max_gen_len, device and dtype as 'Type: Optional[Optional]'."""
    done = run([sys.executable, "example_chat_completion.py", "--help"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Optional[" not in done.stdout + done.stderr
    for shown in ("--ckpt_dir DIR", "--tokenizer_path FILE", "--temperature FLOAT", "--top_p FLOAT", "--max_seq_len INT",
                  "--max_gen_len INT", "--max_batch_size INT", "--device DEVICE", "--dtype DTYPE"):
        assert shown in done.stdout
    help_text = " ".join(done.stdout.split())  # argparse wraps lines
    for default in ("(default: 0.6)", "(default: 0.9)", "(default: 512)", "(default: max_seq_len - 1)", "(default: 8)"):
        assert default in help_text


def text_parser() -> argparse.ArgumentParser:
    return cli.build_parser("test", max_seq_len=128, max_batch_size=4, max_gen_len=64)


def chat_parser() -> argparse.ArgumentParser:
    return cli.build_parser("test", max_seq_len=512, max_batch_size=8, max_gen_len=None, chat=True)


def test_meta_command_line_parses_to_its_values(ckpt_dir: Path) -> None:
    tokenizer = str(ckpt_dir / "tokenizer.model")
    meta = ["--ckpt_dir", str(ckpt_dir), "--tokenizer_path", tokenizer, "--temperature", "0", "--top_p", "0.9",
            "--max_seq_len", "128", "--max_gen_len", "64", "--max_batch_size", "4"]
    expected = cli.CliArgs(str(ckpt_dir), tokenizer, 0.0, 0.9, 128, 64, 4, None, None)
    assert cli.parse_args(text_parser(), meta) == expected
    with_equals = [f"{flag}={value}" for flag, value in zip(meta[::2], meta[1::2])]
    assert cli.parse_args(text_parser(), with_equals) == expected
    hyphens = [arg.replace("_", "-") if arg.startswith("--") else arg for arg in meta]
    assert cli.parse_args(text_parser(), hyphens) == expected
    assert cli.parse_args(text_parser(), [str(ckpt_dir), tokenizer, "--temperature", "0"]) == expected
    # As with fire, a positional fills whichever of ckpt_dir, tokenizer_path has no flag.
    assert cli.parse_args(text_parser(), ["--ckpt_dir", str(ckpt_dir), tokenizer, "--temperature=0"]) == expected


def test_each_script_keeps_its_defaults_and_chat_max_gen_len_is_optional(ckpt_dir: Path) -> None:
    paths = [str(ckpt_dir), str(ckpt_dir / "tokenizer.model")]
    text = cli.parse_args(text_parser(), paths)
    assert (text.temperature, text.top_p, text.max_seq_len, text.max_gen_len, text.max_batch_size) == (0.6, 0.9, 128, 64, 4)
    chat = cli.parse_args(chat_parser(), [*paths, "--dtype", "bf16", "--device", "cpu"])
    assert (chat.max_seq_len, chat.max_gen_len, chat.max_batch_size, chat.dtype, chat.device) == (512, None, 8, "bf16", "cpu")
    assert cli.parse_args(chat_parser(), [*paths, "--max_gen_len", "None"]).max_gen_len is None  # fire's spelling
    assert cli.parse_args(chat_parser(), [*paths, "--max_gen_len", "0"]).max_gen_len == 0


def test_no_checkpoint_means_the_bundled_demo_and_no_tokenizer_the_folders_own(ckpt_dir: Path) -> None:
    assert cli.parse_args(text_parser(), []).build_options()["ckpt_dir"] is None
    assert cli.parse_args(text_parser(), [str(ckpt_dir)]).build_options()["tokenizer_path"] is None


def test_newer_flags_parse(ckpt_dir: Path) -> None:
    args = cli.parse_args(chat_parser(), ["--stop", "\n\n", "--stop=END", "--no-stream", "--quiet", "--interactive", "--system", "Be brief",
                                         "--quantize", "int8", "--compile"])
    assert (args.stop, args.stream, args.quiet, args.interactive, args.system) == (("\n\n", "END"), False, True, True, "Be brief")
    assert args.build_options()["quantize"] == "int8" and args.build_options()["compile"] == "default"
    assert cli.parse_args(text_parser(), ["--prompt", "A", "--prompt", "B", "--stream"]).prompt == ("A", "B")


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--temperature", "-1", "a finite number >= 0"),
        ("--temperature", "nan", "a finite number >= 0"),
        ("--top_p", "0", "a number in (0, 1]"),
        ("--top_p", "1.5", "a number in (0, 1]"),
        ("--max_seq_len", "0", "a positive integer"),
        ("--max_batch_size", "2.5", "a positive integer"),
        ("--max_gen_len", "-1", "an integer >= 0"),
        ("--max_gen_len", "None", "an integer >= 0"),  # optional in the chat script only
        ("--dtype", "float8", "one of bf16, bfloat16, float, float16, float32, fp16, fp32, half"),
        ("--device", "tpu", "is not a torch device"),
    ],
)
def test_bad_value_is_refused_naming_flag_value_and_expectation(
    ckpt_dir: Path, capsys: pytest.CaptureFixture, flag: str, value: str, expected: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(text_parser(), [*checkpoint_args(ckpt_dir), flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}: invalid value {value!r}" in error and expected in error


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--ckpt_dir", "{missing}", "--tokenizer_path", "{tokenizer}"], "argument --ckpt_dir: invalid value '{missing}' (no such folder)"),
        (["{tokenizer}", "{tokenizer}"], "argument --ckpt_dir: invalid value '{tokenizer}' (a file, not a folder)"),
        (["{ckpt}", "{ckpt}"], "argument --tokenizer_path: invalid value '{ckpt}' (a folder, not a file)"),
        (["{ckpt}", "{missing}"], "argument --tokenizer_path: invalid value '{missing}' (no such file)"),
        (["{ckpt}", "{tokenizer}", "extra"], "unexpected positional argument 'extra'"),
        (["{ckpt}", "{tokenizer}", "--max-seq-length", "9"], "unknown flag --max-seq-length; did you mean --max_seq_len?"),
        (["{ckpt}", "{tokenizer}", "--seed=3"], "unknown flag --seed; the flags are --help, --ckpt_dir"),
        (["{ckpt}", "{tokenizer}", "--max_seq", "9"], "unknown flag --max_seq; did you mean --max_seq_len?"),  # no prefix guessing
    ],
)
def test_bad_paths_and_flags_are_refused(ckpt_dir: Path, capsys: pytest.CaptureFixture, args: List[str], expected: str) -> None:
    names = {"ckpt": str(ckpt_dir), "tokenizer": str(ckpt_dir / "tokenizer.model"), "missing": str(ckpt_dir / "missing")}
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(text_parser(), [arg.format(**names) for arg in args])
    assert exit_info.value.code == 2
    assert expected.format(**names) in capsys.readouterr().err
