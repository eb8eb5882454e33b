"""Check the memory model of docs/MEMORY.md against the peak RSS of real formulations.

Each case runs in a fresh Python process. It builds a network and records the
resident set size (VmRSS in /proc/self/status), then builds the formulation with
its tables of |D| rows and the SaddlePointStep, writes every element of every
per-example table and accumulator once (calloc'd pages cost nothing until
written), and records VmRSS again. The difference is compared with the model's
prediction. Two extragradient steps on a synthetic batch follow, and the growth of
the peak (VmHWM) over the first reading shows the step's working memory.

Weights step with plain SGD here, so that no weight accumulator lands among the
formulation's variables; the other step rules are the method defaults (Adagrad
for states and Gaussians, SGD for multipliers). A case whose prediction exceeds
MemAvailable minus 2 GiB is skipped and listed as such.

Usage::

    python scripts/measure_memory.py                # every case, a markdown table
    python scripts/measure_memory.py --case NAME    # one case, one JSON line
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MNIST_ROWS = 60_000
IMAGENET_ROWS = 1_281_167
GIB = 2**30
SAFETY_BYTES = 2 * GIB
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Case:
    """One measurement: a formulation on a network with a table of ``rows`` rows."""

    name: str
    formulation: str  # "extraprop", "per-feature" or "per-example"
    network: str
    rows: int
    classes: int
    samples_per_class: int = 32
    multiplier_dtype: str = "float32"


CASES = [
    Case("extraprop/two-block/60k", "extraprop", "mnist-two-block", MNIST_ROWS, 10),
    Case("extraprop/every-layer/60k", "extraprop", "mnist-every-layer", MNIST_ROWS, 10),
    Case("extraprop/two-block/1.28M", "extraprop", "mnist-two-block", IMAGENET_ROWS, 10),
    Case("extraprop/alexnet/1.28M", "extraprop", "alexnet", IMAGENET_ROWS, 1000, 1),
    Case("per-feature/two-block/60k", "per-feature", "mnist-two-block", MNIST_ROWS, 10),
    Case("per-feature/every-layer/60k", "per-feature", "mnist-every-layer", MNIST_ROWS, 10),
    Case("per-feature/two-block/1.28M", "per-feature", "mnist-two-block", IMAGENET_ROWS, 10),
    Case("per-feature/two-block/1.28M/fp16", "per-feature", "mnist-two-block", IMAGENET_ROWS,
         10, 32, "float16"),
    Case("per-feature/alexnet/1.28M", "per-feature", "alexnet", IMAGENET_ROWS, 1000, 1),
    Case("per-feature/alexnet/1.28M/fp16", "per-feature", "alexnet", IMAGENET_ROWS, 1000, 1,
         "float16"),
    Case("per-example/two-block/60k", "per-example", "mnist-two-block", MNIST_ROWS, 10),
    Case("per-example/every-layer/60k", "per-example", "mnist-every-layer", MNIST_ROWS, 10),
    Case("per-example/alexnet/1.28M", "per-example", "alexnet", IMAGENET_ROWS, 1000, 1),
    Case("per-example/alexnet/1.28M/fp16", "per-example", "alexnet", IMAGENET_ROWS, 1000, 1,
         "float16"),
]

CUT_SIZES = {
    "mnist-two-block": [128],
    "mnist-every-layer": [21_632, 9_216, 128],
    "alexnet": [9_216],
}
INPUT_SHAPES = {
    "mnist-two-block": (1, 28, 28),
    "mnist-every-layer": (1, 28, 28),
    "alexnet": (3, 224, 224),
}


def predicted_bytes(case: Case) -> dict[str, int]:
    """Return the model's bytes per group of variables (docs/MEMORY.md), weights excluded."""
    cuts = CUT_SIZES[case.network]
    rows, m, n = case.rows, case.classes, case.samples_per_class
    lam = DTYPE_BYTES[case.multiplier_dtype]
    if case.formulation == "extraprop":
        # States (float32), multipliers, and the states' Adagrad accumulator.
        return {
            "states": rows * sum(cuts) * 4,
            "multipliers": rows * sum(cuts) * lam,
            "state accumulators": rows * sum(cuts) * 4,
        }
    first = cuts[0] if case.formulation == "per-feature" else 1
    return {
        "first-cut multipliers": rows * first * lam,
        # W_mu and W_sigma, and their Adagrad accumulators.
        "Gaussians": 2 * m * sum(cuts) * 4,
        "Gaussian accumulators": 2 * m * sum(cuts) * 4,
        "noise": n * m * sum(cuts) * 4,
        "later multipliers": n * m * sum(cuts[1:]) * 4,
    }


