"""Every checkpoint format: Llama 3 (scaled RoPE, vocabulary-split embeddings), CodeLlama, Hugging Face folders, and
``llama.convert`` between Meta's format and HF's, each against transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llama import CheckpointError, ModelArgs, Transformer, distributed
from llama.checkpoint import StateDict, load_checkpoint, load_rank, state_dict_for_rank, write_shards
from llama.convert import convert
from llama.demo import random_state_dict
from llama.formats import HF, META, detect_format, hf, read_args, read_shards
from llama.model import precompute_rope
from llama.reshard import reshard
from tests.test_checkpoint_sharding import assert_same_tensors, run_module

# Llama 3.1-shaped, tiny: Llama 3's vocabulary and rope_theta, GQA, ffn_dim_multiplier, scaled RoPE.
LLAMA3 = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, ffn_dim_multiplier=1.3,
              norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
# The same scaling over an original context of 16 positions, so that it changes logits of a 24-token prompt.
SHORT_CONTEXT = dict(LLAMA3, rope_original_max_seq_len=16)
CODELLAMA = dict(dim=64, n_layers=2, n_heads=4, vocab_size=32016, multiple_of=32, norm_eps=1e-5, rope_theta=1e6)
SEQLEN = 24


def llama3_tokenizer() -> Path:
    """The real Llama 3 tokenizer.model (128256 words), shipped by the llama-models package (a test extra)."""
    llama_models = pytest.importorskip("llama_models")
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def model_of(args: ModelArgs, state: StateDict) -> Transformer:
    distributed.init_process_group(torch.device("cpu"))
    distributed.init_model_parallel(1)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True, strict=True)
    model.setup_caches(2, SEQLEN, torch.device("cpu"), torch.float32)
    return model


def hf_reference(args: ModelArgs, state: StateDict, tie: bool = False) -> LlamaForCausalLM:
    """transformers' Llama on a Meta state dict, configured by hand from args (not by llama.formats.hf)."""
    scaling = args.rope_scaling
    rope = None if scaling is None else dict(
        rope_type="llama3", factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor, original_max_position_embeddings=scaling.original_max_seq_len,
    )
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, rope_scaling=rope, max_position_embeddings=131072, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).float().eval()
    hf_state = hf.to_hf_state_dict(state, args)
    if tie:
        del hf_state["lm_head.weight"]
    model.load_state_dict(hf_state, strict=not tie)
    return model


def tokens(vocab_size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQLEN), generator=torch.Generator().manual_seed(seed))


