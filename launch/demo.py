r"""The main job: every available experiment at demo size on the embedded data, one report.

    python -m launch.demo --workdir=runs/demo [--size=demo|smoke] [--only=name,...]

Writes `<workdir>/report.md` with a table (experiment, metric, baseline, value, time) and
links to each experiment's own report and plots in `<workdir>/<experiment>/`. Each experiment
resumes from its checkpoints when the command is run again. The workdir may be any `etils.epath`
location (`gs://...`).
"""

import importlib
import time

from absl import app, flags, logging
from etils import epath

from research import experiments
from research.study import tables
from research.training import progress, tensorboard

# (name, config module): one entry per experiment in the demo, in running order.
DEMO_CONFIGS = (
  ("classification_digits", "configs.classification_digits"),
  ("segmentation_street", "configs.segmentation_street"),
  ("uap_street", "configs.uap_street"),
  ("norm_selection_digits", "configs.norm_selection_digits"),
  ("long_tail_digits", "configs.long_tail_digits"),
  ("ot_perturbation_street", "configs.ot_perturbation_street"),
  ("incremental_panoptic_street", "configs.incremental_panoptic_street"),
)

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory of the demo.")
_SIZE = flags.DEFINE_enum("size", "demo", ["demo", "smoke"], "Size of every experiment.")
_ONLY = flags.DEFINE_list("only", [], f"Subset of {[n for n, _ in DEMO_CONFIGS]} to run.")


def run_demo(workdir: str, size: str, only: tuple[str, ...] = ()) -> epath.Path:
  """Runs the demo experiments and writes the combined report; returns its path."""
  known = [n for n, _ in DEMO_CONFIGS]
  unknown = sorted(set(only) - set(known))
  if unknown:
    raise ValueError(f"--only={unknown} is not known: choose from {known}")
  rows, links = [], []
  started = time.perf_counter()
  for name, module in DEMO_CONFIGS:
    if only and name not in only:
      continue
    config = importlib.import_module(module).get_config(size)
    logging.info("demo: running %s (%s)", name, size)
    summary = experiments.get_train_and_evaluate(config.experiment)(
      config, str(epath.Path(workdir) / name)
    )
    for row in summary["rows"]:
      rows.append(
        [
          name,
          row["metric"],
          row["baseline"],
          row["baseline_value"],
          row["value"],
          f"{summary['time_s']:.0f} s",
        ]
      )
    links.append(f"- [{name}]({name}/report.md)")
  table = tables.markdown_table(
    ["experiment", "metric", "baseline", "baseline value", "value", "time"], rows
  )
  return tables.write_report(
    workdir,
    f"Demo ({size} size)",
    [
      ("Results", table + f"\n\nTotal time: {time.perf_counter() - started:.0f} s."),
      ("Per-experiment reports", "\n".join(links)),
    ],
  )


def main(argv):
  """Runs the demo and prints its report."""
  del argv
  progress.quiet_library_logs()
  try:
    path = run_demo(_WORKDIR.value, _SIZE.value, tuple(_ONLY.value))
  finally:
    tensorboard.flush_all()  # a workdir that is not local: metrics and events not yet written
  print(path.read_text())


if __name__ == "__main__":
  app.run(main)
