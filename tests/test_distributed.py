"""Real multi-process runs (gloo, CPU): any shard count on any process count equals one process, and faults do not hang.

Each launch costs seconds, so one launch per process count runs every case in a loop (which also exercises
building a ``Llama`` again in a live process group); tests/dist_worker.py is the process each launch runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch

from llama import CheckpointError, ModelArgs, distributed
from llama.demo import random_state_dict
from llama.errors import InputError
from tests.conftest import ROOT, build
from tests.dist_utils import free_port
from tests.test_formats import LLAMA3, llama3_tokenizer, meta_folder

WORKER = str(ROOT / "tests" / "dist_worker.py")
COUNTS = (1, 2, 4)
PROMPTS = [[1, 20, 30, 40, 50], [1, 60]]  # unequal lengths: prefill of the shorter, then prompt tokens kept for the longer
MAX_GEN_LEN = 8
# Their prefill activations outgrow a shared-memory slot (sized for one decode step), so it goes over gloo, then decode
# goes through shared memory: both transports in one generation.
LONG_PROMPTS = [[1] + list(range(100, 140)), [1] + list(range(300, 330))]
# Rank 1's prompts in the "different prompts" cases: a longer first prompt, so the ranks would run different numbers of steps.
OTHER_PROMPTS = [[1, 20, 30, 40, 50, 60], [1, 60]]
SAMPLING = dict(temperature=1.0, top_p=0.95, max_gen_len=16)
MID_DECODE = 4  # Transformer.forward call 1 is the prefill, the rest are decode steps
FAULT_TIMEOUT_S = 20  # LLAMA_DIST_TIMEOUT in the fault tests: a survivor that only stops at this timeout did not detect the fault
LAUNCH_TIMEOUT_S = 120  # a hang fails the test instead of hanging it

Report = Dict[str, Any]


def worker_env(**extra: str) -> Dict[str, str]:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def write_spec(tmp: Path, cases: List[dict], fault: Optional[dict] = None) -> Tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "fault": fault}))
    out = tmp / "out"
    out.mkdir()
    return spec, out


def read_reports(out: Path, world_size: int) -> List[Report]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def greedy_case(name: str, ckpt: Path) -> dict:
    return {"name": name, "ckpt_dir": str(ckpt), "prompts": PROMPTS, "max_gen_len": MAX_GEN_LEN}


def different_prompts_case(ckpt: Path) -> dict:
    return {**greedy_case("different prompts", ckpt), "prompts_per_rank": [PROMPTS, OTHER_PROMPTS], "expect_error": True}


def torchrun(nproc: int, cases: List[dict], tmp: Path) -> List[Report]:
    """Run the worker on nproc processes under torchrun; every rank's report."""
    spec, out = write_spec(tmp, cases)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()), WORKER, str(spec), str(out)]
    done = subprocess.run(command, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return read_reports(out, nproc)


def assert_matches(result: Report, reference: Tuple[list, list]) -> None:
    tokens, logprobs = reference
    assert result["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(result["logprobs"]), torch.tensor(logprobs), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint: Callable[..., Path]) -> Dict[int, Path]:
    return {k: make_checkpoint(n_shards=k) for k in COUNTS}


@pytest.fixture(scope="module")
def reference(checkpoints: Dict[int, Path]) -> Tuple[list, list]:
    """Greedy tokens and logprobs of one process on the unsharded weights."""
    tokens, logprobs = build(checkpoints[1]).generate(PROMPTS, MAX_GEN_LEN, temperature=0, logprobs=True)
    return tokens, logprobs


@pytest.fixture(scope="module")
def resharded(checkpoints: Dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-shard checkpoint rewritten as 2 shards by the reshard command."""
    dst = tmp_path_factory.mktemp("resharded") / "ckpt"
    command = [sys.executable, "-m", "llama.reshard", str(checkpoints[4]), str(dst), "--mp", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return dst


@pytest.fixture(scope="module")
def llama3_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Dict[int, Path]:
    """A tiny Llama 3.1-shaped model (128256 words, scaled RoPE) in 1 shard and in 2 (embedding split by vocabulary),
    with the real Llama 3 tokenizer; none without the llama-models test extra that ships it."""
    if importlib.util.find_spec("llama_models") is None:
        return {}
    args = ModelArgs.from_params(LLAMA3)
    state = random_state_dict(args, seed=3)
    folder = tmp_path_factory.mktemp("llama3")
    return {k: meta_folder(folder / f"{k}", LLAMA3, state, n_shards=k, tokenizer=llama3_tokenizer()) for k in (1, 2)}


def llama3_cases(llama3_checkpoints: Dict[int, Path]) -> List[dict]:
    return [greedy_case("llama 3, 2 shards", llama3_checkpoints[2])] if llama3_checkpoints else []


@pytest.fixture(scope="module")
def on_two(
    checkpoints: Dict[int, Path], resharded: Path, llama3_checkpoints: Dict[int, Path], tmp_path_factory: pytest.TempPathFactory
) -> List[Report]:
    """One torchrun launch of 2 processes: every shard count, model_parallel_size 1, a sampled run with a different seed per
    rank, the reshard output, the first model used again after the others, ranks given different prompts, no room in /dev/shm."""
    cases = [greedy_case(f"{k} shards", checkpoints[k]) for k in COUNTS]
    cases[0]["keep"] = "first"
    # Each process a whole model, then model-parallel again: the groups are switched between builds.
    cases.insert(1, {**greedy_case("model_parallel_size 1", checkpoints[2]), "model_parallel_size": 1})
    cases.insert(2, {**greedy_case("first model again", checkpoints[1]), "reuse": "first"})
    cases.append({"name": "sampled", "ckpt_dir": str(checkpoints[2]), "prompts": PROMPTS, "seed": 1, "seed_per_rank": 1000, **SAMPLING})
    cases.append(greedy_case("resharded", resharded))
    cases.append({**greedy_case("long prompts", checkpoints[2]), "prompts": LONG_PROMPTS})
    cases.append({**greedy_case("compiled", checkpoints[2]), "compile": True})
    # One prompt, twice on one Llama: the token broadcast and the prompt check then share a shared-memory view.
    cases.append({**greedy_case("one prompt", checkpoints[2]), "prompts": PROMPTS[:1], "keep": "single"})
    cases.append({**greedy_case("one prompt again", checkpoints[2]), "prompts": PROMPTS[:1], "reuse": "single"})
    cases.append(different_prompts_case(checkpoints[2]))
    # Rank 1 alone passes a temperature it refuses: it must not raise alone and leave rank 0 waiting in a collective.
    cases.append({**greedy_case("one rank's bad temperature", checkpoints[2]), "temperature_per_rank": [0.0, -1.0], "expect_error": True})
    cases.append({**greedy_case("no room in /dev/shm", checkpoints[2]), "shm_reserve_fails_on_rank": 0})
    return torchrun(2, cases + llama3_cases(llama3_checkpoints), tmp_path_factory.mktemp("on_two"))


@pytest.fixture(scope="module")
def on_four(checkpoints: Dict[int, Path], llama3_checkpoints: Dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> List[Report]:
    cases = [greedy_case(f"{k} shards", checkpoints[k]) for k in COUNTS] + llama3_cases(llama3_checkpoints)
    return torchrun(4, cases, tmp_path_factory.mktemp("on_four"))


@pytest.mark.parametrize("n", (2, 4))
def test_llama3_vocabulary_split_shards_on_n_processes_equal_one_shard_on_one(
    n: int, llama3_checkpoints: Dict[int, Path], request: pytest.FixtureRequest
) -> None:
    if not llama3_checkpoints:
        pytest.skip("the Llama 3 tokenizer ships in the llama-models test extra")
    reference = build(llama3_checkpoints[1]).generate(PROMPTS, MAX_GEN_LEN, temperature=0, logprobs=True)
    for report in request.getfixturevalue({2: "on_two", 4: "on_four"}[n]):
        assert report["error"] is None
        assert_matches(report["results"]["llama 3, 2 shards"], reference)


@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("k", COUNTS)
def test_k_shards_on_n_processes_equal_one_process_on_unsharded_weights(
    k: int, n: int, checkpoints: Dict[int, Path], reference: Tuple[list, list], request: pytest.FixtureRequest
) -> None:
    if n == 1:
        tokens, logprobs = build(checkpoints[k]).generate(PROMPTS, MAX_GEN_LEN, temperature=0, logprobs=True)
        reports = [{"rank": 0, "error": None, "results": {f"{k} shards": {"tokens": tokens, "logprobs": logprobs}}}]
    else:
        reports = request.getfixturevalue({2: "on_two", 4: "on_four"}[n])
    assert [r["rank"] for r in reports] == list(range(n))
    for report in reports:
        assert report["error"] is None
        assert_matches(report["results"][f"{k} shards"], reference)


def test_compiled_decode_over_two_ranks_equals_one_process(on_two: List[Report], reference: Tuple[list, list]) -> None:
    """torch.compile breaks its graph at each shared-memory collective; the tokens stay those of one process."""
    for report in on_two:
        result = report["results"]["compiled"]
        assert result["transport"] == "shared memory"
        assert_matches(result, reference)


def test_one_llama_called_again_with_one_prompt_over_shared_memory(on_two: List[Report], reference: Tuple[list, list]) -> None:
    """The second call once failed: a cached view made in inference mode was written from outside it."""
    for report in on_two:
        for case in ("one prompt", "one prompt again"):
            assert report["results"][case]["transport"] == "shared memory"
            assert_matches(report["results"][case], (reference[0][:1], reference[1][:1]))


def test_collectives_go_through_shared_memory_on_one_host(on_two: List[Report], on_four: List[Report]) -> None:
    for report in on_two + on_four:
        transports = {name: result["transport"] for name, result in report["results"].items() if "transport" in result}
        assert transports.pop("model_parallel_size 1", "none") == "none"
        transports.pop("no room in /dev/shm", None)
        assert set(transports.values()) == {"shared memory"}, transports


def test_a_model_still_works_after_one_of_another_model_parallel_size_is_built(on_two: List[Report], reference: Tuple[list, list]) -> None:
    """Each Llama keeps its own group: building with model_parallel_size 1 once made the first (size 2) skip its all-reduces."""
    for report in on_two:
        result = report["results"]["first model again"]
        assert_matches(result, reference)
        assert result["transport"] == "shared memory"


def test_full_dev_shm_falls_back_to_gloo_with_a_warning_naming_the_rank_and_cause(
    on_two: List[Report], reference: Tuple[list, list]
) -> None:
    """A segment created sparse over the free space of /dev/shm once died of SIGBUS at the first large collective."""
    for report in on_two:
        result = report["results"]["no room in /dev/shm"]
        assert_matches(result, reference)
        assert result["transport"] == "gloo"
        # Rank 1 reserved nothing itself: the warning still names rank 0 and its cause, not "None".
        [warning] = [w for w in result["warnings"] if "shared-memory" in w]
        assert "rank 0: [Errno 28] could not reserve" in warning and "No space left on device" in warning, warning
        assert "LLAMA_SHM_COLLECTIVES=0" in warning and "None" not in warning, warning


def assert_different_prompts_fail_at_once(reports: List[Report], case: str = "different prompts") -> None:
    for report in reports:
        result = report["results"][case]
        assert result["error"]["type"] == "InputError", result["error"]
        message = result["error"]["message"]
        assert f"rank {report['rank']}: rank(s) [1] passed different prompts or sampling arguments from rank 0" in message
        assert "every rank of a model-parallel group must pass the same prompts" in message
        assert result["seconds"] < 5, f"failed after {result['seconds']:.1f} s: it waited for a peer instead of comparing"


def test_ranks_given_different_prompts_fail_at_once_over_shared_memory(on_two: List[Report]) -> None:
    assert_different_prompts_fail_at_once(on_two)


def test_a_value_only_one_rank_refuses_fails_every_rank_at_once(on_two: List[Report]) -> None:
    assert_different_prompts_fail_at_once(on_two, "one rank's bad temperature")


def test_model_parallel_size_one_on_two_processes_runs_a_whole_model_in_each(on_two: List[Report], reference: Tuple[list, list]) -> None:
    for report in on_two:
        assert_matches(report["results"]["model_parallel_size 1"], reference)


def test_sampling_agrees_across_ranks_whose_seeds_differ(on_two: List[Report], checkpoints: Dict[int, Path]) -> None:
    """Each rank samples with its own generator (seed 1 and 1001 here); only the broadcast of rank 0's tokens keeps them equal."""
    assert [report["results"]["sampled"]["seed"] for report in on_two] == [1, 1001]
    rank0, rank1 = (report["results"]["sampled"]["tokens"] for report in on_two)
    assert rank0 == rank1
    alone = {seed: build(checkpoints[1], seed=seed).generate(PROMPTS, **SAMPLING)[0] for seed in (1, 1001)}
    assert alone[1] != alone[1001], "the two seeds sample the same tokens, so this test could not see ranks drift apart"
    assert rank0 == alone[1]  # the group's first rank decides


def test_prefill_over_gloo_then_decode_through_shared_memory_equals_one_process(on_two: List[Report], checkpoints: Dict[int, Path]) -> None:
    reference = build(checkpoints[1]).generate(LONG_PROMPTS, MAX_GEN_LEN, temperature=0, logprobs=True)
    for report in on_two:
        assert_matches(report["results"]["long prompts"], reference)


def test_reshard_command_output_loads_and_gives_the_same_tokens(on_two: List[Report], resharded: Path, reference: Tuple[list, list]) -> None:
    assert sorted(p.name for p in resharded.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    for report in on_two:
        assert_matches(report["results"]["resharded"], reference)
    assert_matches(dict(zip(("tokens", "logprobs"), build(resharded).generate(PROMPTS, MAX_GEN_LEN, temperature=0, logprobs=True))), reference)


def test_reshard_command_to_a_size_that_does_not_divide_names_the_sizes_that_work(checkpoints: Dict[int, Path], tmp_path: Path) -> None:
    command = [sys.executable, "-m", "llama.reshard", str(checkpoints[2]), str(tmp_path / "out"), "--mp", "3"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode != 0
    assert "model_parallel_size=3: n_heads=4 is not divisible by 3" in done.stderr
    assert "Sizes that work: [1, 2, 4]" in done.stderr
    assert not list((tmp_path / "out").glob("*.pth"))


def test_build_on_three_ranks_of_a_four_head_model_names_the_sizes_that_work(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As 3 processes would: the model-parallel size is 3 and this (only) rank loads its share."""
    monkeypatch.setattr(distributed, "init_model_parallel", lambda size: 3)
    with pytest.raises(CheckpointError, match=r"model_parallel_size=3: n_heads=4 is not divisible by 3; dim=64 .*Sizes that work: \[1, 2, 4\]"):
        build(ckpt_dir)


@pytest.fixture(scope="module")
def on_two_nodes(checkpoints: Dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> List[Report]:
    """Two torchrun launches, as on two machines (static rendezvous at rank 0's address); collectives over gloo, as between hosts."""
    cases = [greedy_case(f"{k} shards", checkpoints[k]) for k in (1, 2)] + [different_prompts_case(checkpoints[2])]
    spec, out = write_spec(tmp_path_factory.mktemp("on_two_nodes"), cases)
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port, WORKER, str(spec), str(out)],
            cwd=ROOT, env=worker_env(LLAMA_SHM_COLLECTIVES="0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    outputs = finish(nodes, LAUNCH_TIMEOUT_S)
    for node, (returncode, _, stderr) in zip(nodes, outputs):
        assert returncode == 0, stderr[-4000:]
    return read_reports(out, 2)


def test_two_nodes_of_one_process_each_equal_one_process(on_two_nodes: List[Report], reference: Tuple[list, list]) -> None:
    for report in on_two_nodes:
        assert report["world_size"] == 2 and report["error"] is None
        for k in (1, 2):
            assert_matches(report["results"][f"{k} shards"], reference)
            assert report["results"][f"{k} shards"]["transport"] == "gloo"


def test_ranks_given_different_prompts_fail_at_once_over_gloo(on_two_nodes: List[Report]) -> None:
    assert_different_prompts_fail_at_once(on_two_nodes)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5", "0", "1e400", "1e20", "abc", ""])
def test_invalid_dist_timeout_names_the_variable_and_what_is_expected(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", value)
    expected = rf"LLAMA_DIST_TIMEOUT={value!r} is not a usable timeout: expected a number of seconds from 0\.001 "
    with pytest.raises(InputError, match=expected):
        distributed.timeout()


def test_dist_timeout_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", "2.5")
    assert math.isclose(distributed.timeout().total_seconds(), 2.5)


# Faults, with the ranks started by hand: torchrun's agent would tear the group down when a rank dies, and so
# hide whether our own code notices.


def finish(processes: List[subprocess.Popen], timeout: float) -> List[Tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; all are killed and the test fails if any outlives timeout."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((process.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        outputs = [process.communicate() for process in processes]
        pytest.fail(f"still running after {timeout} s: hung; stderr of each rank:\n" + "\n----\n".join(err[-2000:] for _, err in outputs))
    return results


def start_ranks(
    spec: Path, out: Path, world_size: int = 2, wrap: Optional[Dict[int, List[str]]] = None, **env: str
) -> List[subprocess.Popen]:
    """Start world_size workers by hand; wrap maps a rank to a command to run its worker under."""
    port = str(free_port())
    return [
        subprocess.Popen(
            (wrap or {}).get(rank, []) + [sys.executable, WORKER, str(spec), str(out)], cwd=ROOT,
            env=worker_env(**{"LLAMA_DIST_TIMEOUT": str(FAULT_TIMEOUT_S), **env}, RANK=str(rank), WORLD_SIZE=str(world_size),
                           LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(world_size)
    ]


def test_shard_missing_on_one_rank_fails_every_rank_promptly(checkpoints: Dict[int, Path], tmp_path: Path) -> None:
    incomplete = Path(shutil.copytree(checkpoints[2], tmp_path / "incomplete"))
    (incomplete / "consolidated.01.pth").unlink()
    case = {**greedy_case("missing shard", checkpoints[2]), "ckpt_dirs": [str(checkpoints[2]), str(incomplete)]}
    spec, out = write_spec(tmp_path, [case])
    start = time.monotonic()
    (rc0, _, err0), (rc1, _, err1) = finish(start_ranks(spec, out), LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert rc0 != 0 and rc1 != 0
    rank0, rank1 = read_reports(out, 2)
    assert rank1["error"]["type"] == "FileNotFoundError" and "missing consolidated.01.pth" in rank1["error"]["message"]
    assert rank0["error"]["type"] == "DistributedError" and "rank(s) [1] failed while loading the checkpoint" in rank0["error"]["message"]
    assert "missing consolidated.01.pth" in err1 and "DistributedError" in err0
    assert elapsed < FAULT_TIMEOUT_S, f"took {elapsed:.1f} s: the failure was not shared, a peer timed out"


@pytest.mark.parametrize("collectives", ["shm", "gloo"])
@pytest.mark.parametrize("victim", [0, 1])
def test_rank_killed_mid_generation_makes_the_other_fail_promptly(victim: int, collectives: str, checkpoints: Dict[int, Path], tmp_path: Path) -> None:
    """Rank 0 hosts the TCP store the group was made with; either rank dying must end the other."""
    spec, out = write_spec(tmp_path, [greedy_case("killed", checkpoints[2])], fault={"rank": victim, "at_forward": MID_DECODE, "how": "kill"})
    start = time.monotonic()
    outputs = finish(start_ranks(spec, out, LLAMA_SHM_COLLECTIVES="1" if collectives == "shm" else "0"), LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - start
    survivor = 1 - victim
    assert outputs[victim][0] == -signal.SIGKILL
    returncode, _, stderr = outputs[survivor]
    assert returncode != 0
    report = json.loads((out / f"rank{survivor}.json").read_text())
    assert report["error"]["type"] == "DistributedError", report["error"]
    assert report["error"]["message"].startswith(f"rank {survivor}: ")
    assert "DistributedError" in stderr
    assert elapsed < FAULT_TIMEOUT_S, f"took {elapsed:.1f} s: the survivor waited for the timeout instead of seeing the peer die"


@pytest.mark.parametrize("collectives", ["shm", "gloo"])
def test_rank_that_hangs_makes_the_other_fail_after_the_timeout(collectives: str, checkpoints: Dict[int, Path], tmp_path: Path) -> None:
    """LLAMA_DIST_TIMEOUT bounds every group: fairscale's model-parallel group once kept torch's default, 30 minutes on gloo."""
    timeout_s = 5
    spec, out = write_spec(tmp_path, [greedy_case("hung", checkpoints[2])], fault={"rank": 1, "at_forward": MID_DECODE, "how": "hang"})
    shm = "1" if collectives == "shm" else "0"
    ranks = start_ranks(spec, out, LLAMA_DIST_TIMEOUT=str(timeout_s), LLAMA_SHM_COLLECTIVES=shm)
    try:
        [(returncode, _, stderr)] = finish(ranks[:1], 60)  # start-up, load, then timeout_s
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert returncode != 0
    report = json.loads((out / "rank0.json").read_text())
    assert report["error"]["type"] == "DistributedError", report["error"]
    assert report["error"]["message"].startswith("rank 0: ")
    assert "DistributedError" in stderr


def unshare_pid_namespace() -> List[str]:
    """A command prefix that runs a process in PID and mount namespaces of its own, with its own /proc, or [] if not permitted."""
    command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    try:
        permitted = subprocess.run(command + ["true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        permitted = False
    return command if permitted else []


def test_peer_in_another_pid_namespace_is_not_taken_for_dead_and_its_death_is_seen(
    checkpoints: Dict[int, Path], reference: Tuple[list, list], tmp_path: Path
) -> None:
    """Two containers of one pod share hostname, boot id and /dev/shm but not PIDs: rank 0's PID means nothing in rank 1's
    /proc. Liveness once looked there, so rank 1 called a slow rank 0 dead; now it checks rank 0's lock on the segment."""
    unshare = unshare_pid_namespace()
    if not unshare:
        pytest.skip("unshare --pid --mount-proc is not permitted here")
    slow = {**greedy_case("rank 0 slow", checkpoints[2]), "fault": {"rank": 0, "at_forward": MID_DECODE, "how": "pause", "seconds": 1}}
    killed = {**greedy_case("rank 0 killed", checkpoints[2]), "fault": {"rank": 0, "at_forward": MID_DECODE, "how": "kill"}}
    spec, out = write_spec(tmp_path, [slow, killed])
    start = time.monotonic()
    outputs = finish(start_ranks(spec, out, wrap={1: unshare}, LLAMA_SHM_COLLECTIVES="1"), LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - start
    report = json.loads((out / "rank1.json").read_text())
    assert report["pid"] == 1, "rank 1 did not run in a PID namespace of its own"
    assert "rank 0 slow" in report["results"], report["error"]  # no false "exited" while rank 0 paused
    assert outputs[0][0] == -signal.SIGKILL and outputs[1][0] != 0
    assert_matches(report["results"]["rank 0 slow"], reference)
    assert report["results"]["rank 0 slow"]["transport"] == "shared memory"
    assert report["error"]["type"] == "DistributedError", report["error"]
    assert report["error"]["message"].startswith("rank 1: rank 0 of the model-parallel group exited"), report["error"]
    assert elapsed < FAULT_TIMEOUT_S, f"took {elapsed:.1f} s: the survivor waited for the timeout instead of seeing the peer die"


def test_rank_killed_while_setting_up_shared_memory_leaves_no_segment_behind(checkpoints: Dict[int, Path], tmp_path: Path) -> None:
    case = {**greedy_case("dies in setup", checkpoints[2]), "fault": {"rank": 1, "at": "shm_attach", "how": "kill"}}
    spec, out = write_spec(tmp_path, [case])
    start = time.monotonic()
    (rc0, _, err0), (rc1, _, _) = finish(start_ranks(spec, out, LLAMA_SHM_COLLECTIVES="1"), LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert rc1 == -signal.SIGKILL and rc0 != 0
    assert json.loads((out / "rank0.json").read_text())["error"]["type"] == "DistributedError", err0[-2000:]
    segment = Path((out / "segment").read_text())
    assert segment.name.startswith("llama-")
    assert not segment.exists(), f"{segment} was left behind"
    assert elapsed < FAULT_TIMEOUT_S
