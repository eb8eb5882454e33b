"""Time the fused ops and a DistProp step against their baselines, side by side in one run.

Prints Markdown tables: median times with their spread, speed-up ratios with a
PASS/MISS column per target, the fraction of a same-size copy's bandwidth that
each kernel reaches, and peak memory. Candidates are timed in turns (A B C A B
C ...), and each ratio is the median of the per-turn ratios, so a change in
machine load during the run shifts both sides of a ratio alike.

Usage, from the repository root::

    python benchmarks/compare.py [--device cpu|cuda] [--sections sampling,zscore,sparse,step]
        [--budget SECONDS] [--step-budget SECONDS] [--threads N] [--max-gib GIB]
        [--output FILE]

Every candidate is checked against ``distprop_fast.ops.reference`` before it
is timed; a mismatch stops the run with the comparison's message.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sampling
import bench_sparse_extra_adagrad
import bench_step
import bench_zscore_constraint

FUSED_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
SECTIONS = ("sampling", "zscore", "sparse", "step")
MiB = 2**20

# Targets: minimum median ratio (baseline time / fused time), or minimum fraction
# of a same-size copy's bandwidth.
SAMPLING_VS_REFERENCE = 2.0
ZSCORE_VS_REFERENCE = 3.0
ZSCORE_VS_COMPILED = 1.5
SPARSE_VS_REFERENCE = 2.0
SPARSE_VS_TORCH_ADAGRAD = 5.0
STEP_VS_REFERENCE = 1.5
COPY_FRACTION = 0.6
# The copy-fraction target of the constraint applies from this feature size on.
COPY_FRACTION_MIN_FEATURES = 1024
# Largest table and accumulator, together, for the per-op split of a step.
SHARE_TABLE_BYTES = 2**30


# -- timing ----------------------------------------------------------------------------------


class PhaseTimer:
    """Wall-clock time of the named phases of one run; waits for the GPU at each boundary."""

    def __init__(self, device: torch.device):
        self._synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.times: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        self._synchronize()
        self.times = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self._synchronize()
        now = time.perf_counter()
        self.times[phase] = now - self._last
        self._last = now


@dataclass
class Candidate:
    """One implementation to time.

    Attributes:
        name: the backend name shown in the tables.
        run: performs one run and calls ``timer.lap(phase)`` after each phase.
        prepare: untimed work before each run, such as clearing gradients.
        times: per phase, the duration of each counted run in seconds.
        peak_mib: peak memory of one run above what was in use before it.
    """

    name: str
    run: Callable[[PhaseTimer], None]
    prepare: Callable[[], None] = lambda: None
    times: dict[str, list[float]] = field(default_factory=dict)
    peak_mib: float = float("nan")

    def totals(self) -> list[float]:
        return [sum(phases) for phases in zip(*self.times.values())]


def measure(
    candidates: list[Candidate],
    device: torch.device,
    budget_s: float,
    min_runs: int = 5,
    max_runs: int = 40,
) -> None:
    """Run every candidate once untimed, then in turns until ``budget_s`` has passed.

    The order within a turn rotates so that no candidate always follows the same one.
    """
    timer = PhaseTimer(device)
    for candidate in candidates:
        candidate.prepare()
        timer.start()
        candidate.run(timer)
        candidate.times = {phase: [] for phase in timer.times}

    started = time.perf_counter()
    for turn in range(max_runs):
        if turn >= min_runs and time.perf_counter() - started > budget_s:
            break
        shift = turn % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            candidate.prepare()
            timer.start()
            candidate.run(timer)
            for phase, seconds in timer.times.items():
                candidate.times[phase].append(seconds)


def clone_candidate(traffic_bytes: int, device: torch.device) -> Candidate:
    """Build a candidate that clones a tensor, reading and writing ``traffic_bytes`` in total."""
    source = torch.ones(max(1, traffic_bytes // 8), device=device)

    def run(timer: PhaseTimer) -> None:
        source.clone()
        timer.lap("total")

    return Candidate("copy", run)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name} line")


def _release_free_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        # Not glibc: the peak may then miss allocations that reuse resident pages.
        pass


def peak_extra_mib(run: Callable[[], None], device: torch.device) -> float:
    """Peak memory of ``run`` above what was in use before it, in MiB.

    On CUDA this is the caching allocator's peak. On the CPU it is the peak
    resident set size (VmHWM) after resetting it through /proc/self/clear_refs,
    so it counts pages that were touched, rounded to pages. Free heap memory is
    first returned to the OS (glibc ``malloc_trim``), so that allocations inside
    ``run`` cannot hide in pages that are already resident.
    """
    gc.collect()
    _release_free_heap()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MiB
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _rss_kib("VmRSS")
    run()
    return max(0, _rss_kib("VmHWM") - before) / 1024


# -- formatting ------------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def format_ms(values: list[float]) -> str:
    """Median in ms with half the interquartile range as a percentage of it."""
    low, median, high = quartiles(values)
    spread = 100 * (high - low) / 2 / median if median > 0 else 0.0
    return f"{milliseconds_text(median)} ±{spread:.0f}%"


def milliseconds_text(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def per_run_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator)]


def format_ratio(ratios: list[float], percent: bool = False) -> str:
    low, median, high = quartiles(ratios)
    if percent:
        return f"{100 * median:.0f}% ({100 * low:.0f}–{100 * high:.0f})"
    return f"{median:.2f}× ({low:.2f}–{high:.2f})"


def verdict(ratios: list[float], target: float) -> str:
    return "PASS" if statistics.median(ratios) >= target else "MISS"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        # A "|" inside a cell, as in |D|, would end the cell.
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [line(header), "|" + "---|" * len(header)] + [line(row) for row in rows]
    return "\n".join(lines)


# -- forward and backward ops ----------------------------------------------------------------


def forward_backward_candidate(module, inputs: dict, backend: str) -> Candidate:
    def run(timer: PhaseTimer) -> None:
        outputs = module.forward(inputs, backend)
        timer.lap("forward")
        module.backward(inputs, outputs)
        timer.lap("backward")

    return Candidate(backend, run, prepare=lambda: module.clear_grads(inputs))


def time_forward_backward(module, case, device, backends, budget_s) -> dict[str, Candidate]:
    """Check and time ``backends`` (the reference first) and a same-size copy on one case."""
    inputs = module.make_inputs(case, device)
    for backend in backends[1:]:
        module.check_against_reference(inputs, backend)
    candidates = [forward_backward_candidate(module, inputs, name) for name in backends]
    candidates.append(clone_candidate(case.traffic_bytes(), device))
    measure(candidates, device, budget_s)

    by_name = {candidate.name: candidate for candidate in candidates}
    for candidate in candidates[:-1]:

        def run_once(candidate=candidate):
            candidate.prepare()
            candidate.run(PhaseTimer(device))
            candidate.prepare()

        candidate.peak_mib = peak_extra_mib(run_once, device)
    return by_name


def phase_columns(candidate: Candidate) -> list[str]:
    return [format_ms(values) for values in candidate.times.values()] + [
        format_ms(candidate.totals())
    ]


def sampling_section(device, fused, budget_s, max_bytes) -> str:
    header = [
        "case",
        "backend",
        "fwd ms",
        "bwd ms",
        "total ms",
        "reference total ms",
        "vs reference",
        f"≥{SAMPLING_VS_REFERENCE:g}×",
        "of copy bandwidth",
        "peak extra MiB (fused / reference)",
    ]
    rows, skipped = [], []
    for case in bench_sampling.CASES:
        if case.working_set_bytes() > max_bytes:
            skipped.append(case)
            continue
        timed = time_forward_backward(bench_sampling, case, device, ["reference", *fused], budget_s)
        reference = timed["reference"]
        for name in fused:
            candidate = timed[name]
            speedup = per_run_ratios(reference.totals(), candidate.totals())
            copy = per_run_ratios(timed["copy"].totals(), candidate.totals())
            rows.append(
                [
                    case.name,
                    name,
                    *phase_columns(candidate),
                    format_ms(reference.totals()),
                    format_ratio(speedup),
                    verdict(speedup, SAMPLING_VS_REFERENCE),
                    format_ratio(copy, percent=True),
                    f"{candidate.peak_mib:.0f} / {reference.peak_mib:.0f}",
                ]
            )
    text = "### Sampling, forward + backward\n\n" + markdown_table(header, rows)
    return text + skipped_note(skipped, max_bytes)


def zscore_section(device, fused, budget_s, max_bytes) -> str:
    header = [
        "case",
        "backend",
        "fwd ms",
        "bwd ms",
        "total ms",
        "reference total ms",
        "compiled total ms",
        "vs reference",
        f"≥{ZSCORE_VS_REFERENCE:g}×",
        "vs compiled",
        f"≥{ZSCORE_VS_COMPILED:g}×",
        "of copy bandwidth",
        f"≥{COPY_FRACTION:.0%} (d ≥ {COPY_FRACTION_MIN_FEATURES})",
        "peak extra MiB (fused / reference / compiled)",
    ]
    rows, skipped = [], []
    for case in bench_zscore_constraint.CASES:
        if case.working_set_bytes() > max_bytes:
            skipped.append(case)
            continue
        backends = ["reference", "compiled", *fused]
        timed = time_forward_backward(bench_zscore_constraint, case, device, backends, budget_s)
        reference, compiled = timed["reference"], timed["compiled"]
        for name in fused:
            candidate = timed[name]
            vs_reference = per_run_ratios(reference.totals(), candidate.totals())
            vs_compiled = per_run_ratios(compiled.totals(), candidate.totals())
            copy = per_run_ratios(timed["copy"].totals(), candidate.totals())
            copy_verdict = "–"
            if case.features >= COPY_FRACTION_MIN_FEATURES:
                copy_verdict = verdict(copy, COPY_FRACTION)
            rows.append(
                [
                    case.name,
                    name,
                    *phase_columns(candidate),
                    format_ms(reference.totals()),
                    format_ms(compiled.totals()),
                    format_ratio(vs_reference),
                    verdict(vs_reference, ZSCORE_VS_REFERENCE),
                    format_ratio(vs_compiled),
                    verdict(vs_compiled, ZSCORE_VS_COMPILED),
                    format_ratio(copy, percent=True),
                    copy_verdict,
                    f"{candidate.peak_mib:.0f} / {reference.peak_mib:.0f} / {compiled.peak_mib:.0f}",
                ]
            )
    text = "### z-score constraint with multiplier term, forward + backward\n\n"
    text += markdown_table(header, rows)
    return text + skipped_note(skipped, max_bytes)


def skipped_note(skipped: list, max_bytes: int) -> str:
    if not skipped:
        return "\n"
    names = ", ".join(
        f"{case.name} (about {case.working_set_bytes() / 2**30:.0f} GiB)" for case in skipped
    )
    return f"\n\nSkipped, estimated peak memory above {max_bytes / 2**30:g} GiB: {names}.\n"


# -- sparse ExtraAdagrad ---------------------------------------------------------------------


def sparse_candidate(state: dict, backend: str, adagrad) -> Candidate:
    module = bench_sparse_extra_adagrad

    def run(timer: PhaseTimer) -> None:
        saved = module.extrapolate(state, backend, adagrad)
        timer.lap("extrapolate")
        module.update(state, backend, saved, adagrad)
        timer.lap("update")

    return Candidate(backend, run)


def time_sparse_case(case, device, fused, budget_s, with_adagrad: bool = True):
    """Check and time one table; return the candidates and the peak extra MiB of each."""
    module = bench_sparse_extra_adagrad
    state = module.make_state(case, device)
    adagrad = module.TorchAdagradStep(state) if with_adagrad else None
    backends = ["reference", *fused] + (["torch-adagrad"] if with_adagrad else [])
    for backend in backends[1:]:
        module.check_against_reference(state, backend, adagrad)
    candidates = [sparse_candidate(state, name, adagrad) for name in backends]
    candidates.append(clone_candidate(case.traffic_bytes(), device))
    measure(candidates, device, budget_s)
    peaks = {}
    for candidate in candidates[:-1]:
        peaks[candidate.name] = peak_extra_mib(
            lambda candidate=candidate: candidate.run(PhaseTimer(device)), device
        )
    return {candidate.name: candidate for candidate in candidates}, peaks


def sparse_section(device, fused, budget_s, max_bytes) -> str:
    module = bench_sparse_extra_adagrad
    header = [
        "table",
        "backend",
        "extrapolate ms",
        "update ms",
        "total ms",
        "vs reference",
        f"≥{SPARSE_VS_REFERENCE:g}×",
        "vs torch Adagrad",
        f"≥{SPARSE_VS_TORCH_ADAGRAD:g}×",
        "of copy bandwidth",
        f"≥{COPY_FRACTION:.0%}",
    ]
    rows, skipped, peaks_by_rows = [], [], {}
    for case in module.CASES:
        if case.table_bytes() > max_bytes:
            skipped.append(case)
            continue
        timed, peaks = time_sparse_case(case, device, fused, budget_s)
        if case.features == module.CASES[0].features:
            peaks_by_rows[case.rows] = peaks
        reference, adagrad = timed["reference"], timed["torch-adagrad"]
        for name in ["reference", "torch-adagrad", *fused]:
            candidate = timed[name]
            vs_reference = per_run_ratios(reference.totals(), candidate.totals())
            vs_adagrad = per_run_ratios(adagrad.totals(), candidate.totals())
            copy = per_run_ratios(timed["copy"].totals(), candidate.totals())
            fused_row = name in fused
            rows.append(
                [
                    case.name,
                    name,
                    *phase_columns(candidate),
                    format_ratio(vs_reference),
                    verdict(vs_reference, SPARSE_VS_REFERENCE) if fused_row else "",
                    format_ratio(vs_adagrad),
                    verdict(vs_adagrad, SPARSE_VS_TORCH_ADAGRAD) if fused_row else "",
                    format_ratio(copy, percent=True),
                    verdict(copy, COPY_FRACTION) if fused_row else "",
                ]
            )
        gc.collect()

    # Peak memory at a tenth of the table: the same peak means it does not grow with |D|.
    large = module.CASES[0]
    small = module.SparseCase(large.rows // 10, large.features, large.batch)
    _, peaks_by_rows[small.rows] = time_sparse_case(small, device, fused, budget_s=0.2)
    text = "### Sparse ExtraAdagrad, extrapolation + update, in place\n\n"
    text += markdown_table(header, rows)
    text += skipped_note_tables(skipped, max_bytes)
    text += "\n\n" + memory_table(peaks_by_rows, large, small)
    return text


def skipped_note_tables(skipped: list, max_bytes: int) -> str:
    if not skipped:
        return ""
    names = ", ".join(case.name for case in skipped)
    return f"\n\nSkipped, table and accumulator above {max_bytes / 2**30:g} GiB: {names}."


def memory_table(peaks_by_rows: dict, large, small) -> str:
    """Peak extra memory of one extrapolation + update at two table sizes."""
    if large.rows not in peaks_by_rows:
        return ""
    header = [
        "backend",
        f"peak extra MiB, |D|={large.rows:,}",
        f"peak extra MiB, |D|={small.rows:,}",
        "independent of |D|",
    ]
    rows = []
    table_mib = large.table_bytes() / MiB
    for name, peak_large in peaks_by_rows[large.rows].items():
        peak_small = peaks_by_rows[small.rows].get(name, float("nan"))
        # Independent: within 1 MiB of each other and far below one table (1%).
        independent = abs(peak_large - peak_small) <= 1.0 and peak_large < 0.01 * table_mib
        rows.append(
            [name, f"{peak_large:.1f}", f"{peak_small:.1f}", "PASS" if independent else "MISS"]
        )
    return (
        f"Peak memory above the table and accumulator ({table_mib:,.0f} MiB together at "
        f"|D|={large.rows:,}, d={large.features}), one extrapolation + update:\n\n"
        + markdown_table(header, rows)
    )


# -- training step ---------------------------------------------------------------------------


def step_candidate(network: str, backend: str, device) -> Candidate:
    _, step = bench_step.build_step(network, backend, str(device))
    batch = bench_step.random_batch(device)

    def run(timer: PhaseTimer) -> None:
        step(*batch)
        timer.lap("step")

    return Candidate(backend, run)


def step_section(device, fused, budget_s) -> str:
    header = [
        "network",
        "backend",
        "step ms",
        "reference step ms",
        "vs reference",
        f"≥{STEP_VS_REFERENCE:g}×",
    ]
    rows, step_times = [], {}
    for network in bench_step.NETWORKS:
        for name in fused:
            bench_step.check_backends_agree(network, name, str(device))
        candidates = [step_candidate(network, name, device) for name in ["reference", *fused]]
        measure(candidates, device, budget_s, min_runs=4, max_runs=10)
        reference = candidates[0]
        step_times[network] = {c.name: statistics.median(c.totals()) for c in candidates}
        for candidate in candidates[1:]:
            speedup = per_run_ratios(reference.totals(), candidate.totals())
            target = verdict(speedup, STEP_VS_REFERENCE) if network == "mnist-every-layer" else "–"
            rows.append(
                [
                    network,
                    candidate.name,
                    format_ms(candidate.totals()),
                    format_ms(reference.totals()),
                    format_ratio(speedup),
                    target,
                ]
            )
        del candidates
        gc.collect()
    text = "### One DistProp training step (extragradient), batch 256\n\n"
    text += markdown_table(header, rows)
    for network in bench_step.NETWORKS:
        text += "\n\n" + op_share_table(network, step_times[network], device, fused)
    return text


def op_share_table(network: str, step_times: dict, device, fused) -> str:
    """Time each op of one step in isolation at the step's shapes and relate it to the step time."""
    formulation, _ = bench_step.build_step(network, "reference", str(device))
    # The sparse step costs O(B * d) whatever |D| is, so its table is cut to
    # 1 GiB (table and accumulator) where 60,000 rows of the cut would not fit.
    table_rows = min(
        bench_step.MNIST_TRAIN_SIZE, SHARE_TABLE_BYTES // (8 * formulation.network.cut_sizes[0])
    )
    calls = bench_step.op_calls_per_step(formulation, table_rows)
    del formulation
    backends = ["reference", *fused]
    header = ["op", "shape", "calls per step"] + [f"{name} ms per step" for name in backends]
    rows, totals = [], dict.fromkeys(backends, 0.0)
    for module, case, count in calls:
        if module is bench_sparse_extra_adagrad:
            timed, _ = time_sparse_case(case, device, fused, budget_s=0.5, with_adagrad=False)
            op = "sparse_extra_adagrad_"
        else:
            timed = time_forward_backward(module, case, device, backends, budget_s=0.5)
            op = module.__name__.removeprefix("bench_")
        cells = []
        for name in backends:
            per_step = count * statistics.median(timed[name].totals())
            totals[name] += per_step
            cells.append(milliseconds_text(per_step))
        rows.append([op, case.name, str(count), *cells])
    rows.append(["all three ops", "", ""] + [milliseconds_text(totals[name]) for name in backends])
    rows.append(
        ["step (median above)", "", ""] + [milliseconds_text(step_times[name]) for name in backends]
    )
    rows.append(
        ["share of step in the ops", "", ""]
        + [f"{100 * totals[name] / step_times[name]:.1f}%" for name in backends]
    )
    reference_ops, reference_step = totals["reference"], step_times["reference"]
    bound = reference_step / max(reference_step - reference_ops, 1e-12)
    return (
        f"Share of the {network} step spent in the three ops, each op timed alone at the "
        "step's shapes (forward + backward, or extrapolation + update):\n\n"
        + markdown_table(header, rows)
        + f"\n\nWere the ops free, the {network} step would be at most {bound:.2f}× faster "
        "than with the reference ops (Amdahl's law on the shares above)."
    )


