"""Tidy result records: selection, JSON round trip, report rebuilt without training."""

import json
import math

import pytest

from research import experiments
from research.study import tables
from research.study.results import Record, Results, merge


def _results():
  r = Results("supervised_classification", meta={"k": [1, 2]})
  r.add("method", 0, {"accuracy": 0.9, "loss": float("nan")})
  r.add("method", 1, {"accuracy": 0.8})
  r.add("baseline", 0, {"accuracy": 0.7}, split="heldout", condition="noise")
  return r


def test_select_and_per_seed():
  r = _results()
  assert r.arms() == ["method", "baseline"] and r.seeds() == [0, 1]
  assert r.per_seed("method", "accuracy") == {0: 0.9, 1: 0.8}
  assert r.values("baseline", "accuracy", "heldout", "noise") == [0.7]
  assert r.values("baseline", "accuracy") == []
  assert r.select(arm="method", seed=1) == [Record("method", 1, "test", "-", "accuracy", 0.8)]
  with pytest.raises(ValueError, match="unknown record fields"):
    r.select(model="x")
  r.add("method", 1, {"accuracy": 0.5})
  with pytest.raises(ValueError, match="two values for arm='method' seed=1"):
    r.per_seed("method", "accuracy")


def test_save_and_load_round_trip_keeps_nan(tmp_path):
  r = _results()
  path = r.save(tmp_path)
  assert json.loads(path.read_text())["records"][1]["value"] is None
  back = Results.load(tmp_path)
  assert back.experiment == r.experiment and back.meta == r.meta
  assert len(back) == len(r)
  for a, b in zip(back, r, strict=True):
    assert a.arm == b.arm and a.seed == b.seed and a.metric == b.metric
    assert (math.isnan(a.value) and math.isnan(b.value)) or a.value == b.value
  with pytest.raises(FileNotFoundError, match="run the experiment first"):
    Results.load(tmp_path / "missing")


def test_merge_of_seed_split_runs_is_the_seed_loop_run():
  together = Results("x", meta={"time_s": 3.0})
  parts = [Results("x", meta={"time_s": 1.0}), Results("x", meta={"time_s": 2.0})]
  for seed, (m, b) in enumerate([(0.9, 0.8), (0.92, 0.81)]):
    for r in (together, parts[seed]):
      r.add("m", seed, {"acc": m})
      r.add("b", seed, {"acc": b})
  merged = merge(parts)
  assert merged.seeds() == [0, 1] and merged.meta == {"time_s": 3.0, "merged_from": 2}
  for arm in ("m", "b"):
    assert merged.per_seed(arm, "acc") == together.per_seed(arm, "acc")
  with pytest.raises(ValueError, match="seed 1 is in part 0 and in part 1"):
    merge([merged, parts[1]])
  with pytest.raises(ValueError, match="different experiments"):
    merge([parts[0], Results("y")])
  with pytest.raises(ValueError, match="at least one"):
    merge([])


def test_comparison_table_reports_means_and_paired_verdicts():
  r = Results("x")
  for seed, (m, b) in enumerate([(0.9, 0.8), (0.92, 0.8), (0.91, 0.79)]):
    r.add("m", seed, {"acc": m})
    r.add("b", seed, {"acc": b})
  text = tables.comparison_table(r, "m", ["b"], [("acc", "test", "-")], scale=100)
  row = text.splitlines()[2]
  assert "91 ± 1 (n=3)" in row and "wins" in row and "+11.33" in row


def test_classification_report_rebuilds_from_saved_results(tmp_path):
  r = Results(
    "supervised_classification",
    meta={
      "dataset": "digits",
      "class_names": ["a", "b"],
      "train_examples": 10,
      "steps": 3,
      "confusion": [[3, 1], [0, 4]],
      "majority": 0.5,
      "time_s": 1.0,
    },
  )
  r.add("resnet", 0, {"accuracy": 0.875, "mean_class_accuracy": 0.875})
  r.save(tmp_path)
  write = experiments.get_write_report(Results.load(tmp_path).experiment)
  summary = write(Results.load(tmp_path), str(tmp_path))
  assert summary["rows"][0]["value"] == 0.875 and summary["rows"][0]["baseline_value"] == 0.5
  report = (tmp_path / "report.md").read_text()
  assert "| accuracy | 0.875 |" in report
  assert (tmp_path / "plots" / "confusion.png").exists()
