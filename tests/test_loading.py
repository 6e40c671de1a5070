"""Llama.build: params.json, shard files, safe and lean loading, device and dtype choice, and their errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from llama import CheckpointError, InputError
from llama import devices
from tests.conftest import build, edit_params


def edit_shard(ckpt: Path, edit) -> None:
    path = ckpt / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_unknown_params_field_is_a_warning(ckpt_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    edit_params(ckpt_copy, vision_chunk_size=-1)  # a field of Meta's vision models, which this package does not run
    with caplog.at_level(logging.WARNING, logger="llama"):
        build(ckpt_copy)
    assert "ignoring unknown field 'vision_chunk_size'" in caplog.text


def test_vocab_size_that_disagrees_with_the_tokenizer_names_both(ckpt_copy: Path) -> None:
    edit_params(ckpt_copy, vocab_size=32000)
    with pytest.raises(CheckpointError, match=r"vocab_size=32000 but the tokenizer .* has 512 words"):
        build(ckpt_copy)


def test_explicit_vocab_size_that_agrees_loads(ckpt_copy: Path) -> None:
    edit_params(ckpt_copy, vocab_size=512)
    assert build(ckpt_copy).model.vocab_size == 512


def test_missing_params_json(ckpt_copy: Path) -> None:
    (ckpt_copy / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"params.json not found"):
        build(ckpt_copy)


def test_params_json_with_bad_value(ckpt_copy: Path) -> None:
    edit_params(ckpt_copy, n_heads=0)
    with pytest.raises(CheckpointError, match=r"params.json: n_heads must be an integer >= 1, got 0"):
        build(ckpt_copy)


def test_folder_without_shards(ckpt_copy: Path) -> None:
    (ckpt_copy / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint files \(\*.pth\) found in"):
        build(ckpt_copy)


def test_gap_in_shard_numbering_names_the_missing_shard(ckpt_copy: Path) -> None:
    (ckpt_copy / "consolidated.00.pth").rename(ckpt_copy / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"missing consolidated.00.pth, consolidated.01.pth"):
        build(ckpt_copy)


def test_missing_tensor_is_named(ckpt_copy: Path) -> None:
    edit_shard(ckpt_copy, lambda s: s.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth .*missing layers.1.feed_forward.w3.weight"):
        build(ckpt_copy)


def test_unexpected_tensor_is_named(ckpt_copy: Path) -> None:
    edit_shard(ckpt_copy, lambda s: s.update({"layers.2.attention.wq.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected layers.2.attention.wq.weight"):
        build(ckpt_copy)


def test_misshaped_tensor_names_both_shapes(ckpt_copy: Path) -> None:
    edit_shard(ckpt_copy, lambda s: s.update({"layers.0.attention.wk.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wk.weight in .* has shape \(64, 64\), expected \(32, 64\)"):
        build(ckpt_copy)


def test_rope_freqs_is_tolerated(ckpt_copy: Path, ckpt_dir: Path) -> None:
    edit_shard(ckpt_copy, lambda s: s.update({"rope.freqs": torch.zeros(8)}))
    prompt = [[1, 20, 30]]
    assert build(ckpt_copy).generate(prompt, 4, temperature=0) == build(ckpt_dir).generate(prompt, 4, temperature=0)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_and_not_run(ckpt_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    edit_shard(ckpt_copy, lambda s: s.update({"payload": _RunsCodeWhenUnpickled(marker)}))
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth holds objects other than tensors"):
        build(ckpt_copy)
    assert not marker.exists()


def test_file_that_is_not_a_checkpoint(ckpt_copy: Path) -> None:
    (ckpt_copy / "consolidated.00.pth").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth could not be read as a torch checkpoint"):
        build(ckpt_copy)


def test_missing_tokenizer(ckpt_copy: Path) -> None:
    (ckpt_copy / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer model .*tokenizer.model not found"):
        build(ckpt_copy)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_weights_are_private_memory_not_views_of_the_file(ckpt_copy: Path) -> None:
    """Same dtype on the CPU, where views were possible: every weight lies in anonymous memory, and the shard is unmapped.

    Guards the bus error (and silently swapped weights) of a model whose shard file is truncated or overwritten.
    """
    model = build(ckpt_copy).model
    mappings = []  # (start, end, pathname or "")
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        mappings.append((start, end, fields[5] if len(fields) == 6 else ""))
    shard = str(ckpt_copy / "consolidated.00.pth")
    assert not [m for m in mappings if m[2] == shard], f"{shard} is still mapped after Llama.build"
    params = dict(model.named_parameters())
    assert len(params) == 3 + 9 * model.n_layers and all(p.dtype == torch.float32 for p in params.values())
    for name, param in params.items():
        [(_, _, where)] = [m for m in mappings if m[0] <= param.data_ptr() < m[1]]
        assert not where.startswith("/"), f"{name} lies in a mapping of the file {where}"


def test_build_rejects_bad_sizes(ckpt_dir: Path) -> None:
    with pytest.raises(InputError, match=r"max_seq_len must be an integer >= 1, got 0"):
        build(ckpt_dir, max_seq_len=0)
    with pytest.raises(InputError, match=r"max_batch_size must be an integer >= 1, got -2"):
        build(ckpt_dir, max_batch_size=-2)
    with pytest.raises(InputError, match=r"model_parallel_size=2 must be a positive divisor of the world size 1"):
        build(ckpt_dir, model_parallel_size=2)


def test_device_and_dtype_accept_strings_and_torch_objects(ckpt_dir: Path) -> None:
    model = build(ckpt_dir, device=torch.device("cpu"), dtype="bfloat16").model
    assert model.output.weight.dtype == torch.bfloat16 and model.output.weight.device.type == "cpu"
    assert model.layers[0].attention.cache.k.dtype == torch.bfloat16
    assert build(ckpt_dir, device="cpu", dtype=torch.float16).model.output.weight.dtype == torch.float16


@pytest.mark.parametrize(
    "device, message",
    [("tpu", r"device='tpu' is not a torch device"), ("cuda:0", r"device='cuda:0' but CUDA is not available")],
)
def test_bad_device(device: str, message: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(InputError, match=message):
        devices.resolve_device(device)


def test_bad_dtype() -> None:
    with pytest.raises(InputError, match=r"dtype='int8' is not a floating dtype"):
        devices.resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(InputError, match=r"dtype=torch.int64 is not supported"):
        devices.resolve_dtype(torch.int64, torch.device("cpu"))


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_default_cpu_dtype_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native_bf16: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    assert devices.resolve_dtype(None, torch.device("cpu")) == expected


def test_default_device_without_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.resolve_device(None) == torch.device("mps")
