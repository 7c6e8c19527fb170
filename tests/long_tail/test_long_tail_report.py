"""Tests of research.long_tail.report on hand-made records (no training)."""

import json

import numpy as np
from sklearn.decomposition import PCA

from configs import long_tail_digits
from research.long_tail import report
from research.study import stats
from research.study.results import Results

COUNTS = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]


def make_results(dual_few, ce_few, *, with_triplet=False, softmax_shift=0.0):
  """Records of `dual` and `ce` (and `triplet`) over len(dual_few) seeds on rho = 10.

  Every rule gets the same numbers except `softmax`, shifted by `softmax_shift`.
  """
  config = long_tail_digits.get_config("demo").to_dict()
  config["methods"] = ("dual", "ce") + (("triplet",) if with_triplet else ())
  rs = np.random.RandomState(0)
  labels = np.repeat(np.arange(10), 3)
  results = Results(
    "long_tail",
    meta={
      "config": config,
      "images_per_step": {m: 64 for m in config["methods"]},
      "updates_per_step": {m: 1 for m in config["methods"]},
      "ratios": [
        {
          "ratio": 10.0,
          "condition": "rho10",
          "counts": COUNTS,
          "head_classes": [0, 1, 2, 3, 4],
          "test_labels": labels.tolist(),
          "embeddings_2d": {m: rs.randn(30, 2).tolist() for m in ("dual", "ce")},
        }
      ],
      "time_s": 1.5,
    },
  )
  arms = {"dual": dual_few, "ce": ce_few}
  if with_triplet:
    arms["triplet"] = [0.1] * len(dual_few)
  for arm, few in arms.items():
    for seed, value in enumerate(few):
      records = {"head_softmax": 0.8} if arm == "dual" else {}
      for rule in report.RULES:
        v = value + (softmax_shift if rule == "softmax" and arm == "dual" else 0.0)
        acc = {"overall": 0.5 + v / 10, "many": 0.9, "medium": 0.6, "few": v}
        records |= report.rule_metrics(rule, acc | {"per_class": np.full(10, v)})
      results.add(arm, seed, records, condition="rho10")
  return results


def test_accuracy_table_uses_the_sample_std():
  results = make_results([0.40, 0.50, 0.60], [0.1, 0.2, 0.3])
  table = report.accuracy_table(results, "rho10", ("dual", "ce"), "ncm")
  # few-shot of dual: mean 50.0, sample std (ddof 1) 10.0 (ddof 0 would be 8.2).
  assert "| 50.0 ± 10.0 | 80.0 ± 0.0 |" in table
  assert "| plain CE | 52.0 ± 1.0 | 90.0 ± 0.0 | 60.0 ± 0.0 | 20.0 ± 10.0 |  |" in table


def test_one_seed_has_no_spread_and_a_missing_group_is_na():
  results = make_results([0.4], [0.1])
  few = report.summary_of(results, "dual", "ncm_few", "rho10")
  assert few.n == 1 and np.isnan(few.std)
  assert report.percent_cell(few) == "40.0"
  results.add("ce", 0, {"rare": float("nan")}, condition="rho10")
  rare = stats.summarize(results.values("ce", "rare", condition="rho10"))
  assert report.percent_cell(rare) == "n/a"


def test_verdict_needs_a_paired_win():
  clear = make_results([0.40, 0.42, 0.41], [0.10, 0.11, 0.12])
  assert "| wins |" in report.verdict_table(clear, "rho10", ("dual", "ce"))
  # Positive mean difference (+0.1) but one seed below the baseline: a tie, not a win.
  mixed = make_results([0.60, 0.60, 0.10], [0.20, 0.20, 0.60])
  table = report.verdict_table(mixed, "rho10", ("dual", "ce"))
  assert "| ties |" in table and "wins" not in table
  assert "| loses |" in report.verdict_table(
    make_results([0.10, 0.11, 0.12], [0.40, 0.42, 0.41]), "rho10", ("dual", "ce")
  )


def test_every_rule_compares_dual_and_ce_under_the_same_rule():
  # Dual wins under both NCM rules and loses under softmax (its softmax is 55 points lower).
  results = make_results([0.60, 0.62, 0.61], [0.10, 0.11, 0.12], softmax_shift=-0.55)
  table = report.verdict_table(results, "rho10", ("dual", "ce"))
  rows = [r for r in table.splitlines() if r.startswith("| plain CE")]
  assert len(rows) == 2 * len(report.RULES)  # few and overall per rule
  by_rule = {(r.split(" | ")[1], r.split(" | ")[2]): r.split(" | ")[-1] for r in rows}
  assert by_rule[("NCM, normalised embedding", "few")] == "wins |"
  assert by_rule[("NCM, normalised pooled features", "few")] == "wins |"
  assert by_rule[("argmax of the logits", "few")] == "loses |"
  rules = report.rules_table(results, "rho10", ("dual", "ce"))
  assert "| dual loss (M3: head CE + PK triplet) | 56.1 ± 0.1 | 61.0 ± 1.0 |" in rules
  assert "| 50.6 ± 0.1 | 6.0 ± 1.0 |" in rules  # dual's softmax columns


