r"""Rebuilds a run's report from its saved results, without training.

    python -m launch.report --workdir=DIR

Reads `DIR/results.json`, finds the experiment's `write_report` and writes `report.md`, the
plots built from results and `summary.json` again. A notebook calls the same function:
`research.experiments.rebuild_report(DIR)`.
"""

import json

from absl import app, flags, logging

from research import experiments

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding results.json.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  """Rebuilds the report."""
  del argv
  summary = experiments.rebuild_report(_WORKDIR.value)
  logging.info("rebuilt %s/report.md: %s", _WORKDIR.value, json.dumps(summary.get("rows", [])))


if __name__ == "__main__":
  app.run(main)
