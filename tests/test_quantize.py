"""int8 and int4 weights (llama.quantize): the linear op, quality against float32, quantizing on load for any shard
layout and process count, peak memory, and the ``python -m llama.quantize`` command."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from llama import CheckpointError, InputError, Llama
from llama.args import ModelArgs
from llama.checkpoint import StateDict, full_shapes, load_checkpoint, load_shard, state_dict_for_rank, write_shards
from llama.demo import random_state_dict
from llama import quantize
from llama.quantize import (
    Quantizer,
    Scheme,
    dequantize_stored,
    linear,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    to_running,
    unpack_nibbles,
)
from llama.quantize.__main__ import quantize_checkpoint
from llama.tokenizer import Tokenizer
from tests import test_distributed
from tests.conftest import ROOT, build
from tests.test_file_safety import LINUX

# dim 256 with 2 layers; multiple_of 128 gives hidden 768, so that on 2 ranks the input slices of wo (128) and
# w2 (384) hold whole int4 groups of 64 and every layout quantizes alike.
PARAMS = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=128, norm_eps=1e-5, rope_theta=10000.0)
KINDS = ("int8", "int4")
# Prompts of 5 to 33 tokens.
PROMPTS = [[1] + torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in range(4, 36, 2)]
MAX_GEN_LEN = 8


def realistic_state_dict(args: ModelArgs, seed: int = 0) -> StateDict:
    """Weights with what makes real LLM weights hard to quantize: heavy tails (Student's t, 4 degrees of freedom) and
    a few input channels 4x larger than the rest (the outlier features of trained models).

    The layers' weights are half the usual scale and the output's four times, so that, like a trained model and
    unlike a random one, the logits are peaked and a small change of weights changes them little.
    """
    generator = torch.Generator().manual_seed(seed)
    outliers = torch.randperm(args.dim, generator=generator)[:4]
    state = random_state_dict(args, seed)  # the norms and the embedding as the demo checkpoint has them
    for key, shape in full_shapes(args).items():
        if len(shape) != 2 or key == "tok_embeddings.weight":
            continue
        chi2 = torch.randn(*shape, 4, generator=generator).pow(2).mean(-1)
        weight = torch.randn(shape, generator=generator) / chi2.sqrt() / math.sqrt(2.0)  # t(4), unit variance
        weight *= (4.0 if key == "output.weight" else 0.5) / math.sqrt(shape[1])
        if shape[1] == args.dim:
            weight[:, outliers] *= 4
        state[key] = weight
    return state


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Dict[int, Path]:
    """The same float32 weights as 1 and 2 shards."""
    args = ModelArgs.from_params(PARAMS, vocab_size=Tokenizer(tokenizer_path).n_words)
    state = realistic_state_dict(args)
    folders = {}
    for n_shards in (1, 2):
        folder = tmp_path_factory.mktemp(f"realistic_{n_shards}")
        (folder / "params.json").write_text(json.dumps(PARAMS))
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
        write_shards(folder, [state], args, n_shards)
        folders[n_shards] = folder
    return folders


@pytest.fixture(scope="module")
def args(tokenizer_path: Path) -> ModelArgs:
    return ModelArgs.from_params(PARAMS, vocab_size=Tokenizer(tokenizer_path).n_words)


def greedy(llama: Llama, prompts: List[List[int]] = PROMPTS[:4]) -> Tuple[list, list]:
    return llama.generate(prompts, MAX_GEN_LEN, temperature=0, logprobs=True)


def all_logits(llama: Llama) -> torch.Tensor:
    """Float32 logits at every position of every prompt, (positions, vocab)."""
    return torch.cat([llama.model.forward(torch.tensor([p]), 0)[0] for p in PROMPTS])


def assert_same_state(got: StateDict, want: StateDict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


# --- the linear op ---------------------------------------------------------------------------------------------


def heavy_tailed(out_features: int, in_features: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator) / torch.randn(out_features, in_features, generator=generator).abs().clamp(min=0.3)
    weight[:, 5] *= 10
    return weight / math.sqrt(in_features)


def stored(kind: str, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if kind == "int8":
        return quantize_int8(weight)
    q, scale = quantize_int4(weight, 64)
    return pack_nibbles(q), scale


# 128 and 48 rows: torch's packed CPU kernels (int4 packs rows by 64, then a partial block); 40 rows: not a multiple
# of 16, so int4 takes the plain layout CUDA and MPS use. 20 rows of activations: int8 converts the weight instead.
@pytest.mark.parametrize("out_features", [128, 48, 40])
@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_linear_equals_a_matmul_with_the_dequantized_weight(kind: str, dtype: torch.dtype, rows: int, out_features: int) -> None:
    weight, scale = stored(kind, heavy_tailed(out_features, 256))
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = linear(x, to_running("w.weight", weight, dtype), to_running("w.weight_scale", scale, dtype))
    want = x.double() @ dequantize_stored(weight, scale).double().T
    assert got.shape == (2, rows, out_features) and got.dtype == dtype
    # float32: summation order only; bfloat16: the output's own rounding (8 bits) and the scales' in the kernel.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.double() - want).abs().max() <= tolerance * want.abs().max()


def test_packing_int4_a_block_of_rows_at_a_time_equals_packing_the_whole_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """208 rows in blocks of 64: three whole blocks of the CPU kernel's layout, then a partial one of 16 rows."""
    weight, _ = stored("int4", heavy_tailed(208, 256))
    whole = torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(weight).to(torch.int32), 1)
    monkeypatch.setattr(quantize, "_CHUNK_ELEMENTS", 64 * 256)
    assert torch.equal(to_running("w.weight", weight, torch.float32), whole)
    assert torch.equal(Quantizer(Scheme("int4", 64), torch.float32)("w.weight", heavy_tailed(208, 256))["w.weight"], whole)


