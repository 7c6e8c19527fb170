"""The M3 report as pure functions of `Results`: tables, paired verdicts, claims, plots, summary.

Every number comes from the records `(arm, seed, "test", "rho<ratio>", metric, value)` that
`experiment.train_and_evaluate` saves: per prediction rule `r` of `RULES`, metrics
`r_overall`, `r_many`, `r_medium`, `r_few` and `r_class<c>_accuracy`; `head_softmax` for the
dual arms; `steps` and `updates`. `Results.meta` holds the config, images and updates per step,
and per ratio the class counts, head classes, test labels and 2-D PCA of the first seed's test
embeddings. Spread over seeds is the sample std (ddof 1) of `research.study.stats`; a claim
holds only with a paired win (`stats.paired_verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np

from research.study import figures, stats, tables
from research.study.results import Results

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHOD_NAMES = {
  "dual": "dual loss (M3: head CE + PK triplet)",
  "dual_all_head": "dual loss, every class in the head",
  "dual_alternating": "dual loss, alternating updates",
  "ce": "plain CE",
  "ce_balanced": "CE, class-balanced sampling",
  "logit_adjusted": "logit-adjusted CE",
  "triplet": "triplet only (same P x K)",
}
DUAL_ARMS = ("dual", "dual_all_head", "dual_alternating")
CE_ARMS = ("ce", "ce_balanced", "logit_adjusted")
RULES = ("ncm", "ncm_pooled", "softmax")
HEADLINE_RULE = "ncm"
RULE_NAMES = {
  "ncm": "NCM, normalised embedding",
  "ncm_pooled": "NCM, normalised pooled features",
  "softmax": "argmax of the logits",
}
GROUPS = ("overall", "many", "medium", "few")
EMBEDDING_PLOT_ARMS = ("dual", "dual_all_head", "ce", "triplet")
RESOLUTION_POINTS = 3.0  # the few-shot difference (points) the issue asks to resolve

# What each control isolates: (control arm, the claim in words, rules it is judged under).
CLAIMS = (
  ("ce", "the dual loss beats plain CE", RULES),
  ("ce_balanced", "the dual loss beats class-balanced CE", RULES),
  ("logit_adjusted", "the dual loss beats logit-adjusted CE", RULES),
  ("dual_all_head", "the head split helps (CE on the head set only, not on every class)", RULES),
  ("triplet", "the head CE branch helps the whole-set triplet training", (HEADLINE_RULE,)),
  ("dual_alternating", "joint updates beat alternating ones", (HEADLINE_RULE,)),
)


def metric(rule: str, name: str) -> str:
  """The record name of `name` (a group or `class<c>_accuracy`) under `rule`."""
  return f"{rule}_{name}"


def rule_metrics(rule: str, acc: dict) -> dict[str, float]:
  """Records of one rule from `core.shot_group_accuracy`'s dict (groups and per-class)."""
  out = {metric(rule, g): float(acc[g]) for g in GROUPS}
  out |= {metric(rule, f"class{c}_accuracy"): float(v) for c, v in enumerate(acc["per_class"])}
  return out


def pca_2d(x: np.ndarray) -> np.ndarray:
  """[N, D] -> [N, 2] float64 projection on the two leading principal components."""
  x = np.asarray(x, np.float64)
  centred = x - x.mean(0, keepdims=True)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  return centred @ vt[:2].T


def summary_of(results: Results, arm: str, name: str, condition: str) -> stats.SeedSummary:
  """`SeedSummary` over seeds of one record name."""
  return stats.summarize(results.values(arm, name, condition=condition))


def percent_cell(s: stats.SeedSummary) -> str:
  """`mean ± std` in percent with one decimal; the mean alone for one seed; n/a for none."""
  if s.n == 0:
    return "n/a"
  return f"{100 * s.mean:.1f} ± {100 * s.std:.1f}" if s.n > 1 else f"{100 * s.mean:.1f}"


