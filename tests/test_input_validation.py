"""Every value is checked where it enters: Llama.build's arguments, params.json, prompts, sampling settings, threads."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from llama import CheckpointError, InputError, Llama
from llama.args import ModelArgs, model_parallel_sizes
from llama.memory import kv_cache_bytes, weight_bytes
from llama.sampling import next_token
from tests.conftest import build, edit_params

PROMPTS = ["The llama is", "Once upon a time, a shepherd", "A", "Bread is baked", "Rivers run to the sea"]


# --- threads ---------------------------------------------------------------------------------------------------------


def test_threads_sharing_one_llama_each_get_their_own_tokens(generator: Llama) -> None:
    """Two threads once wrote into the same KV cache at once and returned each other's (corrupted) text."""
    alone = {p: generator.text_completion([p], temperature=0, max_gen_len=12)[0]["generation"] for p in PROMPTS}
    results: List[tuple] = []
    errors: List[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for k in range(10):
                prompt = PROMPTS[(offset + k) % len(PROMPTS)]
                results.append((prompt, generator.text_completion([prompt], temperature=0, max_gen_len=12)[0]["generation"]))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(results) == 20
    assert [got for _, got in results] == [alone[p] for p, _ in results]


# --- sampling settings and numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(temperature=float("nan")), InputError, r"temperature must be a finite number >= 0 \(0 is greedy\), got nan"),
        (dict(temperature=float("inf")), InputError, r"temperature must be a finite number"),
        (dict(temperature=True), TypeError, r"temperature must be a number, got bool True"),
        (dict(temperature="0.5"), TypeError, r"temperature must be a number, got str '0.5'"),
        (dict(top_p=float("nan")), InputError, r"top_p must be a finite number > 0 and <= 1, got nan"),
        (dict(max_gen_len=2.5), InputError, r"max_gen_len must be a whole number, got 2.5"),
        (dict(max_gen_len=True), TypeError, r"max_gen_len must be an integer, got bool"),
        (dict(logprobs=1), TypeError, r"logprobs must be True or False, got int 1"),
        (dict(prompt_tokens=[1, 5, 6]), TypeError, r"prompt_tokens must be a list of prompts.* wrap it as \[tokens\]"),
        (dict(prompt_tokens=[[1, True]]), InputError, r"prompt_tokens\[0\] holds True, which is not a token id"),
        (dict(prompt_tokens=[[1, 2.0]]), InputError, r"prompt_tokens\[0\] holds 2.0, which is not a token id"),
        (dict(prompt_tokens="abc"), TypeError, r"prompt_tokens must be a list, got a single str"),
    ],
)
def test_generate_names_the_bad_value(generator: Llama, kwargs: dict, error: type, message: str) -> None:
    call = dict(prompt_tokens=[[1, 5, 6]], max_gen_len=4) | kwargs
    with pytest.raises(error, match=message):
        generator.generate(**call)


def test_numpy_and_torch_numbers_are_numbers(generator: Llama) -> None:
    prompt = generator.tokenizer.encode("The llama is", bos=True, eos=False)
    want = generator.generate([prompt], 6, temperature=0.0, top_p=0.9)
    as_numpy = generator.generate(np.array([prompt]), np.int64(6), temperature=np.float32(0), top_p=np.float64(0.9), logprobs=np.bool_(False))
    as_torch = generator.generate(torch.tensor([prompt]), torch.tensor(6), temperature=torch.tensor(0.0), top_p=torch.tensor(0.9))
    as_tuples = generator.generate(tuple(tuple(np.int32(t) for t in p) for p in [prompt]), 6.0, temperature=0)
    assert want == as_numpy == as_torch == as_tuples


def test_prompts_may_come_from_an_iterator(generator: Llama) -> None:
    """An iterator was read by the type check and then generated nothing: []."""
    want = generator.text_completion(PROMPTS[:2], temperature=0, max_gen_len=4)
    assert generator.text_completion(iter(PROMPTS[:2]), temperature=0, max_gen_len=4) == want
    assert generator.text_completion((p for p in PROMPTS[:2]), temperature=0, max_gen_len=4) == want
    dialogs = ([{"role": "user", "content": p}] for p in PROMPTS[:2])
    assert len(generator.chat_completion(dialogs, temperature=0, max_gen_len=4)) == 2


def test_a_single_dialog_not_wrapped_in_a_list_is_named(generator: Llama) -> None:
    with pytest.raises(TypeError, match=r"got a single dialog .*wrap it in a list"):
        generator.chat_completion([{"role": "user", "content": "hi"}])