def test_quantized_values_stand_for_the_weight_within_half_a_step() -> None:
    weight = heavy_tailed(64, 256)
    q8, scale8 = quantize_int8(weight)
    assert (dequantize_stored(q8, scale8) - weight).abs().le(scale8.float()[:, None] / 2 * 1.01).all()
    q4, scale_zero = stored("int4", weight)
    step = scale_zero[..., 0].float().repeat_interleave(64, dim=1)
    assert (dequantize_stored(q4, scale_zero) - weight).abs().le(step / 2 * 1.01 + 1e-6).all()


# The prefill's calls: int8 only for the output, which gets the last position alone; int4 for every weight.
@pytest.mark.parametrize("kind, kernel, prefill_calls", [("int8", "_weight_int8pack_mm", 1), ("int4", "_weight_int4pack_mm_for_cpu", 15)])
def test_decode_runs_torchs_packed_cpu_kernel(
    kind: str, kernel: str, prefill_calls: int, realistic: Dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step through every linear weight (7 per layer and the output) is one call of the packed kernel. For a
    long prefill int8 converts its weights instead, which is faster for many rows; int4 keeps the kernel."""
    llama = build(realistic[1], dtype=torch.bfloat16, quantize=kind)
    calls = []
    original = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *a, **k: calls.append(a[1].shape) or original(*a, **k))
    llama.model.forward(torch.tensor([PROMPTS[-1]]), 0, last_logits_only=True)
    assert len(calls) == prefill_calls
    llama.model.forward(torch.tensor([[7]]), len(PROMPTS[-1]))
    assert len(calls) == prefill_calls + 7 * PARAMS["n_layers"] + 1


# --- quality ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_run(realistic: Dict[int, Path]) -> Tuple[torch.Tensor, List[List[int]]]:
    llama = build(realistic[1], max_seq_len=64, max_batch_size=len(PROMPTS))
    return all_logits(llama), llama.generate(PROMPTS, 1, temperature=0)[0]


# Measured on this model (int8; int4 in groups of 64): logits cosine similarity at least 0.9994 and 0.982; the argmax
# agrees at 97.5% and 77% of the 320 positions; the greedy next token after 15 and 12 of the 16 prompts; 8 greedy
# tokens are all the same for 10 and 5 of them (a random model's near-ties make one changed token change the rest).
@pytest.mark.parametrize("kind, min_cosine, min_argmax, min_next", [("int8", 0.99, 0.95, 0.85), ("int4", 0.95, 0.7, 0.6)])
def test_quantized_logits_stay_close_to_float32(
    kind: str, min_cosine: float, min_argmax: float, min_next: float, realistic: Dict[int, Path], float_run: Tuple[torch.Tensor, list]
) -> None:
    float_logits, float_tokens = float_run
    llama = build(realistic[1], max_seq_len=64, max_batch_size=len(PROMPTS), quantize=kind)
    assert llama.model.layers[0].attention.wq.weight.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    logits = all_logits(llama)
    assert not torch.equal(logits, float_logits)  # the weights really are quantized
    cosine = torch.nn.functional.cosine_similarity(logits, float_logits, dim=-1)
    assert cosine.min() >= min_cosine
    assert (logits.argmax(-1) == float_logits.argmax(-1)).float().mean() >= min_argmax
    tokens = llama.generate(PROMPTS, 1, temperature=0)[0]
    assert sum(t == f for t, f in zip(tokens, float_tokens)) >= min_next * len(PROMPTS)


# --- any shard layout, any process count -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_two_shards_quantize_on_load_exactly_as_one_shard(kind: str, realistic: Dict[int, Path], args: ModelArgs) -> None:
    assert_same_state(load_checkpoint(realistic[2], args, 1, 0, quantize=kind), load_checkpoint(realistic[1], args, 1, 0, quantize=kind))


@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_quantizes_its_slice_as_the_whole_tensor_is_quantized(kind: str, realistic: Dict[int, Path], args: ModelArgs) -> None:
    """A rank holding half of each row of wo and w2 takes int8 scales from the whole rows, not from its half."""
    scheme = Scheme(kind, 64 if kind == "int4" else None)
    shards = [load_shard(p) for p in sorted(realistic[2].glob("*.pth"))]
    whole = state_dict_for_rank(shards, args, 1, 0, convert=Quantizer(scheme))
    for rank in range(2):
        assert_same_state(state_dict_for_rank(shards, args, 2, rank, convert=Quantizer(scheme)), state_dict_for_rank([whole], args, 2, rank))


@pytest.fixture(scope="module")
def quantized_dirs(realistic: Dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The command's output: int4 written as 2 shards from the 1-shard folder (a subprocess), int8 as 1 shard."""
    out = tmp_path_factory.mktemp("quantized")
    command = [sys.executable, "-m", "llama.quantize", str(realistic[1]), str(out / "int4"), "--int4", "--mp", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    quantize_checkpoint(realistic[2], out / "int8", "int8", model_parallel_size=1)
    return {"int4": out / "int4", "int8": out / "int8"}


@pytest.mark.parametrize("kind", KINDS)
def test_command_output_loads_directly_and_equals_quantizing_on_load(
    kind: str, quantized_dirs: Dict[str, Path], realistic: Dict[int, Path], args: ModelArgs
) -> None:
    folder = quantized_dirs[kind]
    params = json.loads((folder / "params.json").read_text())
    assert params["quantization_args"] == ({"scheme": "int8_weight_only"} if kind == "int8" else {"scheme": "int4_weight_only", "group_size": 64})
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].dtype == (torch.int8 if kind == "int8" else torch.uint8)
    assert shard["tok_embeddings.weight"].dtype == torch.float32
    assert_same_state(load_checkpoint(folder, args, 1, 0), load_checkpoint(realistic[1], args, 1, 0, quantize=kind))
    assert greedy(build(folder)) == greedy(build(realistic[1], quantize=kind))


QUANTIZING_WORKER = """
import functools, sys, types
sys.path.insert(0, {root!r})
from llama import Llama
import tests.dist_worker as worker

run_case = worker.run_case

def quantizing_run_case(case, *args):
    # dist_worker builds with Llama.build's defaults; a case's "quantize" is passed on here.
    worker.Llama = types.SimpleNamespace(build=functools.partial(Llama.build, quantize=case.get("quantize")))
    return run_case(case, *args)

worker.run_case = quantizing_run_case
worker.main()
"""


@pytest.fixture(scope="module")
def two_processes(realistic: Dict[int, Path], quantized_dirs: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Dict[str, dict]:
    """One torchrun launch of 2 processes: quantizing on load from 2 shards, and the command's int4 (2 shards) and
    int8 (1 shard, cut in two) output."""
    tmp = tmp_path_factory.mktemp("two_processes")
    worker = tmp / "quantizing_worker.py"
    worker.write_text(QUANTIZING_WORKER.format(root=str(ROOT)))
    cases = [
        {"name": f"{kind} on load", "ckpt_dir": str(realistic[2]), "quantize": kind, "prompts": PROMPTS[:4], "max_gen_len": MAX_GEN_LEN}
        for kind in KINDS
    ] + [
        {"name": f"{kind} command", "ckpt_dir": str(quantized_dirs[kind]), "prompts": PROMPTS[:4], "max_gen_len": MAX_GEN_LEN}
        for kind in KINDS
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_distributed, "WORKER", str(worker))
        reports = test_distributed.torchrun(2, cases, tmp)
    for report in reports:
        assert report["error"] is None
        assert [report["results"][case["name"]]["tokens"] for case in cases] == [reports[0]["results"][case["name"]]["tokens"] for case in cases]
    return reports[0]["results"]


@pytest.mark.parametrize("case", ["int8 on load", "int4 on load", "int8 command", "int4 command"])
def test_two_processes_give_the_tokens_of_one_process_on_one_shard(case: str, two_processes: Dict[str, dict], realistic: Dict[int, Path]) -> None:
    tokens, logprobs = greedy(build(realistic[1], quantize=case.split()[0]))
    result = two_processes[case]
    assert result["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(result["logprobs"]), torch.tensor(logprobs), rtol=1e-4, atol=1e-4)


# --- memory ----------------------------------------------------------------------------------------------------


PEAK_RSS = """
import gc, json, os, sys, torch
from llama import Llama

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def build(ckpt, quantize):
    return Llama.build(ckpt, os.path.join(ckpt, "tokenizer.model"), 16, 1, device="cpu", dtype=torch.float32, quantize=quantize)

for kind in ("int8", "int4"):
    build(sys.argv[1], kind)  # imports, the process group and first uses: left out of the measure
growth = {}
for kind in ("int8", "int4"):
    for _ in range(2):  # the smaller of two: a busy machine (the whole suite running) once added 10% to one
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        rss_before = status("VmRSS")
        llama = build(sys.argv[2], kind)
        growth[kind] = min(growth.get(kind, float("inf")), status("VmHWM") - rss_before)
        del llama
print(json.dumps(growth))
"""

# About 104 MB of float32 weights, of which the largest tensor is 6.3 MB.
LARGE_PARAMS = dict(PARAMS, dim=768, n_layers=4, n_heads=12, n_kv_heads=4, multiple_of=256)


@LINUX
def test_quantizing_on_load_peaks_well_under_the_float_weights(realistic: Dict[int, Path], args: ModelArgs, tmp_path: Path) -> None:
    """Each tensor is quantized as soon as it is copied: loading never holds the float32 model."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    large = ModelArgs.from_params(LARGE_PARAMS, vocab_size=args.vocab_size)
    (tmp_path / "params.json").write_text(json.dumps(LARGE_PARAMS))
    shutil.copyfile(realistic[1] / "tokenizer.model", tmp_path / "tokenizer.model")
    write_shards(tmp_path, [random_state_dict(large)], large, 1)
    float_bytes = sum(4 * math.prod(shape) for shape in full_shapes(large).values())
    # glibc keeps freed temporaries in its heap, which RSS counts as used: a fixed mmap threshold returns them at once,
    # so that RSS follows the memory in use.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    command = [sys.executable, "-c", PEAK_RSS, str(realistic[1]), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    # Measured: 0.36x (int8) and 0.27x (int4): the weights kept (26% and 17% of float32, the embedding's 1.5% with
    # them) and, while a tensor is copied, its mapped pages, its float32 copy and its quantizer's temporaries.
    assert growth["int8"] < 0.45 * float_bytes, f"int8 load grew RSS by {growth['int8'] / float_bytes:.2f}x the float32 weights"
    assert growth["int4"] < 0.35 * float_bytes, f"int4 load grew RSS by {growth['int4'] / float_bytes:.2f}x the float32 weights"


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["int3", "INT8", "fp8", 8, True])
def test_bad_quantize_values_are_named_before_loading(value: object, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"quantize={value!r} is not supported; use None \(the run dtype\), 'int8' or 'int4'"):
        build(tmp_path / "no such checkpoint", quantize=value)  # refused before the folder is looked at


def test_a_quantized_checkpoint_refuses_another_kind(quantized_dirs: Dict[str, Path]) -> None:
    with pytest.raises(InputError, match=r"holds int8 weights .* cannot be loaded as quantize='int4'; pass quantize=None or 'int8'"):
        build(quantized_dirs["int8"], quantize="int4")


def test_int4_groups_cut_by_a_rank_slice_are_refused_naming_the_sizes_that_work(realistic: Dict[int, Path], args: ModelArgs, tmp_path: Path) -> None:
    """Groups of 128 inputs: on 4 ranks wo's slice is 64 inputs wide, which would cut every group in two."""
    quantize_checkpoint(realistic[1], tmp_path / "int4", "int4", group_size=128)
    assert load_checkpoint(tmp_path / "int4", args, 2, 1).keys()
    with pytest.raises(CheckpointError, match=r"groups of 128 inputs, but model_parallel_size=4 would cut groups in two \(attention.wo.weight slices of 64.*use model_parallel_size in \[1, 2\]"):
        load_checkpoint(tmp_path / "int4", args, 4, 0)
    with pytest.raises(CheckpointError, match=r"model_parallel_size=4 would cut groups"):
        quantize_checkpoint(realistic[1], tmp_path / "int4_4", "int4", group_size=128, model_parallel_size=4)


def test_quantizing_a_quantized_checkpoint_is_refused(quantized_dirs: Dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"quantization_args=.*is quantized already"):
        quantize_checkpoint(quantized_dirs["int8"], tmp_path / "again", "int4")
