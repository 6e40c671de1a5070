"""The console scripts as a person uses them: the chat prompt loop through a pseudo-terminal, streamed examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from llama import Llama
from tests.conftest import ROOT

pexpect = pytest.importorskip("pexpect")

BIN = Path(sys.executable).parent
CHAT = [sys.executable, "-m", "llama.chat_cli", "--interactive", "--temperature", "0", "--dtype", "float32", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")


@pytest.fixture(scope="module")
def demo() -> Llama:
    """The bundled demo model, as the scripts load it with the flags above."""
    return Llama.build(max_seq_len=512, max_batch_size=8, device="cpu", dtype=torch.float32)


def spawn(args: List[str], timeout: float = 60) -> "pexpect.spawn":
    child = pexpect.spawn(args[0], args[1:], cwd=str(ROOT), env=ENV, encoding="utf-8", timeout=timeout)
    child.expect("You: ")
    return child


def reply(child: "pexpect.spawn", message: str) -> str:
    """Send a message; the streamed answer as printed (the terminal turns \\n into \\r\\n)."""
    child.sendline(message)
    child.expect("Assistant: ")
    child.expect("\r\n\r\nYou: ")
    return child.before.replace("\r\n", "\n")


def answer(demo: Llama, dialog: list, max_gen_len: int) -> str:
    return demo.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len)[0]["generation"]["content"]


def test_chat_loop_keeps_the_dialog_streams_greedy_answers_and_resets(demo: Llama) -> None:
    child = spawn([*CHAT, "--max_gen_len", "12"])
    first = reply(child, "Who made the heaven and the earth?")
    dialog = [{"role": "user", "content": "Who made the heaven and the earth?"}]
    assert first == answer(demo, dialog, 12)
    second = reply(child, "And what did he say?")
    dialog += [{"role": "assistant", "content": first}, {"role": "user", "content": "And what did he say?"}]
    assert second == answer(demo, dialog, 12)  # the dialog so far was sent, not the last message alone
    child.sendline("/reset")
    child.expect(r"\(a new dialog\)")
    child.expect("You: ")
    assert reply(child, "Who made the heaven and the earth?") == first
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_not_the_program_and_ctrl_d_exits(demo: Llama) -> None:
    child = spawn([*CHAT, "--max_gen_len", "400", "--system", "Speak as the prophets did."])
    child.sendline("Tell me of the kings of Israel.")
    child.expect("Assistant: ")
    child.expect(r"\S+ \S+ \S+")  # the answer is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("You: ")
    assert child.isalive()
    short = reply(child, "Who made the heaven and the earth?")  # the loop goes on, the stopped turn kept in the dialog
    assert short
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_exits_cleanly() -> None:
    child = spawn([*CHAT, "--max_gen_len", "4"])
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_oldest_turns_are_dropped_with_a_warning_when_the_dialog_outgrows_max_seq_len() -> None:
    child = spawn([*CHAT, "--max_gen_len", "16", "--max_seq_len", "96"])
    before_answers = []
    for _ in range(4):
        child.sendline("Tell me of the kings of Israel and of Judah, and of their wars.")
        child.expect("Assistant: ")
        before_answers.append(child.before)
        child.expect("You: ")
    assert "dropped the oldest" not in before_answers[0]
    assert any("dropped the oldest 1 exchange(s) of the dialog to fit max_seq_len=96" in text for text in before_answers[1:])
    child.sendline("x " * 200)  # alone longer than max_seq_len leaves room for
    child.expect("send a shorter one")
    child.expect("You: ")
    child.sendeof()
    child.expect(pexpect.EOF)


def test_example_streams_on_a_terminal_and_prints_the_same_text_as_when_piped() -> None:
    args = [sys.executable, "example_text_completion.py", "--prompt", "In the beginning", "--prompt", "And it came to pass",
            "--temperature", "0", "--max_gen_len", "24", "--dtype", "float32", "--quiet"]
    piped = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""  # --quiet: no summaries, no progress bar
    child = pexpect.spawn(args[0], args[1:], cwd=str(ROOT), env=ENV, encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert child.before.replace("\r\n", "\n") == piped.stdout
    assert piped.stdout.startswith("In the beginning\n> ") and piped.stdout.count("=" * 34) == 2


def test_a_progress_bar_shows_while_weights_load_on_a_terminal_and_not_with_quiet() -> None:
    args = [sys.executable, "example_text_completion.py", "--prompt", "A", "--max_gen_len", "2"]
    shown = pexpect.spawn(args[0], args[1:], cwd=str(ROOT), env=ENV, encoding="utf-8", timeout=60)
    shown.expect(pexpect.EOF)
    assert "loading weights" in shown.before and " tensors" in shown.before
    quiet = pexpect.spawn(args[0], [*args[1:], "--quiet"], cwd=str(ROOT), env=ENV, encoding="utf-8", timeout=60)
    quiet.expect(pexpect.EOF)
    assert "loading weights" not in quiet.before and quiet.before.startswith("A\r\n> ")


def test_console_scripts_are_installed() -> None:
    for name in ("llama-chat", "llama-complete"):
        done = subprocess.run([str(BIN / name), "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "--stop TEXT" in done.stdout, done.stderr