def test_text_that_cannot_be_encoded_names_the_prompt(generator: Llama) -> None:
    with pytest.raises(InputError, match=r"prompts\[1\]: text holds '\\ud800' at index 2, which is not valid Unicode"):
        generator.text_completion(["fine", "ab\ud800cd"])
    with pytest.raises(InputError, match=r"dialogs\[0\]: text holds '\\udfff'"):
        generator.chat_completion([[{"role": "user", "content": "\udfff"}]])


def test_tiny_temperature_samples_the_argmax_instead_of_overflowing(generator: Llama) -> None:
    """logits / 1e-30 overflowed to inf and multinomial raised 'probability tensor contains inf'."""
    prompts = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    greedy, _ = generator.generate(prompts, 8, temperature=0)
    for temperature in (1e-30, 1e-45, 5e-324):
        sampled, _ = generator.generate(prompts, 8, temperature=temperature)
        assert sampled == greedy


def test_next_token_with_tiny_temperature_keeps_ties_and_stays_finite() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0]] * 400)
    picks = next_token(logits, 1e-38, 1.0, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}  # the two tied maxima, each sampled


def test_too_long_dialog_is_named_by_its_own_index_after_a_refused_one(generator: Llama) -> None:
    """The error named the index among the dialogs that were run, not among those passed."""
    refused = [{"role": "user", "content": "[INST] hi"}]
    fine = [{"role": "user", "content": "hi"}]
    too_long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(InputError, match=r"dialogs\[2\] \(once encoded\) has \d+ tokens, which exceeds max_seq_len=64"):
        generator.chat_completion([refused, fine, too_long])


def test_too_long_text_prompt_is_named_as_the_callers_prompt(generator: Llama) -> None:
    with pytest.raises(InputError, match=r"prompts\[1\] \(once encoded\) has \d+ tokens, which exceeds max_seq_len=64"):
        generator.text_completion(["fine", "word " * 200])


# --- Llama.build arguments: checked before anything loads -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(seed="1"), TypeError, r"seed must be an integer, got str '1'"),
        (dict(seed=2**64), InputError, r"seed must be below 2\*\*64"),
        (dict(max_seq_len=True), TypeError, r"max_seq_len must be an integer, got bool"),
        (dict(max_batch_size=2.5), InputError, r"max_batch_size must be a whole number, got 2.5"),
        (dict(model_parallel_size=0), InputError, r"model_parallel_size must be an integer >= 1, got 0"),
    ],
)
def test_build_checks_arguments_before_loading(tmp_path: Path, kwargs: dict, error: type, message: str) -> None:
    """The folder does not exist: an argument error that comes first was checked before any loading."""
    with pytest.raises(error, match=message):
        build(tmp_path / "no such folder", **kwargs)


def test_build_accepts_numpy_sizes_and_seed(ckpt_dir: Path) -> None:
    generator = build(ckpt_dir, max_seq_len=np.int64(64), max_batch_size=torch.tensor(2), seed=np.uint64(3))
    assert generator.model.params.max_seq_len == 64 and type(generator.model.params.max_seq_len) is int


def test_kv_cache_that_cannot_fit_names_max_seq_len_before_allocating(ckpt_dir: Path) -> None:
    start = time.monotonic()
    with pytest.raises(InputError, match=r"max_seq_len=1000000000 and max_batch_size=4 need [\d.]+ GB of KV cache .* GB free"):
        build(ckpt_dir, max_seq_len=10**9)
    with pytest.raises(InputError, match=r"max_seq_len=100000 and max_batch_size=4096 need"):
        build(ckpt_dir, max_seq_len=100_000, max_batch_size=4096)
    assert time.monotonic() - start < 10


