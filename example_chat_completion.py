"""Answer a few dialogs: `torchrun --nproc_per_node N example_chat_completion.py --ckpt_dir ... --tokenizer_path ...`.

Runs under plain `python` too, and loads a checkpoint of any shard count on any number of processes. With no
checkpoint it runs the small demo model bundled with the package. `--interactive` chats in a prompt loop. `llama-chat` is the same command.
"""

from typing import Optional

from llama import chat_cli


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    **flags: object,
) -> None:
    """Meta's entry point, its flags as keyword arguments; ``flags`` takes the newer ones (stream, stop, quiet, ...)."""
    chat_cli.run_example(
        ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, temperature=temperature, top_p=top_p, max_seq_len=max_seq_len, max_batch_size=max_batch_size, max_gen_len=max_gen_len, device=device, dtype=dtype,
        **flags,
    )


if __name__ == "__main__":
    chat_cli.main()