def accuracy_table(results: Results, condition: str, methods: Sequence[str], rule: str) -> str:
  """One row per arm: accuracy under `rule` overall and per shot group; dual arms' head softmax."""
  rows = []
  for m in methods:
    cells = [percent_cell(summary_of(results, m, metric(rule, g), condition)) for g in GROUPS]
    head = percent_cell(summary_of(results, m, "head_softmax", condition)) if m in DUAL_ARMS else ""
    rows.append([METHOD_NAMES[m]] + cells + [head])
  return tables.markdown_table(
    ["method", "overall", "many-shot", "medium-shot", "few-shot", "head softmax (head classes)"],
    rows,
  )


def rules_table(results: Results, condition: str, methods: Sequence[str]) -> str:
  """One row per arm: overall and few-shot accuracy under every prediction rule."""
  rows = []
  for m in methods:
    row = [METHOD_NAMES[m]]
    for rule in RULES:
      for g in ("overall", "few"):
        row.append(percent_cell(summary_of(results, m, metric(rule, g), condition)))
    rows.append(row)
  header = ["method"] + [f"{RULE_NAMES[r]}: {g}" for r in RULES for g in ("overall", "few")]
  return tables.markdown_table(header, rows)


def claim_verdict(
  results: Results, control: str, rule: str, group: str, condition: str
) -> stats.Verdict:
  """Paired verdict of `dual` against `control` on one group's accuracy under one rule."""
  name = metric(rule, group)
  return stats.paired_verdict(
    results.per_seed("dual", name, condition=condition),
    results.per_seed(control, name, condition=condition),
  )


def claims_in(methods: Sequence[str]) -> list[tuple[str, str, tuple[str, ...]]]:
  """The `CLAIMS` whose control arm ran beside `dual`."""
  return [c for c in CLAIMS if c[0] in methods and "dual" in methods]


def verdict_table(results: Results, condition: str, methods: Sequence[str]) -> str:
  """Dual against each control, per rule, on few-shot and overall accuracy, paired over seeds."""
  rows = []
  for control, _, rules in claims_in(methods):
    for rule in rules:
      for group in ("few", "overall"):
        v = claim_verdict(results, control, rule, group, condition)
        rows.append(
          [
            METHOD_NAMES[control],
            RULE_NAMES[rule],
            group,
            percent_cell(summary_of(results, "dual", metric(rule, group), condition)),
            percent_cell(summary_of(results, control, metric(rule, group), condition)),
            f"{100 * v.mean_diff:+.1f}" if v.n else "n/a",
            f"{200 * v.se:.1f}" if v.n > 1 else "n/a",
            v.verdict if v.n >= 2 else "ties (fewer than 2 seeds)",
          ]
        )
  header = ["control", "rule", "group", "dual", "control value", "diff", "2 SE", "verdict"]
  return tables.markdown_table(header, rows)


def seeds_needed(diff_std: float, points: float = RESOLUTION_POINTS) -> int | None:
  """Seeds for 2 SE of a paired difference to fall below `points` (fractions: points / 100).

  With per-seed differences of sample std `s`, 2 SE = 2 s / sqrt(n) < points / 100 needs
  n > (200 s / points)^2; at least 2 (a verdict needs 2 pairs). None when `s` is NaN.
  """
  if math.isnan(diff_std):
    return None
  return max(2, math.floor((200.0 * diff_std / points) ** 2) + 1)


def resolution_rows(results: Results, condition: str, methods: Sequence[str], rule: str) -> list:
  """Per control: 2 SE of the paired few-shot difference, resolvable at 3 points, seeds needed."""
  rows = []
  for control, _, _ in claims_in(methods):
    v = claim_verdict(results, control, rule, "few", condition)
    if v.n < 2:
      rows.append([METHOD_NAMES[control], v.n, "n/a", "n/a", "not resolvable (< 2 seeds)"])
      continue
    two_se = 200 * v.se
    diff_std = v.se * math.sqrt(v.n)
    resolvable = "yes" if two_se < RESOLUTION_POINTS else "no"
    rows.append([METHOD_NAMES[control], v.n, f"{two_se:.1f}", resolvable, seeds_needed(diff_std)])
  return rows