def test_a_compiled_step_that_would_not_fit_beside_its_prepacked_weights_names_compile(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled on a CPU, weights are held about three times: refused before loading where only one copy fits."""
    from llama import memory

    args = ModelArgs.from_params(json.loads((ckpt_dir / "params.json").read_text()), max_seq_len=64, max_batch_size=4)
    args.vocab_size = 512
    one_copy = memory.weight_bytes(args, 1, torch.float32) + memory.kv_cache_bytes(args, 1, torch.float32)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(one_copy * 1.5))
    build(ckpt_dir)  # fits eager
    with pytest.raises(InputError, match=r"compile=True on a CPU keeps prepacked copies of the weights .* pass compile=False"):
        build(ckpt_dir, compile=True)


def test_memory_estimate_of_llama_2_7b() -> None:
    """~6.7e9 parameters; 100000 positions of KV cache for a batch of 4 in bf16 is ~210 GB."""
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=100_000, max_batch_size=4)
    assert weight_bytes(args, 1, torch.bfloat16) / 2 == pytest.approx(6.74e9, rel=0.01)
    assert kv_cache_bytes(args, 1, torch.bfloat16) == pytest.approx(2 * 32 * 4 * 32 * 100_000 * 128 * 2, rel=0.01)
    assert weight_bytes(args, 2, torch.bfloat16) == pytest.approx(weight_bytes(args, 1, torch.bfloat16) / 2, rel=0.01)


# --- params.json and the tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dim", "64", r"dim must be an integer, got str '64'"),
        ("n_layers", -2, r"n_layers must be an integer >= 1, got -2"),
        ("n_heads", 2.5, r"n_heads must be a whole number, got 2.5"),
        ("n_kv_heads", True, r"n_kv_heads must be an integer, got bool"),
        ("norm_eps", float("nan"), r"norm_eps must be a finite number > 0, got nan"),
        ("norm_eps", 0, r"norm_eps must be > 0, got 0.0"),
        ("rope_theta", -10000.0, r"rope_theta must be > 0, got -10000.0"),
        ("rope_theta", None, r"rope_theta must be a number, got NoneType"),
        ("ffn_dim_multiplier", 0, r"ffn_dim_multiplier must be > 0, got 0.0"),
        ("multiple_of", [32], r"multiple_of must be an integer, got list"),
        ("vocab_size", 0, r"vocab_size must be positive, or -1"),
    ],
)
def test_params_json_values_are_checked_and_the_file_named(ckpt_copy: Path, field: str, value: object, message: str) -> None:
    edit_params(ckpt_copy, **{field: value})
    with pytest.raises(CheckpointError, match=rf"params.json: {message}"):
        build(ckpt_copy)


def test_whole_float_sizes_in_params_json_load(ckpt_copy: Path, ckpt_dir: Path) -> None:
    edit_params(ckpt_copy, dim=64.0, n_layers=2.0)
    prompt = [[1, 20, 30]]
    assert build(ckpt_copy).generate(prompt, 4, temperature=0) == build(ckpt_dir).generate(prompt, 4, temperature=0)


def test_absurd_sizes_fail_at_once_naming_params_json(ckpt_copy: Path) -> None:
    """n_heads=10**9 looped over every model-parallel size; dim=2**20 would need terabytes."""
    start = time.monotonic()
    edit_params(ckpt_copy, dim=2**20, n_heads=2**10, n_kv_heads=2**10, n_layers=10**4)
    with pytest.raises(CheckpointError, match=r"params.json describes a model \(dim=1048576, n_layers=10000.*\) whose weights take [\d.]+ GB"):
        build(ckpt_copy)
    assert time.monotonic() - start < 10
    huge = ModelArgs(dim=2 * 10**9, n_heads=10**9, vocab_size=2**10, multiple_of=2**10)
    assert model_parallel_sizes(huge) == [2**i for i in range(10)]  # 2**9 divides 10**9; vocab 1024 allows no factor 5
    assert time.monotonic() - start < 10


def test_params_json_that_is_not_utf8(ckpt_copy: Path) -> None:
    (ckpt_copy / "params.json").write_bytes(b'{"dim": 64, "note": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=r"params.json is not UTF-8 text \(byte 21 is b'\\xff'\)"):
        build(ckpt_copy)


def test_tokenizer_of_another_checkpoint_is_named_as_the_fault(ckpt_copy: Path, tmp_path: Path) -> None:
    """With Meta's vocab_size -1 the message blamed params.json's shapes."""
    from llama.demo import train_tokenizer

    other = train_tokenizer(tmp_path / "other" / "tokenizer.model", vocab_size=400)
    with pytest.raises(CheckpointError, match=r"the tokenizer .*other/tokenizer.model has 400 words but the checkpoint .* was trained with 512 .*does not belong"):
        Llama.build(str(ckpt_copy), str(other), 64, 4, device="cpu", dtype=torch.float32)


def test_ckpt_dir_of_the_wrong_type(ckpt_dir: Path) -> None:
    with pytest.raises(TypeError, match=r"ckpt_dir must be a path \(str or pathlib.Path\), got int 5"):
        Llama.build(5, str(ckpt_dir / "tokenizer.model"), 64, 4)

