"""Named experiment grids: methods x data sets x seeds, with per-method overrides.

A grid comes from the built-in registry :data:`GRIDS` or from a JSON file::

    {
      "name": "my-grid",
      "datasets": ["mnist"],
      "seeds": [0, 1, 2],                 // or a count: 3 means seeds 0, 1, 2
      "methods": ["sgd", "distprop"],     // omitted: every method of this version
      "config": {"eval_every": 100}       // TrainConfig fields for every run
    }

``methods`` may also map row names to overrides, for rows that share a method but
differ in settings: ``{"sgd": {"steps": 1200}, "distprop-gda": {"method":
"distprop", "solver": "gda"}}``. A row's ``method`` defaults to its name.
Each run writes to ``ROOT/<dataset>/<row>/seed<k>``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from distprop_fast.runner import RunSpec, train_supports_checkpoints, training_module

# Set by the runner for every run, so a grid may not set them.
RESERVED_FIELDS = ("dataset", "seed", "output_dir", "threads")
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
GRID_KEYS = ("name", "description", "datasets", "seeds", "methods", "config")

# The solver that reuses the previous step's look-ahead gradient
# ("extrapolation from the past"), one gradient evaluation per step.
PAST_EXTRAGRADIENT = "past-extragradient"


@dataclass
class Grid:
    """A set of runs: every row (a method with overrides) on every data set and seed.

    Attributes:
        name: the grid's name, shown in logs.
        description: one line for ``--help``.
        datasets: data set names.
        seeds: training seeds; each gives one run per row and data set.
        methods: row name -> TrainConfig overrides (``method`` defaults to the row
            name); None means one row per method in ``distprop_fast.train.METHODS``.
        config: TrainConfig fields shared by every run; a row's overrides win.
    """

    name: str
    description: str
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: dict[str, dict] | None = None
    config: dict = field(default_factory=dict)

    def rows(self) -> dict[str, dict]:
        """Return row name -> overrides, with every method of this version when unset."""
        if self.methods is None:
            return {method: {} for method in training_module().METHODS}
        return self.methods


def table1_grid(dataset: str, label: str) -> Grid:
    return Grid(
        name=f"table1-{dataset}",
        description=f"every method on {label}, 10 seeds, the data set's step budget",
        datasets=(dataset,),
        seeds=tuple(range(10)),
    )


GRIDS: dict[str, Grid] = {
    "table1-mnist": table1_grid("mnist", "MNIST"),
    "table1-fashion-mnist": table1_grid("fashion-mnist", "Fashion-MNIST"),
    "table1-cifar10": table1_grid("cifar10", "CIFAR-10"),
    "past-vs-extragradient": Grid(
        name="past-vs-extragradient",
        description="DistProp and ExtraProp on MNIST with extragradient and with "
        "extrapolation from the past, 5 seeds",
        datasets=("mnist",),
        seeds=tuple(range(5)),
        methods={
            "distprop-extragradient": {"method": "distprop", "solver": "extragradient"},
            "distprop-past-extragradient": {"method": "distprop", "solver": PAST_EXTRAGRADIENT},
            "extraprop-extragradient": {"method": "extraprop", "solver": "extragradient"},
            "extraprop-past-extragradient": {
                "method": "extraprop",
                "solver": PAST_EXTRAGRADIENT,
            },
        },
    ),
    "smoke": Grid(
        name="smoke",
        description="every method on the embedded digits5k, 2 seeds, 20 steps",
        datasets=("digits5k",),
        seeds=(0, 1),
        config={"steps": 20, "eval_every": 10},
    ),
}


def config_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(training_module().TrainConfig)}


def check_overrides(overrides: dict, where: str, allow_method: bool) -> None:
    """Raise ValueError for keys that are not TrainConfig fields or are set by the runner."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a JSON object of TrainConfig fields, got {overrides!r}")
    known = config_field_names()
    for key in overrides:
        if key in RESERVED_FIELDS or (key == "method" and not allow_method):
            raise ValueError(f"{where} sets {key!r}, which the grid runner sets for each run")
        if key not in known:
            raise ValueError(
                f"{where} sets unknown field {key!r}; TrainConfig fields are {sorted(known)}"
            )


