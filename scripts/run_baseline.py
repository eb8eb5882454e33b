"""Train one layer-local baseline (DFA, DTP or OAM) and write its metrics and summary.

Usage:
    python scripts/run_baseline.py --method dfa --dataset mnist --data-dir DIR \
        --epochs 20 --seed 0 --output-dir runs/dfa --threads 1

Writes three files to --output-dir. config.json records the resolved options.
metrics.jsonl has one JSON object per line: the mean training statistics over
the last --log-every steps, plus the test accuracy and loss after every epoch.
summary.json is written last, through a temporary file and a rename.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from distprop_fast.baselines import BASELINES, DEFAULT_LR
from distprop_fast.data import DATASETS, BatchLoader, DatasetNotFoundError, load_dataset
from distprop_fast.train import atomic_write_text, evaluate, peak_memory_mib


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(BASELINES))
    parser.add_argument("--network", default="mlp", help="mlp (784-256-256-10 on MNIST) or conv")
    parser.add_argument("--dataset", default="mnist", choices=DATASETS)
    parser.add_argument(
        "--data-dir", help="torchvision-layout root (default: $DISTPROP_DATA, then ./data)"
    )

    parser.add_argument("--epochs", type=float, default=20.0, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument(
        "--lr", type=float, help="weight step size (default: DEFAULT_LR of the method)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a further keyword of the method's constructor, e.g. target_step=0.2; repeatable",
    )

    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--log-every", type=int, default=50, help="steps per metrics line")
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="stop at the end of the first epoch that ends after this many minutes",
    )
    parser.add_argument("--output-dir", type=Path, required=True)

    args = parser.parse_args(argv)
    if args.epochs <= 0:
        parser.error(f"--epochs must be positive, got {args.epochs}")
    if args.batch_size < 1 or args.threads < 1 or args.log_every < 1:
        parser.error("--batch-size, --threads and --log-every must be at least 1")
    return args


def parse_options(pairs: list[str]) -> dict:
    """Turn ``NAME=VALUE`` strings into keywords; values are read as JSON, else kept as text."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option {pair!r} is not NAME=VALUE, e.g. --option target_step=0.2")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        train_data = load_dataset(args.dataset, True, args.data_dir)
        test_data = load_dataset(args.dataset, False, args.data_dir)
    except DatasetNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    options = parse_options(args.option)
    try:
        method = BASELINES[args.method](
            args.network,
            train_data.input_shape,
            train_data.num_classes,
            lr=lr,
            seed=args.seed,
            num_examples=len(train_data),
            device=args.device,
            **options,
        )
    except (TypeError, ValueError) as err:
        print(f"error: invalid settings for {args.method}: {err}", file=sys.stderr)
        return 2
    steps_per_epoch = math.ceil(len(train_data) / args.batch_size)
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    loader = BatchLoader(train_data, args.batch_size, torch.Generator().manual_seed(args.seed))
    device = torch.device(args.device)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "summary.json").unlink(missing_ok=True)
    config = {**vars(args), "output_dir": str(args.output_dir), "lr": lr, "options": options}
    config["steps"] = total_steps
    atomic_write_text(args.output_dir / "config.json", json.dumps(config, indent=2) + "\n")

    test_acc = test_loss = float("nan")
    window: dict[str, list[float]] = {}
    step = 0
    with open(args.output_dir / "metrics.jsonl", "w") as metrics:
        for step in range(1, total_steps + 1):
            x, y, index = loader.next_batch()
            stats = method(x.to(device), y.to(device), index.to(device))
            for key, value in stats.items():
                window.setdefault(key, []).append(value)
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if step % args.log_every == 0 or end_of_epoch:
                record = {"step": step, "epoch": step / steps_per_epoch}
                record.update({k: sum(v) / len(v) for k, v in window.items()})
                window.clear()
                if end_of_epoch:
                    test_acc, test_loss = evaluate(method, test_data, device)
                    record.update(test_accuracy=test_acc, test_loss=test_loss)
                    record["wall_time_s"] = round(time.perf_counter() - start, 1)
                    print(json.dumps(record), flush=True)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                out_of_time = (
                    args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes
                )
                if end_of_epoch and out_of_time:
                    break

    summary = {
        "method": args.method,
        "dataset": args.dataset,
        "network": args.network,
        "lr": lr,
        "options": options,
        "batch_size": args.batch_size,
        "steps": step,
        "steps_requested": total_steps,
        "epochs": round(step / steps_per_epoch, 3),
        "seed": args.seed,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "final_train_loss": stats["loss"],
        **method.variable_counts(),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "peak_memory_mib": round(peak_memory_mib(), 1),
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(args.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
