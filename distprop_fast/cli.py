"""Command line: ``distprop-train`` (also ``python -m distprop_fast``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from distprop_fast.data import DATA_ENV_VAR, DATASETS, DEFAULT_CROP_SIZE, DatasetNotFoundError
from distprop_fast.distributed import DIST_BACKENDS, EXCHANGES, MODES
from distprop_fast.formulations.distprop import CONSTRAINTS, GAUSSIAN_INITS, NOISE_MODES
from distprop_fast.formulations.extraprop import SHRINKS
from distprop_fast.baselines import BASELINE_NETWORKS
from distprop_fast.models import NETWORKS
from distprop_fast.ops import BACKENDS, BackendUnavailableError
from distprop_fast.checkpoint import CheckpointError
from distprop_fast.solvers import SOLVERS, STEP_RULES, DivergenceError
from distprop_fast.train import DEFAULT_CHECKPOINT_EVERY, METHODS, TrainConfig, train

# Options that are not TrainConfig fields.
_RUN_OPTIONS = ("no_progress", "resume", "config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distprop-train",
        description="Train a network as a constrained problem (ExtraProp, DistProp) or with "
        "backprop, and print a one-line JSON summary. Options left unset take the "
        "method's defaults (see README).",
    )
    p.add_argument("--method", choices=METHODS, default="distprop", help="formulation and solver preset: sgd (backprop), extraprop, gda, distprop, "
                   "penalty (DistProp with a quadratic penalty, no multipliers), auglag "
                   "(DistProp's augmented Lagrangian), and the layer-local baselines dfa, dtp, oam")
    p.add_argument("--dataset", choices=DATASETS, default="digits5k",
                   help="data set; digits5k is the embedded default (default: %(default)s)")
    p.add_argument("--network", choices=sorted(set(NETWORKS) | set(BASELINE_NETWORKS)), default=None,
                   help="network and split (default: mnist-two-block, lenet for cifar10, "
                   "alexnet for imagenet and imagefolder, mlp for dfa, dtp and oam; conv is "
                   "a baseline network)")
    p.add_argument("--data-dir", default=None,
                   help=f"torchvision-layout data root (default: ${DATA_ENV_VAR}, then ./data); "
                   "for imagenet and imagefolder, the directory holding train/ and val/ "
                   f"class folders (imagenet default: ${DATA_ENV_VAR}/imagenet)")
    p.add_argument("--crop-size", type=int, default=DEFAULT_CROP_SIZE,
                   help="side of the square crop of imagenet and imagefolder images, in pixels; "
                   "test images are first resized to crop-size * 256 / 224 "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes that read imagenet and imagefolder "
                   "images; 0 reads in the main process (default: the CPU count, at most 8)")
    p.add_argument("--download", action="store_true", help="download the data set if missing")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 300 on digits5k and imagefolder, 6500 on "
                   "MNIST and Fashion-MNIST, 20000 on CIFAR-10, 50000 on ImageNet)")
    p.add_argument("--epochs", type=float, default=None,
                   help="training length in passes over the training set; replaces --steps")
    p.add_argument("--batch-size", type=int, default=256, help="examples per step (default: %(default)s)")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="saddle-point solver")
    p.add_argument("--lr-weights", type=float, default=None, help="step size of the network weights")
    p.add_argument("--lr-states", type=float, default=None,
                   help="step size of the states (ExtraProp) or Gaussians (DistProp)")
    p.add_argument("--lr-multipliers", type=float, default=None, help="step size of the multipliers")
    p.add_argument("--weight-rule", choices=STEP_RULES, default=None, help="step rule of the weights")
    p.add_argument("--state-rule", choices=STEP_RULES, default=None, help="step rule of states/Gaussians")
    p.add_argument("--multiplier-rule", choices=STEP_RULES, default=None, help="step rule of multipliers")
    p.add_argument("--margin", type=float, default=None, help="margin eps of the shrunk constraints")
    p.add_argument("--penalty", type=float, default=None,
                   help="coefficient c of the quadratic penalty (c/2) mean ||g||^2 of the "
                   "penalty and auglag methods")
    p.add_argument("--shrink", choices=SHRINKS, default=None, help="shrinkage of ExtraProp defects")
    p.add_argument("--samples-per-class", type=int, default=None, help="DistProp samples per class N")
    p.add_argument("--noise", choices=NOISE_MODES, default=None,
                   help="DistProp noise: drawn once (fixed) or every step (redraw)")
    p.add_argument("--gaussian-init", choices=GAUSSIAN_INITS, default="sphere",
                   help="DistProp Gaussian initialisation (default: %(default)s)")
    p.add_argument("--multiplier-dtype", choices=("float32", "float16", "bfloat16"),
                   default="float32",
                   help="storage of the multiplier tables; steps compute in float32 "
                   "(default: %(default)s)")
    p.add_argument("--constraint", choices=CONSTRAINTS, default=None,
                   help="first-cut constraint of the DistProp methods: one per feature, a "
                   "(|D|, d) multiplier table, or one per example on the L1 norm of the "
                   "z-scores, a (|D|, 1) table (default: per-example on imagenet, else "
                   "per-feature)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="implementation of the fused ops")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--eval-every", type=int, default=250, help="steps between test evaluations")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after the first step that ends past this wall time, in minutes")
    p.add_argument("--output-dir", default=None,
                   help="directory for config.json, metrics.jsonl and summary.json")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints in --output-dir; 0 turns them off "
                   f"(default: {DEFAULT_CHECKPOINT_EVERY} with --output-dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its newest checkpoint "
                   "(starts over when there is none)")
    p.add_argument("--max-multiplier-norm", type=float, default=1e6,
                   help="stop the run when a multiplier norm over a batch exceeds this "
                   "(default: %(default)g)")
    p.add_argument("--distributed", choices=MODES, default=None,
                   help="none; data (data-parallel: each process trains on its part of every "
                   "batch and owns the multiplier rows of its examples); block (block-parallel "
                   "DistProp: each process trains a group of blocks). Default: data when "
                   "launched by torchrun with more than one process, else none")
    p.add_argument("--exchange", choices=EXCHANGES, default="synchronous",
                   help="block-parallel exchange of the shared cuts' Gaussian gradients: "
                   "synchronous (equals one process) or stale (one step old, overlaps "
                   "communication with computation) (default: %(default)s)")
    p.add_argument("--blocks-per-rank", default=None,
                   help="block-parallel: comma-separated blocks per process in rank order, "
                   "e.g. 1,3 (default: as even as possible)")
    p.add_argument("--dist-backend", choices=DIST_BACKENDS, default=None,
                   help="torch.distributed backend (default: nccl with --device cuda, else gloo)")
    p.add_argument("--config", default=None,
                   help="JSON file of training options (keys as in config.json); "
                   "options given on the command line override it")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Return the destinations of the options given on the command line."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            probe.add_argument(*action.option_strings, **kwargs)
    return set(vars(probe.parse_known_args(argv)[0]))


def _load_config_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"cannot read the config file {path}: {err.strerror}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the config file {path} is not valid JSON: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in _RUN_OPTIONS}
    try:
        if args.config is not None:
            given = _explicit_options(parser, argv)
            from_file = _load_config_file(args.config)
            TrainConfig.from_dict(from_file, source=f"the config file {args.config}")
            fields = {**fields, **{k: v for k, v in from_file.items() if k not in given}}
        summary = train(TrainConfig(**fields), progress=not args.no_progress, resume=args.resume)
    except DivergenceError as err:
        print(f"distprop-train: diverged: {err}", file=sys.stderr)
        return 3
    except (DatasetNotFoundError, BackendUnavailableError, CheckpointError, ValueError) as err:
        print(f"distprop-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = fields.get("output_dir")
        hint = f"; continue it with --resume --output-dir {where}" if where else ""
        print(f"distprop-train: interrupted{hint}", file=sys.stderr)
        return 130
    # Every process of a distributed run returns the same summary; rank 0 prints it.
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