def resolution_text(results: Results, entry: dict, methods: Sequence[str], few: int) -> str:
  """The resolution table of one ratio and the test-sampling floor of the few-shot group."""
  counts = np.asarray(entry["counts"])
  labels = np.asarray(entry["test_labels"])
  few_classes = np.flatnonzero(counts < few)
  n_test = int(np.isin(labels, few_classes).sum())
  table = tables.markdown_table(
    ["control", "seeds", "2 SE of few-shot diff (points)", "3 points resolvable", "seeds needed"],
    resolution_rows(results, entry["condition"], methods, HEADLINE_RULE),
  )
  floor = 100 * math.sqrt(0.25 / n_test) if n_test else float("nan")
  return (
    f"{table}\n\nThe few-shot group has {len(few_classes)} classes and {n_test} test images; "
    f"one model's few-shot accuracy then has a test-sampling SE of up to {floor:.1f} points "
    "(p = 0.5). Seeds needed: the smallest n with 2 SE < 3 points at the observed std of the "
    "paired differences (the test images are shared, so the test-sampling part of the "
    "difference's spread comes only from the images the two models disagree on)."
  )


def claim_sentences(results: Results, entry: dict, methods: Sequence[str]) -> list[str]:
  """One sentence per claim: helps, ties or hurts, with the number (headline rule, few-shot)."""
  condition, ratio = entry["condition"], entry["ratio"]
  words = {stats.WINS: "helps", stats.TIES: "ties", stats.LOSES: "hurts"}
  out = []
  for control, claim, _ in claims_in(methods):
    few = claim_verdict(results, control, HEADLINE_RULE, "few", condition)
    overall = claim_verdict(results, control, HEADLINE_RULE, "overall", condition)
    if few.n < 2:
      out.append(f"- rho {ratio:g}, {claim}: not judged (fewer than 2 seeds).")
      continue
    resolvable = "" if 200 * few.se < RESOLUTION_POINTS else "; 3 points not resolvable here"
    out.append(
      f"- rho {ratio:g}, {claim}: {words[few.verdict]} on few-shot accuracy "
      f"({100 * few.mean_diff:+.1f} points vs {METHOD_NAMES[control]}, 2 SE "
      f"{200 * few.se:.1f}, {few.n} seeds{resolvable}) and {words[overall.verdict]} overall "
      f"({100 * overall.mean_diff:+.1f}, 2 SE {200 * overall.se:.1f})."
    )
  return out


def shot_groups(counts: np.ndarray, many: int, few: int) -> tuple[np.ndarray, ...]:
  """Class ids of the many-, medium- and few-shot groups by training count."""
  many_ids = np.flatnonzero(counts > many)
  few_ids = np.flatnonzero(counts < few)
  medium_ids = np.setdiff1d(np.arange(len(counts)), np.concatenate([many_ids, few_ids]))
  return many_ids, medium_ids, few_ids


def setup_row(entry: dict, many: int, few: int) -> list:
  """The set-up table's row of one ratio (`Results.meta["ratios"]` entry)."""
  counts = np.asarray(entry["counts"])
  groups = shot_groups(counts, many, few)
  small = len(counts) <= 20
  return [
    f"{entry['ratio']:g}",
    " ".join(str(c) for c in counts) if small else f"{counts.max()} .. {counts.min()}",
    int(counts.sum()),
    " / ".join(str(len(g)) for g in groups),
    " ".join(map(str, entry["head_classes"])) if small else len(entry["head_classes"]),
  ]


