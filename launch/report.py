r"""Rebuilds a run's report from its saved results, without training.

    python -m launch.report --workdir=DIR
    python -m launch.report --workdir=DIR --merge=SEED0_DIR,SEED1_DIR,...


Reads `DIR/results.json`, finds the experiment's `write_report` and writes `report.md`, the
plots built from results and `summary.json` again. A notebook calls the same function:
`research.experiments.rebuild_report(DIR)`. DIR may be any `etils.epath` location (`gs://...`).

With `--merge`, the runs of one experiment on disjoint seeds (e.g. one process or host per seed,
`--config.seed=k --config.num_seeds=1`) are first merged into `DIR/results.json`
(`research.study.results.merge`).
"""

import json

from absl import app, flags, logging

from research import experiments
from research.study import results

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding results.json.")
_MERGE = flags.DEFINE_list(
  "merge", [], "Run directories on disjoint seeds whose results.json are merged into --workdir."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  """Rebuilds the report."""
  del argv
  if _MERGE.value:
    merged = results.merge(results.Results.load(d) for d in _MERGE.value)
    logging.info("merged seeds %s into %s", merged.seeds(), merged.save(_WORKDIR.value))
  summary = experiments.rebuild_report(_WORKDIR.value)
  logging.info("rebuilt %s/report.md: %s", _WORKDIR.value, json.dumps(summary.get("rows", [])))


if __name__ == "__main__":
  app.run(main)