def read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def build_formulation(case: Case, network):
    import torch

    from distprop_fast.formulations import DistProp, ExtraProp

    dtype = getattr(torch, case.multiplier_dtype)
    if case.formulation == "extraprop":
        # No initialise_states: it needs the data, and the tables are written below.
        return ExtraProp(network, case.rows, multiplier_dtype=dtype)
    return DistProp(
        network, case.rows, case.classes, samples_per_class=case.samples_per_class,
        multiplier_dtype=dtype, constraint=case.formulation,
        generator=torch.Generator().manual_seed(0),
    )


def run_case(case: Case) -> dict:
    """Measure one case in this process and return its numbers."""
    import torch

    from distprop_fast.models import build_network
    from distprop_fast.solvers import SaddlePointStep, StepRuleConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    network = build_network(
        case.network, INPUT_SHAPES[case.network], case.classes,
        cut_activation=case.formulation == "extraprop",
    )
    before = read_status_kib("VmRSS")

    formulation = build_formulation(case, network)
    step = SaddlePointStep(
        formulation, "extragradient", weights=StepRuleConfig(1e-3, "sgd"),
        states=StepRuleConfig(1e-2, "adagrad"), multipliers=StepRuleConfig(1e-6, "sgd"),
        num_examples=case.rows, num_classes=case.classes,
    )
    with torch.no_grad():
        for table in formulation.sparse_tables():
            table.table.fill_(0)
        for rule in step.sparse_rules:
            if rule.accum is not None:
                rule.accum.fill_(0)
    after_touch = read_status_kib("VmRSS")

    generator = torch.Generator().manual_seed(1)
    batch = 8
    for _ in range(2):
        x = torch.randn(batch, *INPUT_SHAPES[case.network], generator=generator)
        y = torch.randint(0, case.classes, (batch,), generator=generator)
        index = torch.randint(0, case.rows, (batch,), generator=generator)
        step(x, y, index)
    peak = read_status_kib("VmHWM")

    return {
        "case": case.name,
        "measured_bytes": (after_touch - before) * 1024,
        "peak_growth_bytes": (peak - before) * 1024,
        "baseline_rss_bytes": before * 1024,
    }


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def run_all(cases: list[Case]) -> None:
    import torch

    available = mem_available_bytes()
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {cpu_model()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"MemAvailable {available / GIB:.1f} GiB at the start\n"
    )
    print("| case | rows | predicted MiB | measured MiB | measured - predicted MiB | "
          "peak growth in 2 steps MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for case in cases:
        predicted = sum(predicted_bytes(case).values())
        if predicted > available - SAFETY_BYTES:
            print(f"| {case.name} | {case.rows:,} | {mib(predicted)} | skipped: needs "
                  f"{predicted / GIB:.1f} GiB, {available / GIB:.1f} GiB available | | |")
            continue
        command = [sys.executable, __file__, "--case", case.name]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"| {case.name} | {case.rows:,} | {mib(predicted)} | failed: "
                  f"{done.stderr.strip().splitlines()[-1]} | | |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        measured = result["measured_bytes"]
        print(f"| {case.name} | {case.rows:,} | {mib(predicted)} | {mib(measured)} | "
              f"{mib(measured - predicted)} | {mib(result['peak_growth_bytes'])} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="measure one case in this process and print JSON")
    parser.add_argument("--only", default=None,
                        help="comma-separated case names to run (default: all)")
    args = parser.parse_args()
    by_name = {case.name: case for case in CASES}
    if args.case is not None:
        if args.case not in by_name:
            parser.error(f"unknown case {args.case!r}; choose one of {', '.join(by_name)}")
        print(json.dumps(run_case(by_name[args.case])))
        return
    cases = CASES
    if args.only:
        names = args.only.split(",")
        unknown = [name for name in names if name not in by_name]
        if unknown:
            parser.error(f"unknown cases {unknown}; choose from {', '.join(by_name)}")
        cases = [by_name[name] for name in names]
    run_all(cases)


if __name__ == "__main__":
    main()