def hf_logits(model: LlamaForCausalLM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def meta_folder(path: Path, params: dict, state: StateDict, n_shards: int = 1, tokenizer: Optional[Path] = None) -> Path:
    args = ModelArgs.from_params(params)
    write_shards(path, [state], args, n_shards)
    (path / "params.json").write_text(json.dumps(params))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def llama3() -> tuple[ModelArgs, StateDict]:
    args = ModelArgs.from_params(LLAMA3, max_seq_len=SEQLEN)
    return args, random_state_dict(args, seed=3)


def test_scaled_rope_frequencies_are_meta_llama3_and_transformers_llama3() -> None:
    """Llama 3.1 8B's RoPE (head_dim 128, theta 500000, factor 8) against transformers' "llama3" rope_type."""
    args = ModelArgs.from_params(dict(dim=4096, n_heads=32, rope_theta=500000.0, use_scaled_rope=True))
    cos, sin = precompute_rope(args.head_dim, 2, args.rope_theta, scaling=args.rope_scaling)
    ours = torch.atan2(sin[1], cos[1])  # position 1's angle is the frequency itself
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert (theirs < plain).sum() > 20  # the scaling is not a no-op here: long wavelengths slowed


@pytest.mark.parametrize("params", [LLAMA3, SHORT_CONTEXT, CODELLAMA], ids=["llama3.1", "scaling-in-reach", "codellama"])
def test_logits_equal_transformers(params: dict) -> None:
    args = ModelArgs.from_params(params, max_seq_len=SEQLEN)
    state = random_state_dict(args, seed=2)
    x = tokens(args.vocab_size)
    torch.testing.assert_close(model_of(args, state).forward(x, 0), hf_logits(hf_reference(args, state), x), atol=2e-5, rtol=1e-5)


def test_hf_folder_written_by_transformers_with_tied_embeddings_and_index(tmp_path: Path) -> None:
    """A Llama 3.2-style folder (no lm_head tensor, tie_word_embeddings) in several safetensors files with an index."""
    args = ModelArgs.from_params(SHORT_CONTEXT, max_seq_len=SEQLEN)
    state = random_state_dict(args, seed=4)
    reference = hf_reference(args, state, tie=True)
    reference.save_pretrained(tmp_path, max_shard_size="20MB")
    assert (tmp_path / hf.INDEX).is_file() and "lm_head.weight" not in json.loads((tmp_path / hf.INDEX).read_text())["weight_map"]
    assert detect_format(tmp_path) == HF
    loaded, _ = read_args(tmp_path, HF, max_seq_len=SEQLEN)
    assert (loaded.hidden_dim, loaded.rope_scaling) == (args.hidden_dim, args.rope_scaling)
    ours = model_of(loaded, load_rank(read_shards(tmp_path, HF, loaded), str(tmp_path), loaded, 1, 0))
    x = tokens(args.vocab_size)
    torch.testing.assert_close(ours.forward(x, 0), hf_logits(reference, x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n_ranks", [2, 4])
def test_each_rank_reads_its_slice_of_an_hf_folder(n_ranks: int, llama3: tuple, tmp_path: Path) -> None:
    """q and k rows are un-permuted head by head: a rank holding some heads gets Meta's rows for exactly those."""
    args, state = llama3
    hf_dir = tmp_path / "hf"
    convert(meta_folder(tmp_path / "meta", LLAMA3, state), hf_dir, "hf")
    shards = read_shards(hf_dir, HF, args)
    for rank in range(n_ranks):
        assert_same_tensors(load_rank(shards, str(hf_dir), args, n_ranks, rank), state_dict_for_rank([state], args, n_ranks, rank))


def test_convert_meta_to_hf_loads_in_transformers_and_back_to_meta_unchanged(llama3: tuple, tmp_path: Path) -> None:
    args, state = llama3
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    convert(meta_folder(tmp_path / "meta", LLAMA3, state), hf_dir, "hf", max_file_bytes=20 * 2**20)
    assert len(list(hf_dir.glob("*.safetensors"))) > 1 and (hf_dir / hf.INDEX).is_file()
    config = json.loads((hf_dir / hf.CONFIG).read_text())
    assert config["rope_scaling"] == dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)
    assert config["tie_word_embeddings"] is False and config["intermediate_size"] == args.hidden_dim
    x = tokens(args.vocab_size)
    reference = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(reference, x), model_of(args, state).forward(x, 0), atol=2e-5, rtol=1e-5)
    run = run_module("llama.convert", hf_dir, back, "--to", "meta", "--mp", 2)
    assert run.returncode == 0, run.stderr
    back_args, _ = read_args(back, META)
    assert back_args.hidden_dim == args.hidden_dim and back_args.rope_scaling == args.rope_scaling
    assert_same_tensors(load_checkpoint(back, back_args, 1, 0), state)


def test_tied_meta_checkpoint_converts_to_a_tied_hf_folder(tmp_path: Path) -> None:
    args = ModelArgs.from_params(LLAMA3, max_seq_len=SEQLEN)
    state = random_state_dict(args, seed=5)
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    convert(meta_folder(tmp_path / "meta", LLAMA3, state), tmp_path / "hf", "hf")
    assert json.loads((tmp_path / "hf" / hf.CONFIG).read_text())["tie_word_embeddings"] is True
    x = tokens(args.vocab_size)
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(reference, x), model_of(args, state).forward(x, 0), atol=2e-5, rtol=1e-5)


