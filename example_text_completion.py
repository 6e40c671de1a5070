"""Complete a few prompts: `torchrun --nproc_per_node N example_text_completion.py --ckpt_dir ... --tokenizer_path ...`.

Runs under plain `python` too, and loads a checkpoint of any shard count on any number of processes.
"""

import dataclasses
import logging
from typing import List, Optional

from llama import Llama, cli


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
    )
    prompts: List[str] = [
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
    results = generator.text_completion(prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    parser = cli.build_parser("Complete a few prompts with a Llama checkpoint.", max_seq_len=128, max_batch_size=4, max_gen_len=64)
    main(**dataclasses.asdict(cli.parse_args(parser)))
