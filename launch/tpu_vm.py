r"""Creates a TPU VM, runs an experiment on all its workers and copies the results back.

    python -m launch.tpu_vm --tpu=my-tpu --zone=us-central2-b --accelerator=v4-8 \
        --config=configs/segmentation_street.py --workdir=/tmp/run --dry_run

Each command is printed before it runs; `--dry_run` prints them without running anything.
The experiment runs with `--distributed`, so `jax.distributed.initialize()` joins the workers.
"""

import shlex
import subprocess
from collections.abc import Sequence

from absl import app, flags

_TPU = flags.DEFINE_string("tpu", None, "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", None, "GCP zone.")
_ACCELERATOR = flags.DEFINE_string("accelerator", "v4-8", "TPU accelerator type.")
_VERSION = flags.DEFINE_string("version", "tpu-ubuntu2204-base", "TPU VM software version.")
_CONFIG = flags.DEFINE_string("config", None, "Experiment config (as for launch.main).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/research_run", "Workdir on the workers.")
_LOCAL_DIR = flags.DEFINE_string("local_dir", "runs/tpu", "Where results are copied back.")
_CREATE = flags.DEFINE_bool("create", True, "Create the TPU VM first.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands without running them.")
flags.mark_flags_as_required(["tpu", "zone", "config"])

REPO_DIR = "~/research"


def plan(
  tpu: str,
  zone: str,
  accelerator: str,
  version: str,
  config: str,
  workdir: str,
  local_dir: str,
  create: bool,
) -> list[list[str]]:
  """The gcloud commands, in order: create, copy code, install, run on all workers, copy back."""
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}", "--worker=all"]
  commands = []
  if create:
    commands.append(
      [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        tpu,
        f"--zone={zone}",
        f"--accelerator-type={accelerator}",
        f"--version={version}",
      ]
    )
  commands += [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      "--recurse",
      ".",
      f"{tpu}:{REPO_DIR}",
      f"--zone={zone}",
      "--worker=all",
    ],
    ssh + ["--command", f"cd {REPO_DIR} && pip install -e . 'jax[tpu]'"],
    ssh
    + [
      "--command",
      f"cd {REPO_DIR} && python3 -m launch.main --config={config} "
      f"--workdir={workdir} --distributed",
    ],
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      "--recurse",
      f"{tpu}:{workdir}",
      local_dir,
      f"--zone={zone}",
      "--worker=0",
    ],
  ]
  return commands


def main(argv: Sequence[str]) -> None:
  """Prints (and unless --dry_run, runs) the plan."""
  del argv
  for command in plan(
    _TPU.value,
    _ZONE.value,
    _ACCELERATOR.value,
    _VERSION.value,
    _CONFIG.value,
    _WORKDIR.value,
    _LOCAL_DIR.value,
    _CREATE.value,
  ):
    print(shlex.join(command), flush=True)
    if not _DRY_RUN.value:
      subprocess.run(command, check=True)


if __name__ == "__main__":
  app.run(main)
