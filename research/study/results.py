"""Results as tidy records `(arm, seed, split, condition, metric, value)`, saved as JSON.

One record is one number: one arm (method or baseline) trained with one seed, evaluated on one
split under one condition (e.g. `clean`, `noise`, `ot_attack`), for one metric. Everything a
report says is computed from these records, so a report can be rebuilt from `results.json`
without training again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from etils import epath

RESULTS_FILE = "results.json"
PLOT_ARRAYS = "plot_arrays.npz"


@dataclasses.dataclass(frozen=True)
class Record:
  """One measured number.

  Attributes:
    arm: the method or baseline that was trained (e.g. `dual`, `ce`).
    seed: the seed of that training.
    split: the evaluation split (e.g. `test`, `heldout_domain`).
    condition: how the split was presented (e.g. `clean`, `noise`, `ot_attack`); `-` if none.
    metric: what was measured (e.g. `accuracy`, `pq_old`).
    value: the number (NaN when undefined, e.g. an empty group).
  """

  arm: str
  seed: int
  split: str
  condition: str
  metric: str
  value: float


class Results:
  """A list of records plus run metadata (JSON-serialisable), with selection helpers.

  Args:
    experiment: the registered experiment name (`research.experiments.EXPERIMENTS`).
    records: initial records.
    meta: JSON-serialisable facts about the run that are not per-seed numbers (config, class
      names, sizes, wall time).
  """

  def __init__(
    self, experiment: str, records: Iterable[Record] = (), meta: dict[str, Any] | None = None
  ):
    self.experiment = experiment
    self.records: list[Record] = list(records)
    self.meta: dict[str, Any] = dict(meta or {})

  def __len__(self) -> int:
    return len(self.records)

  def __iter__(self) -> Iterator[Record]:
    return iter(self.records)

  def add(
    self,
    arm: str,
    seed: int,
    metrics: dict[str, float],
    *,
    split: str = "test",
    condition: str = "-",
  ) -> None:
    """Adds one record per entry of `metrics` (name -> number) for one (arm, seed, split)."""
    for metric, value in metrics.items():
      self.records.append(Record(arm, int(seed), split, condition, metric, float(value)))

  def select(self, **where: Any) -> list[Record]:
    """The records whose fields equal every given value (`arm=..., metric=...`)."""
    unknown = set(where) - {f.name for f in dataclasses.fields(Record)}
    if unknown:
      raise ValueError(f"select(): unknown record fields {sorted(unknown)}")
    return [r for r in self.records if all(getattr(r, k) == v for k, v in where.items())]

  def per_seed(self, arm: str, metric: str, split: str = "test", condition: str = "-") -> dict:
    """`{seed: value}` of one arm and metric; fails if a seed has two values."""
    out: dict[int, float] = {}
    for r in self.select(arm=arm, metric=metric, split=split, condition=condition):
      if r.seed in out:
        raise ValueError(
          f"two values for arm={arm!r} seed={r.seed} split={split!r} condition={condition!r} "
          f"metric={metric!r}"
        )
      out[r.seed] = r.value
    return dict(sorted(out.items()))

  def values(self, arm: str, metric: str, split: str = "test", condition: str = "-") -> list:
    """The per-seed values of one arm and metric, in seed order."""
    return list(self.per_seed(arm, metric, split, condition).values())

  def arms(self) -> list[str]:
    """Arms in the order they first appear."""
    return list(dict.fromkeys(r.arm for r in self.records))

  def seeds(self) -> list[int]:
    """Seeds present, sorted."""
    return sorted({r.seed for r in self.records})

  def to_json(self) -> dict:
    """A JSON-serialisable dict (NaN written as null)."""
    return {
      "experiment": self.experiment,
      "meta": self.meta,
      "records": [
        {**dataclasses.asdict(r), "value": None if math.isnan(r.value) else r.value}
        for r in self.records
      ],
    }

  @classmethod
  def from_json(cls, data: dict) -> Results:
    """The inverse of `to_json`."""
    records = [
      Record(**{**r, "value": float("nan") if r["value"] is None else float(r["value"])})
      for r in data["records"]
    ]
    return cls(data["experiment"], records, data.get("meta", {}))

  def save(self, workdir: str | epath.Path) -> epath.Path:
    """Writes `<workdir>/results.json`; returns its path."""
    path = epath.Path(workdir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = self.to_json()
    records = ",\n  ".join(json.dumps(r) for r in data.pop("records"))
    head = json.dumps(data, default=_json_default)[:-1]  # one record per line, meta compact
    path.write_text(f'{head}, "records": [\n  {records}\n]}}\n')
    return path

  @classmethod
  def load(cls, workdir: str | epath.Path) -> Results:
    """Reads `<workdir>/results.json`."""
    path = epath.Path(workdir) / RESULTS_FILE
    if not path.exists():
      raise FileNotFoundError(f"{path} does not exist: run the experiment first")
    return cls.from_json(json.loads(path.read_text()))


def merge(parts: Iterable[Results]) -> Results:
  """One run's results from runs of the same experiment on disjoint seeds.

  Seeds trained in separate processes or hosts (`--config.seed=k --config.num_seeds=1` each)
  become one study: the records are concatenated, the metadata is the first part's, with
  `meta["merged_from"]` the number of parts and `meta["time_s"]` the sum over parts.

  Args:
    parts: at least one `Results`, all of one experiment, no seed in two parts.

  Returns:
    the merged `Results`.

  Raises:
    ValueError: no part, parts of different experiments, or a seed in two parts.
  """
  parts = list(parts)
  if not parts:
    raise ValueError("merge() needs at least one Results")
  experiments = {p.experiment for p in parts}
  if len(experiments) > 1:
    raise ValueError(f"merge(): parts of different experiments {sorted(experiments)}")
  seen: dict[int, int] = {}
  for i, part in enumerate(parts):
    for seed in part.seeds():
      if seed in seen:
        raise ValueError(f"merge(): seed {seed} is in part {seen[seed]} and in part {i}")
      seen[seed] = i
  meta = dict(parts[0].meta, merged_from=len(parts))
  if all("time_s" in p.meta for p in parts):
    meta["time_s"] = sum(float(p.meta["time_s"]) for p in parts)
  records = [r for p in parts for r in p.records]
  return Results(parts[0].experiment, records, meta)


def _json_default(value: Any) -> Any:
  """Numpy scalars and arrays in `meta` become Python numbers and lists."""
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_arrays(workdir: str, arrays: dict[str, np.ndarray], name: str = PLOT_ARRAYS) -> None:
  """Writes arrays a report draws (images, label maps) beside `results.json` (an `.npz`).

  Numbers go into `Results`; arrays that only a figure needs (a few images, their label maps,
  a perturbation) go here, so `results.json` stays small at any dataset size.
  """
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  (epath.Path(workdir) / name).write_bytes(buffer.getvalue())


def load_arrays(workdir: str, name: str = PLOT_ARRAYS) -> dict[str, np.ndarray]:
  """The arrays `save_arrays` wrote to `<workdir>/<name>`."""
  with np.load(io.BytesIO((epath.Path(workdir) / name).read_bytes())) as f:
    return dict(f)