def test_llama3_shards_split_the_embedding_by_vocabulary_and_load_on_any_rank_count(llama3: tuple, tmp_path: Path) -> None:
    args, state = llama3
    two = meta_folder(tmp_path / "two", LLAMA3, state, n_shards=2)
    embedding = torch.load(two / "consolidated.00.pth", weights_only=True, mmap=True)["tok_embeddings.weight"]
    assert embedding.shape == (args.vocab_size // 2, args.dim)  # as Meta's VocabParallelEmbedding writes it
    for n_ranks in (1, 2, 4):
        for rank in range(n_ranks):
            assert_same_tensors(load_checkpoint(two, args, n_ranks, rank), state_dict_for_rank([state], args, n_ranks, rank))


@pytest.mark.parametrize("split, shape", [(None, (128256 // 4, 64)), ("dim", (128256, 16))])
def test_reshard_keeps_the_vocabulary_split_unless_asked(split: Optional[str], shape: tuple, llama3: tuple, tmp_path: Path) -> None:
    args, state = llama3
    two = meta_folder(tmp_path / "two", LLAMA3, state, n_shards=2)
    out = tmp_path / "four"
    reshard(two, out, 4, None if split is None else {"dim": 1, "vocab": 0}[split])
    assert torch.load(out / "consolidated.03.pth", weights_only=True, mmap=True)["tok_embeddings.weight"].shape == shape
    for rank in (0, 3):
        assert_same_tensors(load_checkpoint(out, args, 4, rank), state_dict_for_rank([state], args, 4, rank))


def test_missing_last_shard_of_a_vocabulary_split_checkpoint_is_named(llama3: tuple, tmp_path: Path) -> None:
    args, state = llama3
    four = meta_folder(tmp_path / "four", LLAMA3, state, n_shards=4)
    (four / "consolidated.03.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"is one of 4 shards \(its tok_embeddings.weight holds 32064 of vocab_size=128256 rows\).*missing consolidated.03.pth"):
        load_checkpoint(four, args, 1, 0)


def test_build_on_meta_llama3_shards_and_hf_folder_give_the_same_tokens(llama3: tuple, tmp_path: Path) -> None:
    """Llama.build with tokenizer_path=None on a 1-shard, a 2-shard (vocabulary-split) and an HF folder; int8 too."""
    from llama import Llama

    args, state = llama3
    tokenizer = llama3_tokenizer()
    one = meta_folder(tmp_path / "one", LLAMA3, state, tokenizer=tokenizer)
    two = meta_folder(tmp_path / "two", LLAMA3, state, n_shards=2, tokenizer=tokenizer)
    convert(one, tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    prompt = [[128000, 791, 4062, 14198, 39935]]
    runs: Dict[str, list] = {}
    for name, folder, quantize in [("one", one, None), ("two", two, None), ("hf", tmp_path / "hf", None),
                                   ("one-int8", one, "int8"), ("hf-int8", tmp_path / "hf", "int8")]:
        generator = Llama.build(str(folder), None, 32, 1, device="cpu", dtype=torch.float32, quantize=quantize)
        runs[name] = generator.generate(prompt, 8, temperature=0, logprobs=True)
    assert runs["one"] == runs["two"] == runs["hf"]
    assert runs["one-int8"] == runs["hf-int8"]


def test_folder_of_no_known_format_names_what_it_holds_and_what_each_format_needs(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "params.json").write_text("{}")
    message = (r"holds original/, pytorch_model.bin\. Meta's format needs params.json and consolidated.NN.pth shards; "
               r"Hugging Face's needs config.json and \*.safetensors .*original holds Meta's format: pass that folder")
    with pytest.raises(CheckpointError, match=message):
        detect_format(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_type 'yarn'; only Llama 3.1's 'llama3'"),
    (dict(model_type="mistral"), "model_type='mistral'; only Llama checkpoints"),
    (dict(attention_bias=True), "attention_bias not supported"),
    (dict(head_dim=32), "head_dim=32, not hidden_size / num_attention_heads = 16"),
])
def test_config_json_the_model_cannot_run_is_refused(change: dict, message: str) -> None:
    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512, intermediate_size=192)
    assert hf.args_from_config(config).hidden_dim == 192
    with pytest.raises(CheckpointError, match=re.escape(message)):
        hf.args_from_config({**config, **change})


@pytest.mark.parametrize("dim, hidden, expected", [
    (4096, 11008, {"multiple_of": 256}),  # Llama 2 7B
    (4096, 14336, {"ffn_dim_multiplier": 1.3, "multiple_of": 2048}),  # Llama 3 8B (Meta writes 1024: the same size)
    (2048, 8192, {"multiple_of": 4096}),  # Llama 3.2 1B (Meta writes ffn_dim_multiplier 1.5, multiple_of 256)
    (64, 100, {"ffn_hidden_dim": 100}),
])
def test_params_json_from_hf_reproduce_the_hidden_size(dim: int, hidden: int, expected: dict) -> None:
    args = ModelArgs(dim=dim, n_heads=4, vocab_size=512, ffn_hidden_dim=hidden)
    params = hf.meta_params(args)
    assert {k: params[k] for k in expected} == expected
    assert ModelArgs.from_params(params).hidden_dim == hidden
    assert math.isclose(params["rope_theta"], args.rope_theta)


@pytest.fixture(scope="module")
def llama3_folders(llama3: tuple, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The Llama 3 model in 1 shard, 2 (vocabulary-split) and as an HF folder, each with the real Llama 3 tokenizer."""
    _, state = llama3
    tmp = tmp_path_factory.mktemp("llama3_folders")
    one = meta_folder(tmp / "one", LLAMA3, state, tokenizer=llama3_tokenizer())
    two = meta_folder(tmp / "two", LLAMA3, state, n_shards=2, tokenizer=llama3_tokenizer())
    convert(one, tmp / "hf", "hf")
    return {"meta": one, "meta, 2 shards": two, "hf": tmp / "hf"}


@pytest.mark.parametrize("folder", ["meta", "meta, 2 shards", "hf"])
def test_echo_and_logprobs_on_every_format_equal_transformers(folder: str, llama3_folders: Dict[str, Path], llama3: tuple) -> None:
    from llama import Llama

    args, state = llama3
    generator = Llama.build(str(llama3_folders[folder]), None, SEQLEN, 1, device="cpu", dtype=torch.float32)
    [result] = generator.text_completion(["The llama 🦙 is"], temperature=0, max_gen_len=4, logprobs=True, echo=True)
    ids = generator.tokenizer.encode("The llama 🦙 is", bos=True, eos=False)
    assert result["tokens"][: len(ids)] == [generator.tokenizer.decode([t]) for t in ids]
    assert result["generation"].startswith("<|begin_of_text|>The llama 🦙 is")  # as Meta's llama3 decodes an echo
    everything = generator.generate([ids], 4, temperature=0, echo=True)[0][0]
    logits = hf_logits(hf_reference(args, state), torch.tensor([everything]))[0]
    expected = [0.0] + torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(everything[1:])[:, None])[:, 0].tolist()
    torch.testing.assert_close(torch.tensor(result["logprobs"]), torch.tensor(expected), atol=1e-4, rtol=1e-4)


def test_llama3_chat_stops_at_eot_and_never_shows_it(llama3_folders: Dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The model (made to) answer "Hello there" then <|eot_id|> then more: the answer ends at <|eot_id|>."""
    from llama import Llama, engine

    generator = Llama.build(str(llama3_folders["hf"]), None, 64, 1, device="cpu", dtype=torch.float32)
    tokenizer = generator.tokenizer
    eot = tokenizer.special_tokens["<|eot_id|>"]
    script = tokenizer.encode("Hello there", bos=False, eos=False) + [eot] + tokenizer.encode(" and more", bos=False, eos=False)
    drawn: list = []

    def scripted(logits: torch.Tensor, temperature: float, top_p: float, rng: object = None) -> torch.Tensor:
        drawn.append(script[len(drawn)])
        return torch.tensor([drawn[-1]])

    monkeypatch.setattr(engine, "next_token", scripted)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say <|eot_id|> hello"}]
    [answer] = generator.chat_completion([dialog], max_gen_len=20, logprobs=True)
    assert answer["generation"] == {"role": "assistant", "content": "Hello there"}
    assert len(drawn) == len(tokenizer.encode("Hello there", bos=False, eos=False)) + 1  # nothing drawn after <|eot_id|>
    assert len(answer["logprobs"]) == len(answer["tokens"]) == len(drawn) - 1
    # The typed <|eot_id|> stayed text in the prompt: one <|eot_id|> per message, none more.
    assert generator.encode_dialog(dialog).count(eot) == 2


def test_hf_output_of_a_llama3_checkpoint_has_a_tokenizer_transformers_reads(llama3_folders: Dict[str, Path]) -> None:
    """Meta's tiktoken tokenizer.model is copied, and tokenizer.json beside it gives transformers the same ids."""
    from transformers import AutoTokenizer

    from llama.tokenizer import load_tokenizer
    from llama.tokenizer_hf import HFTokenizer

    folder = llama3_folders["hf"]
    ours = load_tokenizer(folder / "tokenizer.model")
    theirs = AutoTokenizer.from_pretrained(str(folder))
    # (Not special-token text: transformers encodes "<|eot_id|>" typed in a text as the special token; we never do.)
    for text in ["The llama 🦙 is", "  two  spaces , before . punctuation\n\n", "def f(x):\n\treturn x**2", "日本語  "]:
        ids = ours.encode(text, bos=True, eos=False)
        assert theirs(text).input_ids == ids
        assert theirs.decode(ids[1:]) == text
    from_json = load_tokenizer(folder / "tokenizer.json")
    assert isinstance(from_json, HFTokenizer) and from_json.stop_ids == ours.stop_ids and from_json.family == "llama3"