def setup_text(config: dict, meta: dict, num_seeds: int) -> str:
  """The report's description of the protocol, from the saved config (a plain dict)."""
  n = num_seeds
  images, updates = meta["images_per_step"], meta.get("updates_per_step", {})
  budget = ", ".join(
    f"{m} {images[m]}" + (f" ({updates[m]} updates)" if updates.get(m, 1) > 1 else "")
    for m in config["methods"]
  )
  head, model, optim = config["head"], config["model"], config["optim"]
  tri, loss = config["triplet"], config["loss"]
  schedule = config["train"].get("schedule", "joint")
  head_rule = {
    "threshold": f"classes with more than {head.get('threshold')} training images",
    "ratio": f"the top {head.get('ratio')} fraction of classes by count (ties at the cut excluded)",
    "count": f"the top {head.get('top_n')} classes by count (ties at the cut excluded)",
  }[head["mode"]]
  lines = [
    f"- Same ResNet (stages {tuple(model['stage_sizes'])}, widths "
    f"{tuple(model['widths'])}, embedding {model['embedding_dim']}), optimizer "
    f"{optim['name']} lr {optim['learning_rate']} ({optim['schedule']}), "
    f"{config['train']['steps']} steps for every arm; images per step: {budget}. An "
    "alternating step is one update on the head batch then one on the PK batch (same images "
    "as a joint step; its learning-rate schedule counts both updates).",
    f"- Head set (step 1): {head_rule}; head batch {config['train']['head_batch_size']} "
    f"({head['sampling']} sampling); PK batch P={tri['p']} x K={tri['k']} from the "
    f"whole set, the same for the dual arms and triplet-only; triplet {tri['mining']}, margin "
    f"{tri['margin']}; lambda_ce={loss['lambda_ce']}, lambda_tri={loss['lambda_tri']}; schedule "
    f"of `dual` and `dual_all_head`: {schedule}. The head classifier is the head-class rows of "
    "the shared classifier layer, its softmax over the head classes only.",
    "- Prediction rules, applied to every arm: NCM = nearest class mean by cosine similarity "
    "(class means over all classes from the long-tailed training set) of the normalised "
    "embedding (the headline rule, METHODS.md M3 step 5) or of the normalised pooled backbone "
    "features; softmax = argmax of the logits over all classes (logit-adjusted CE: raw logits, "
    f"tau={loss['logit_adjust_tau']}). By construction the CE arms never train the embedding "
    "layer (a random projection of their pooled features), the dual arm's classifier columns "
    "of non-head classes stay at their initialisation, and triplet-only never trains the "
    "classifier. 'head softmax' is a dual arm's head classifier on the test images of its "
    "head classes.",
    f"- Shot groups by training count: many > {config['eval']['many']}, few < "
    f"{config['eval']['few']}, medium otherwise (group accuracy = mean of its classes' "
    "accuracies).",
    f"- {n} seed{'s' if n > 1 else ''} (model init and batch order); "
    + ("'a ± b' is mean ± sample std (ddof 1) over seeds." if n > 1 else "no spread at this size.")
    + " A claim holds only with a paired win: every seed's difference of one sign and the mean "
    "beyond 2 standard errors; otherwise it is a tie. The long-tailed subset itself is fixed "
    "(seed 0). No value was tuned on the test set.",
  ]
  if config.get("notes"):
    lines.append(f"- {config['notes']}")
  return "\n".join(lines)


def per_class_series(results: Results, condition: str, methods: Sequence[str], counts) -> dict:
  """{arm name: (class sizes, mean accuracy, std or None)} per class (headline rule)."""
  counts = np.asarray(counts)
  order = np.argsort(-counts, kind="stable")
  several_seeds = len(results.seeds()) > 1
  series = {}
  for m in methods:
    per_class = [
      summary_of(results, m, metric(HEADLINE_RULE, f"class{c}_accuracy"), condition) for c in order
    ]
    series[METHOD_NAMES[m]] = (
      counts[order].tolist(),
      [s.mean for s in per_class],
      np.array([s.std for s in per_class]) if several_seeds else None,
    )
  return series


def plot_embeddings(panels: dict[str, tuple[Any, Any]], num_classes: int, path: str) -> str:
  """Side-by-side 2-D scatter plots: {title: ([N, 2] points, [N] labels)}."""
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
  palette = figures.class_palette(num_classes)
  for ax, (title, (xy, labels)) in zip(axes[0], panels.items()):
    xy = np.asarray(xy, np.float64)
    ax.scatter(xy[:, 0], xy[:, 1], c=palette[np.asarray(labels)], s=6)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [
    plt.Line2D([], [], marker="o", ls="", color=palette[c], label=str(c))
    for c in range(min(num_classes, 20))
  ]
  axes[0, -1].legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
  return figures.save_figure(fig, path)