def test_claims_cover_only_the_arms_that_ran_with_one_sentence_each():
  results = make_results([0.40, 0.42, 0.41], [0.10, 0.11, 0.12], with_triplet=True)
  entry = results.meta["ratios"][0]
  sentences = report.claim_sentences(results, entry, ("dual", "ce", "triplet"))
  assert len(sentences) == 2
  assert sentences[0].startswith("- rho 10, the dual loss beats plain CE: helps on few-shot")
  assert "+30.0 points" in sentences[0] and "3 seeds" in sentences[0]
  assert "head CE branch" in sentences[1] and "helps" in sentences[1]
  tie = make_results([0.60, 0.60, 0.10], [0.20, 0.20, 0.60])
  (sentence,) = report.claim_sentences(tie, tie.meta["ratios"][0], ("dual", "ce"))
  assert ": ties on few-shot" in sentence and "not resolvable" in sentence
  one = make_results([0.4], [0.1])
  assert "not judged" in report.claim_sentences(one, one.meta["ratios"][0], ("dual", "ce"))[0]


def test_seeds_needed_and_resolution_rows():
  # 2 SE = 2 s / sqrt(n) < 3 points: s = 3 points -> n > 4, so 5 seeds.
  assert report.seeds_needed(0.03) == 5
  assert report.seeds_needed(0.0) == 2 and report.seeds_needed(float("nan")) is None
  results = make_results([0.40, 0.50, 0.45], [0.10, 0.11, 0.12])  # diffs 30, 39, 33 points
  (row,) = report.resolution_rows(results, "rho10", ("dual", "ce"), "ncm")
  diffs = np.array([0.30, 0.39, 0.33])
  two_se = 200 * diffs.std(ddof=1) / np.sqrt(3)
  assert row[:2] == ["plain CE", 3] and row[2] == f"{two_se:.1f}"
  assert row[3] == ("yes" if two_se < 3 else "no")
  assert row[4] == report.seeds_needed(diffs.std(ddof=1))
  text = report.resolution_text(results, results.meta["ratios"][0], ("dual", "ce"), 20)
  assert "2 classes and 6 test images" in text  # classes 8 and 9, 3 test images each


def test_shot_groups_and_setup_row():
  many, medium, few = report.shot_groups(np.array(COUNTS), many=50, few=20)
  assert many.tolist() == [0, 1, 2, 3] and medium.tolist() == [4, 5, 6, 7]
  assert few.tolist() == [8, 9]
  entry = make_results([0.4], [0.1]).meta["ratios"][0]
  assert report.setup_row(entry, 50, 20) == [
    "10",
    "124 96 74 57 44 34 26 20 16 12",
    503,
    "4 / 4 / 2",
    "0 1 2 3 4",
  ]


def test_per_class_series_is_sorted_by_class_size_with_ddof1_bands():
  results = make_results([0.2, 0.4], [0.1, 0.1])
  series = report.per_class_series(results, "rho10", ("dual",), COUNTS)
  xs, means, std = series[report.METHOD_NAMES["dual"]]
  assert xs == sorted(COUNTS, reverse=True)
  np.testing.assert_allclose(means, 0.3)
  np.testing.assert_allclose(std, np.std([0.2, 0.4], ddof=1))
  one_seed = report.per_class_series(make_results([0.2], [0.1]), "rho10", ("dual",), COUNTS)
  assert one_seed[report.METHOD_NAMES["dual"]][2] is None


def test_summary_rows_compare_dual_with_plain_ce_means():
  results = make_results([0.40, 0.50, 0.60], [0.1, 0.2, 0.3], with_triplet=True)
  rows = report.summary_rows(results, results.meta["ratios"][0], ("dual", "triplet", "ce"))
  assert [r["metric"] for r in rows] == [
    "few-shot accuracy, NCM (rho=10, 3 seeds)",
    "overall accuracy, NCM (rho=10, 3 seeds)",
  ]
  assert rows[0]["baseline"] == "plain CE"
  assert rows[0]["value"] == np.float64(0.5) and np.isclose(rows[0]["baseline_value"], 0.2)
  assert report.summary_rows(results, results.meta["ratios"][0], ("dual",)) == []


def test_write_report_from_saved_results_alone(tmp_path):
  results = make_results([0.40, 0.42, 0.41], [0.10, 0.11, 0.12])
  summary = report.write_report(results, str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert "# M3 long-tail dual-loss training on digits-LT" in text
  assert "3 seeds (model init and batch order)" in text and "sample std (ddof 1)" in text
  assert "| 503 | 4 / 4 / 2 |" in text and "| wins |" in text
  assert (tmp_path / "plots" / "per_class_accuracy_rho10.png").exists()
  assert (tmp_path / "plots" / "embeddings_rho10.png").exists()
  few = summary["metrics"]["rho10"]["dual"]["ncm_few"]
  np.testing.assert_allclose([few["mean"], few["std"]], [0.41, 0.01])
  assert summary["claims"]["rho10"] == {"ce": {"few": "wins", "overall": "wins"}}
  assert "## Claims, imbalance ratio 10" in text and "seeds needed" in text
  assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]
  results.save(tmp_path)
  (tmp_path / "report.md").unlink()
  assert report.write_report(Results.load(tmp_path), str(tmp_path)) == summary
  assert (tmp_path / "report.md").read_text() == text


def test_pca_2d_matches_sklearn_up_to_sign():
  x = np.random.RandomState(3).randn(50, 6) * np.arange(1, 7)
  np.testing.assert_allclose(np.abs(report.pca_2d(x)), np.abs(PCA(2).fit_transform(x)), atol=1e-8)