# -- main ------------------------------------------------------------------------------------


def machine_header(device: torch.device, argv: list[str]) -> str:
    lines = [
        f"- command: `python benchmarks/{Path(argv[0]).name} {' '.join(argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
    ]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    else:
        lines.append(
            f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, "
            f"{torch.get_num_threads()} intra-op threads"
        )
    lines.append(f"- load average at start: {load_average()}")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "unknown"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=sorted(FUSED_BACKENDS),
        default="cpu",
        help="device to time on; cpu times backend cpu, cuda times cuda and triton",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, from {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="seconds of timed runs per op case, after at least 5 turns (default: 1.0)",
    )
    parser.add_argument(
        "--step-budget",
        type=float,
        default=20.0,
        help="seconds of timed training steps per network, at least 4 turns (default: 20)",
    )
    parser.add_argument(
        "--max-gib",
        type=float,
        default=None,
        help="skip cases whose estimated peak memory exceeds this many GiB "
        "(default: 4 on the CPU, a quarter of the GPU's memory on CUDA)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for torch and the CPU kernels (default: torch's choice)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="also write the tables to this Markdown file"
    )
    args = parser.parse_args(argv[1:])
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    max_gib = args.max_gib
    if max_gib is None:
        max_gib = (
            4.0
            if device.type == "cpu"
            else torch.cuda.get_device_properties(device).total_memory / 4 / 2**30
        )
    max_bytes = int(max_gib * 2**30)
    fused = list(FUSED_BACKENDS[device.type])

    started = time.perf_counter()
    parts = [machine_header(device, argv)]
    print(parts[0], flush=True)
    # "auto" rows show which backend a default call gets and what it costs.
    with_auto = [*fused, "auto"]
    if "sampling" in args.sections:
        parts.append(sampling_section(device, with_auto, args.budget, max_bytes))
        print("\n" + parts[-1], flush=True)
    if "zscore" in args.sections:
        parts.append(zscore_section(device, with_auto, args.budget, max_bytes))
        print("\n" + parts[-1], flush=True)
    if "sparse" in args.sections:
        parts.append(sparse_section(device, fused, args.budget, max_bytes))
        print("\n" + parts[-1], flush=True)
    if "step" in args.sections:
        parts.append(step_section(device, fused, args.step_budget))
        print("\n" + parts[-1], flush=True)
    footer = (
        f"- load average at end: {load_average()}; run time {time.perf_counter() - started:.0f} s"
    )
    parts.append(footer)
    print("\n" + footer)
    if args.output is not None:
        args.output.write_text("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