def ratio_sections(
  results: Results, entry: dict, methods: Sequence[str], few: int, workdir
) -> list:
  """The results, claims and plots sections of one ratio; draws its two plots."""
  condition, ratio = entry["condition"], entry["ratio"]
  counts = entry["counts"]
  body = (
    f"Headline rule ({RULE_NAMES[HEADLINE_RULE]}):\n\n"
    + accuracy_table(results, condition, methods, HEADLINE_RULE)
    + "\n\nEvery arm under every rule (overall / few-shot):\n\n"
    + rules_table(results, condition, methods)
    + "\n\nDual loss against each control, same rule for both (percentage points; 'wins' "
    "needs every seed's difference positive and the mean above 2 standard errors):\n\n"
    + verdict_table(results, condition, methods)
  )
  claims = "\n".join(claim_sentences(results, entry, methods))
  claims += "\n\nResolution of the few-shot comparisons (headline rule):\n\n"
  claims += resolution_text(results, entry, methods, few)
  figures.plot_curves(
    per_class_series(results, condition, methods, counts),
    "training images of the class",
    f"test accuracy ({RULE_NAMES[HEADLINE_RULE]})",
    tables.plot_path(workdir, f"per_class_accuracy_rho{ratio:g}.png"),
  )
  panels = {
    METHOD_NAMES[m]: (entry["embeddings_2d"][m], entry["test_labels"])
    for m in EMBEDDING_PLOT_ARMS
    if m in entry["embeddings_2d"]
  }
  plot_embeddings(panels, len(counts), tables.plot_path(workdir, f"embeddings_rho{ratio:g}.png"))
  return [
    (f"Results, imbalance ratio {ratio:g} (test accuracy %, balanced test set)", body),
    (f"Claims, imbalance ratio {ratio:g}", claims),
    (
      f"Plots, imbalance ratio {ratio:g}",
      f"![per-class accuracy vs class size](plots/per_class_accuracy_rho{ratio:g}.png)\n\n"
      f"![2-D PCA of test embeddings, seed {results.seeds()[0]}]"
      f"(plots/embeddings_rho{ratio:g}.png)",
    ),
  ]


def summary_rows(results: Results, entry: dict, methods: Sequence[str]) -> list[dict]:
  """The demo table's rows: dual against plain CE (or the first control), headline rule."""
  controls = [m for m in methods if m != "dual"]
  if not controls or "dual" not in methods:
    return []
  control = "ce" if "ce" in controls else controls[0]
  n = len(results.seeds())
  rows = []
  for group, label in (("few", "few-shot accuracy"), ("overall", "overall accuracy")):
    dual, base = (
      summary_of(results, m, metric(HEADLINE_RULE, group), entry["condition"])
      for m in ("dual", control)
    )
    rows.append(
      tables.summary_row(
        f"{label}, NCM (rho={entry['ratio']:g}, {n} seed{'s' if n > 1 else ''})",
        dual.mean,
        METHOD_NAMES[control],
        base.mean,
      )
    )
  return rows


def write_report(results: Results, workdir: str) -> dict:
  """`report.md`, plots and `summary.json` from the saved results alone; returns the summary."""
  meta = results.meta
  config = meta["config"]
  methods = tuple(config["methods"])
  many, few = config["eval"]["many"], config["eval"]["few"]
  num_seeds = len(results.seeds())
  sections, metrics, claims = [], {}, {}
  for entry in meta["ratios"]:
    condition = entry["condition"]
    names = [metric(r, g) for r in RULES for g in GROUPS] + ["head_softmax"]
    metrics[condition] = {
      m: {
        name: {"mean": s.mean, "std": s.std}
        for name in names
        if (s := summary_of(results, m, name, condition)).n
      }
      for m in methods
    }
    claims[condition] = {
      control: {
        group: claim_verdict(results, control, HEADLINE_RULE, group, condition).verdict
        for group in ("few", "overall")
      }
      for control, _, _ in claims_in(methods)
    }
    sections += ratio_sections(results, entry, methods, few, workdir)
  setup = tables.markdown_table(
    [
      "imbalance ratio",
      "training images per class",
      "total",
      "many / medium / few classes",
      "head classes",
    ],
    [setup_row(entry, many, few) for entry in meta["ratios"]],
  )
  setup += "\n\n" + setup_text(config, meta, num_seeds)
  sections.insert(0, ("Set-up", setup))
  dataset = config["data"]["name"]
  tables.write_report(workdir, f"M3 long-tail dual-loss training on {dataset}-LT", sections)
  out = {
    "experiment": results.experiment,
    "dataset": dataset,
    "time_s": meta["time_s"],
    "metrics": metrics,
    "claims": claims,
    "rows": summary_rows(results, meta["ratios"][0], methods),
  }
  tables.write_summary(workdir, out)
  return out