def grid_from_dict(data: dict, default_name: str) -> Grid:
    """Build a grid from the JSON layout in this module's docstring.

    Raises:
        ValueError: an unknown key, a malformed value or a field the runner sets.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a grid file must hold a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"unknown grid keys {unknown}; allowed keys are {list(GRID_KEYS)}")

    datasets = data.get("datasets")
    if not datasets or not isinstance(datasets, list):
        raise ValueError(f"grid needs a non-empty list 'datasets', got {datasets!r}")

    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"a seed count must be at least 1, got {seeds}")
        seeds = list(range(seeds))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"'seeds' must be a count or a non-empty list of integers, got {seeds!r}")

    methods = data.get("methods")
    if isinstance(methods, list):
        methods = {name: {} for name in methods}
    if methods is not None and (not isinstance(methods, dict) or not methods):
        raise ValueError(
            f"'methods' must be a list of method names or an object of rows, got {methods!r}"
        )

    config = data.get("config", {})
    check_overrides(config, "'config'", allow_method=False)
    for row, overrides in (methods or {}).items():
        if not ROW_NAME.match(row):
            raise ValueError(
                f"row name {row!r} must start with a letter or digit and contain only "
                "letters, digits, '.', '_' and '-', because it names a directory"
            )
        check_overrides(overrides, f"row {row!r}", allow_method=True)

    return Grid(
        name=str(data.get("name", default_name)),
        description=str(data.get("description", "")),
        datasets=tuple(datasets),
        seeds=tuple(seeds),
        methods=methods,
        config=dict(config),
    )


def load_grid(name_or_path: str) -> Grid:
    """Return the built-in grid of that name, or the grid in that JSON file.

    Raises:
        ValueError: the name is neither a built-in grid nor a readable JSON file,
            or the file's grid is invalid.
    """
    if name_or_path in GRIDS:
        return GRIDS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"grid {name_or_path!r} is neither a built-in grid ({', '.join(GRIDS)}) "
            "nor an existing JSON file"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"grid file {path} is not valid JSON: {err}") from None
    return grid_from_dict(data, default_name=path.stem)


def expand_grid(
    grid: Grid,
    root: Path,
    *,
    data_dir: str | None = None,
    threads: int | None = None,
    steps: int | None = None,
    rows: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[RunSpec]:
    """Return one run per row, data set and seed, each writing to ``root/<dataset>/<row>/seed<k>``.

    ``steps`` replaces every run's step budget, ``rows`` keeps only those rows and
    ``seeds`` replaces the grid's seeds; they serve quick checks and partial runs
    of a large grid. Checkpoints are written every
    ``eval_every`` steps unless the grid sets ``checkpoint_every``.

    Raises:
        ValueError: ``rows`` names a row the grid does not have.
    """
    all_rows = grid.rows()
    if rows is not None:
        missing = [row for row in rows if row not in all_rows]
        if missing:
            raise ValueError(f"grid {grid.name!r} has no rows {missing}; rows: {list(all_rows)}")
        all_rows = {row: all_rows[row] for row in rows}
    run_seeds = grid.seeds if seeds is None else tuple(seeds)

    config_class = training_module().TrainConfig
    checkpoints = train_supports_checkpoints()
    specs = []
    for dataset in grid.datasets:
        for row, overrides in all_rows.items():
            for seed in run_seeds:
                name = f"{dataset}/{row}/seed{seed}"
                fields = {**grid.config, **overrides}
                fields.setdefault("method", row)
                if data_dir is not None:
                    fields["data_dir"] = data_dir
                if steps is not None:
                    fields.update(steps=steps, epochs=None)
                if checkpoints:
                    default_every = fields.get("eval_every", config_class.eval_every)
                    fields.setdefault("checkpoint_every", default_every)
                config = config_class(
                    **fields,
                    dataset=dataset,
                    seed=seed,
                    threads=threads,
                    output_dir=str(root / dataset / row / f"seed{seed}"),
                )
                specs.append(RunSpec(name=name, config=config))
    return specs
