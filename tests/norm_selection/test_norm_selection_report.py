"""Tests of M2's report on hand-made results (no training)."""

import json

import pytest

from research.norm_selection import report
from research.norm_selection.settings import FULL, METHOD, RANDOM_DRAW
from research.study.results import Results

META = {
  "dataset": "digits",
  "class_names": ["a", "b"],
  "m": 2,
  "a": None,
  "mean_over": "original",
  "norm_order": "2",
  "grouping": "labels",
  "warm_start": True,
  "stop_conditions": {"max_rounds": 2},
  "steps_per_round": 3,
  "batch_size": 4,
  "train_step_compilations": 1,
  "time_s": 1.0,
}


def add_round(results, arm, seed, r, accuracy, labels, correct=0, remaining=10, reads=0):
  results.add(
    arm,
    seed,
    {
      "accuracy": accuracy,
      "mean_class_accuracy": accuracy,
      "worst_class_accuracy": accuracy / 2,
      "class_0": accuracy,
      "class_1": accuracy / 2,
    },
    split="test",
    condition=f"round{r}",
  )
  pool = {"num_labels": labels, "num_new": 2, "num_tested": 0, "num_correct": correct}
  pool.update(label_reads=reads, labels_seen=labels + reads, train_steps=3 * r)
  results.add(arm, seed, {**pool, "num_remaining": remaining}, split="pool", condition=f"round{r}")


def make_results(method, random, full=None, seeds=(0, 1, 2), random_draw=None):
  """`method` / `random` / `random_draw`: per seed, each round's accuracy; `full`: per seed.

  The loops (method, random_draw) read 16 pool labels per round; the baseline none.
  """
  results = Results(report.EXPERIMENT, meta={**META, "stop_reasons": {METHOD: {}}})
  for seed in seeds:
    for r, acc in enumerate(method[seed], 1):
      add_round(results, METHOD, seed, r, acc, 4 * r, correct=3, remaining=10 - 5 * r, reads=16 * r)
    results.meta["stop_reasons"][METHOD][str(seed)] = "max_rounds"
    if random_draw is not None:
      for r, acc in enumerate(random_draw[seed], 1):
        add_round(results, RANDOM_DRAW, seed, r, acc, 4 * r + 1, correct=2, reads=17 * r)
      results.meta["stop_reasons"].setdefault(RANDOM_DRAW, {})[str(seed)] = "pool_empty"
    for r, acc in enumerate(random[seed], 1):
      add_round(results, "random", seed, r, acc, 4 * r)
    if full is not None:
      add_round(results, FULL, seed, 1, full[seed], 20)
  return results


def test_a_consistent_lead_wins_and_one_contrary_seed_ties():
  wins = make_results({0: [0.5], 1: [0.6], 2: [0.7]}, {0: [0.4], 1: [0.5], 2: [0.6]})
  assert report.verdict_counts(wins) == {"random": {"wins": 1, "ties": 0, "loses": 0}}
  # A positive mean difference that one seed contradicts is a tie, not a win.
  tie = make_results({0: [0.9], 1: [0.6], 2: [0.7]}, {0: [0.4], 1: [0.7], 2: [0.6]})
  ((_, _, _, verdict),) = report.verdicts(tie)
  assert verdict.mean_diff > 0 and verdict.verdict == "ties"


def test_differences_below_half_a_point_tie():
  results = make_results({0: [0.503], 1: [0.504], 2: [0.503]}, {0: [0.5], 1: [0.5], 2: [0.5]})
  assert report.verdict_counts(results)["random"]["ties"] == 1


def test_one_seed_never_wins():
  results = make_results({0: [0.9]}, {0: [0.1]}, seeds=(0,))
  assert report.verdict_counts(results)["random"] == {"wins": 0, "ties": 1, "loses": 0}


def test_rounds_compared_and_a_baseline_that_stopped_early_counts_with_its_last_round():
  # Seed 1's loop ran one round only: the comparison has one round.
  results = make_results({0: [0.5, 0.6], 1: [0.5]}, {0: [0.4, 0.5], 1: [0.4]}, seeds=(0, 1))
  assert report.compared_rounds(results) == 1
  results = make_results({0: [0.5, 0.6], 1: [0.5, 0.7]}, {0: [0.4], 1: [0.4, 0.3]}, seeds=(0, 1))
  assert report.compared_rounds(results) == 2
  assert report.at_round(results, "random", "accuracy", 2) == {0: 0.4, 1: 0.3}


