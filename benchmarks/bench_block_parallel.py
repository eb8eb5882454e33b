"""Block-parallel DistProp with several processes against one process: speed and accuracy.

Every configuration trains the same DistProp run (seed, batches, step sizes)
for the same number of steps in fresh CPU processes with one torch thread
each:

* ``1 process``: the sequential step (``--distributed none``);
* ``N processes, synchronous``: block-parallel, equal to the sequential run;
* ``N processes, stale``: block-parallel with the one-step-stale exchange.

The script checks the synchronous run against the sequential one first: it
reports the largest difference of any network weight after the last step,
which should be zero or float32 rounding.

Reported per configuration: training steps per second (evaluation excluded)
and the median step time with its interquartile range. Also the seconds
each rank spent inside the Gaussian exchange, sending and waiting for its
neighbour, and test accuracy and loss every ``--eval-every`` steps.

The processes meet through a file store and Gloo on the loopback interface
(:mod:`distprop_fast.distributed.local`), not through torchrun.

Example::

    python benchmarks/bench_block_parallel.py --data-dir /path/to/data --steps 300 \\
        --eval-every 100 --output block_parallel.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distprop_fast.data import BatchLoader, load_dataset
from distprop_fast.distributed import BlockParallelStep, DistributedContext, GaussianExchange
from distprop_fast.distributed.local import join_local_group, spawn_local
from distprop_fast.train import TrainConfig, build, evaluate


def _config(args, processes: int, exchange: str) -> TrainConfig:
    block = processes > 1
    return TrainConfig(
        method="distprop", dataset=args.dataset, network=args.network, data_dir=args.data_dir,
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=1,
        distributed="block" if block else "none",
        exchange=exchange if block else "synchronous",
        blocks_per_rank=args.blocks_per_rank if block else None,
    ).resolved()


def _timed_exchange() -> list[float]:
    """Wrap GaussianExchange.combine so that it adds its seconds to the returned list."""
    spent = [0.0]
    original = GaussianExchange.combine

    def combine(self, partials, slot):
        begin = time.perf_counter()
        try:
            return original(self, partials, slot)
        finally:
            spent[0] += time.perf_counter() - begin

    GaussianExchange.combine = combine
    return spent


def _worker(rank: int, world_size: int, store: str, args, exchange: str, out: str) -> None:
    if world_size > 1:
        join_local_group(rank, world_size, store, threads=1)
        context = DistributedContext.start("block", "cpu")
    else:
        torch.set_num_threads(1)
        context = DistributedContext()
    config = _config(args, world_size, exchange)
    train_data = load_dataset(config.dataset, True, config.data_dir)
    test_data = load_dataset(config.dataset, False, config.data_dir)
    formulation, step, generator = build(config, train_data, context)
    loader = BatchLoader(train_data, config.batch_size, generator)
    exchange_seconds = _timed_exchange()
    collective = context if context.distributed else None

    step_times, curve = [], []
    for i in range(1, config.steps + 1):
        begin = time.perf_counter()
        step(*loader.next_batch())
        step_times.append(time.perf_counter() - begin)
        if i % args.eval_every == 0 or i == config.steps:
            if isinstance(step, BlockParallelStep):
                step.share_weights()
            accuracy, loss = evaluate(formulation, test_data, context.device, context=collective)
            curve.append({"step": i, "test_accuracy": accuracy, "test_loss": loss})
    if isinstance(step, BlockParallelStep):
        step.finish()

    result = {
        "rank": rank,
        "step_times": step_times,
        "exchange_seconds": exchange_seconds[0],
        "curve": curve,
        "blocks": list(step.own_blocks) if isinstance(step, BlockParallelStep) else None,
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if rank == 0:
        network = {k: v.clone() for k, v in formulation.network.state_dict().items()}
        torch.save(network, Path(out) / "network.pt")
    if world_size > 1:
        dist.destroy_process_group()


def run(args, processes: int, exchange: str) -> dict:
    """Train one configuration in fresh processes and return its measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        spawn_local(_worker, processes, tmp, args, exchange, tmp)
        wall = time.perf_counter() - begin
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(processes)]
        network = torch.load(Path(tmp) / "network.pt")

    # A step ends on every rank within one message of the others, so the
    # slowest rank's total training time is the run's.
    totals = [sum(r["step_times"]) for r in ranks]
    times = ranks[0]["step_times"]
    quartiles = statistics.quantiles(times, n=4)
    return {
        "processes": processes,
        "exchange": exchange if processes > 1 else None,
        "blocks_per_rank": [len(r["blocks"]) for r in ranks] if processes > 1 else None,
        "steps": len(times),
        "steps_per_second": len(times) / max(totals),
        "median_step_s": statistics.median(times),
        "step_iqr_s": [quartiles[0], quartiles[2]],
        "train_seconds_per_rank": totals,
        "exchange_seconds_per_rank": [r["exchange_seconds"] for r in ranks],
        "curve": ranks[0]["curve"],
        "wall_seconds_with_startup": wall,
        "network": network,
    }


def _largest_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        date = subprocess.run(["date"], capture_output=True, text=True, check=True).stdout
        info["date"] = date.strip()
        load = Path("/proc/loadavg").read_text().split()[:3]
        info["load_average"] = " ".join(load)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def _print_table(results: list[dict]) -> None:
    print("| processes | exchange | blocks per rank | steps/s | median step (IQR) | "
          "exchange s per rank | test accuracy by step |")
    print("|---|---|---|---:|---|---|---|")
    for r in results:
        iqr = f"{r['median_step_s']:.3f} s ({r['step_iqr_s'][0]:.3f}-{r['step_iqr_s'][1]:.3f})"
        exchange = ", ".join(f"{s:.1f}" for s in r["exchange_seconds_per_rank"])
        curve = ", ".join(f"{c['step']}: {c['test_accuracy']:.4f}" for c in r["curve"])
        print(
            f"| {r['processes']} | {r['exchange'] or '-'} | {r['blocks_per_rank'] or '-'} | "
            f"{r['steps_per_second']:.3f} | {iqr} | {exchange} | {curve} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="torchvision-layout data root")
    parser.add_argument("--dataset", default="mnist", help="data set (default: %(default)s)")
    parser.add_argument("--network", default="mnist-two-block", help="network (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel runs")
    parser.add_argument("--blocks-per-rank", default=None, help="e.g. 1,1 (default: balanced)")
    parser.add_argument("--exchanges", default="synchronous,stale",
                        help="comma-separated exchange schedules to run (default: %(default)s)")
    parser.add_argument("--output", default=None, help="write the measurements as JSON here")
    args = parser.parse_args(argv)

    results = [run(args, 1, "synchronous")]
    for exchange in args.exchanges.split(","):
        results.append(run(args, args.processes, exchange))
        print(f"finished {args.processes} processes, {exchange}", flush=True)

    sequential = results[0]["network"]
    for r in results[1:]:
        r["largest_weight_difference_to_1_process"] = _largest_difference(r["network"], sequential)
    for r in results:
        del r["network"]
    machine = _machine()
    print(json.dumps({"machine": machine, "args": vars(args)}, indent=2))
    _print_table(results)
    for r in results[1:]:
        print(f"{r['processes']} processes, {r['exchange']}: largest weight difference to 1 "
              f"process after {r['steps']} steps: {r['largest_weight_difference_to_1_process']:.3e}")
    if args.output:
        Path(args.output).write_text(
            json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
