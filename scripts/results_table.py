"""Print a Markdown table of finished runs and write their test curves as CSV.

Usage: python scripts/results_table.py RUN_DIR [RUN_DIR ...] [--csv curves.csv]

Each RUN_DIR contains the config.json, metrics.jsonl and summary.json of one
``distprop-train --output-dir RUN_DIR`` run.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def load(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    curve = []
    with open(run_dir / "metrics.jsonl") as handle:
        for line in handle:
            record = json.loads(line)
            if "test_accuracy" in record:
                curve.append(record)
    return summary, config, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--csv", type=Path, help="write step-wise test curves here")
    args = parser.parse_args()

    print(
        "| run | method | network | steps | test accuracy | final mean abs defect "
        "| wall time (min) | peak memory (MiB) | state variables | multipliers |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for run_dir in args.runs:
        summary, config, curve = load(run_dir)
        print(
            f"| {run_dir.name} | {summary['method']} | {summary['network']} | {summary['steps']} "
            f"| {summary['test_accuracy']:.4f} | {summary['final_mean_abs_defect']:.3g} "
            f"| {summary['wall_time_s'] / 60:.1f} | {summary['peak_memory_mib']:.0f} "
            f"| {summary['state_variables']:,} | {summary['multipliers']:,} |"
        )
        for record in curve:
            defects = [v for k, v in record.items() if k.startswith("defect/")]
            rows.append(
                {
                    "run": run_dir.name,
                    "step": record["step"],
                    "wall_time_s": round(record["wall_time_s"], 1),
                    "test_accuracy": record["test_accuracy"],
                    "test_loss": round(record["test_loss"], 5),
                    "mean_abs_defect": sum(defects) / len(defects) if defects else 0.0,
                }
            )
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