def test_plus_minus_is_the_sample_std_in_percent():
  results = make_results({0: [0.5], 1: [0.6], 2: [0.7]}, {0: [0.4], 1: [0.5], 2: [0.6]})
  rows = report.accuracy_rows(results)
  assert rows[0][:6] == [1, METHOD, "4", "16", "3", "60.0 ± 10.0"]  # ddof=1: std of .5 .6 .7
  one = make_results({0: [0.5]}, {0: [0.4]}, seeds=(0,))
  assert report.accuracy_rows(one)[0][5] == "50.0"


def test_within_one_point_of_full_data_and_loop_rows():
  results = make_results(
    {0: [0.5, 0.795], 1: [0.5, 0.8]}, {0: [0.4, 0.5], 1: [0.4, 0.5]}, {0: 0.8, 1: 0.8}, (0, 1)
  )
  assert report.within_one_point_of_full(results) == 8.0
  assert report.loop_rows(results) == [
    [METHOD, 0, 2, 8, 32, 40, 6, 0, "max_rounds"],
    [METHOD, 1, 2, 8, 32, 40, 6, 0, "max_rounds"],
  ]
  no_full = make_results({0: [0.5]}, {0: [0.4]}, seeds=(0,))
  assert report.within_one_point_of_full(no_full) is None


def test_write_report_rebuilds_the_same_files_from_saved_results(tmp_path):
  results = make_results(
    {0: [0.5, 0.6], 1: [0.5, 0.7]}, {0: [0.4, 0.5], 1: [0.4, 0.5]}, {0: 0.9, 1: 0.9}, (0, 1)
  )
  summary = report.write_report(results, str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert "| 2 | norm_rule | 8 | 32 | 6 | 65.0 ± 7.1 |" in text
  assert "does not get within 1 point" in text and "(max_rounds)" in text
  assert [row["baseline"] for row in summary["rows"]] == ["random selection", "full data (20)"]
  assert summary["rows"][0]["value"] == pytest.approx(0.65)
  results.save(tmp_path)
  again = report.write_report(Results.load(tmp_path), str(tmp_path))
  assert (tmp_path / "report.md").read_text() == text
  assert again == summary == json.loads((tmp_path / "summary.json").read_text())


def test_random_draw_loop_is_the_first_control_with_pool_labels_read_beside_labels_used(tmp_path):
  results = make_results(
    {0: [0.5, 0.7], 1: [0.6, 0.8], 2: [0.7, 0.9]},
    {0: [0.4, 0.5], 1: [0.5, 0.6], 2: [0.6, 0.7]},
    {0: 0.95, 1: 0.95, 2: 0.95},
    random_draw={0: [0.5, 0.6], 1: [0.6, 0.7], 2: [0.7, 0.8]},
  )
  assert report.controls(results) == [RANDOM_DRAW, "random"]
  assert report.arms_in_order(results) == [METHOD, RANDOM_DRAW, "random", FULL]
  by_round = {(r, name): v for r, _, name, v in report.verdicts(results)}
  assert by_round[(1, RANDOM_DRAW)].verdict == "ties"  # equal accuracies
  assert by_round[(2, RANDOM_DRAW)].verdict == "wins"
  assert by_round[(2, RANDOM_DRAW)].mean_diff == pytest.approx(0.1)
  rows = {(row[0], row[1]): row for row in report.accuracy_rows(results)}
  # labels used, pool labels read and train steps of each arm, the baseline reading none.
  assert rows[(2, METHOD)][2:5] == ["8", "32", "6"]
  assert rows[(2, RANDOM_DRAW)][2:5] == ["9", "34", "6"]
  assert rows[(2, "random")][2:5] == ["8", "0", "6"]
  assert rows[("-", FULL)][2:5] == ["20", "0", "3"]
  summary = report.write_report(results, str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert "| 2 | 8 | random_draw_loop | 9 | 32 / 34 | +10.0 |" in text
  assert "the same loop drawing at random): the norm loop wins at 1, ties at 1" in text
  assert "(8 vs 9 labels used, 32 vs 34 pool labels read) it is +10.0 points (wins)" in text
  for name in ("accuracy_vs_labels", "accuracy_vs_labels_seen", "worst_class_vs_labels_seen"):
    assert (tmp_path / "plots" / f"{name}.png").exists()
  assert summary["pool_labels_read"] == {METHOD: 32.0, RANDOM_DRAW: 34.0, "random": 0.0}
  assert summary["last_round"][RANDOM_DRAW]["verdict"] == "wins"
  assert [row["baseline"] for row in summary["rows"]][0] == "random-draw loop (ablation)"
