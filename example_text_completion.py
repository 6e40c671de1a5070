"""Complete a few prompts: `torchrun --nproc_per_node N example_text_completion.py --ckpt_dir ... --tokenizer_path ...`.

Runs under plain `python` too, and loads a checkpoint of any shard count on any number of processes. With no
checkpoint it runs the small demo model bundled with the package. `llama-complete` is the same command.
"""

from typing import Optional

from llama import complete_cli


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    **flags: object,
) -> None:
    """Meta's entry point, its flags as keyword arguments; ``flags`` takes the newer ones (stream, stop, quiet, ...)."""
    complete_cli.run_example(
        ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, temperature=temperature, top_p=top_p, max_seq_len=max_seq_len, max_gen_len=max_gen_len, max_batch_size=max_batch_size, device=device, dtype=dtype,
        **flags,
    )


if __name__ == "__main__":
    complete_cli.main()
