r"""Creates a TPU VM, prepares data, runs an experiment on all its workers, fetches the results.

    python -m launch.tpu_vm --tpu=my-tpu --zone=us-central2-b --accelerator=v4-8 \
        --bucket=my-bucket --config=configs/uap_cityscapes.py \
        --override="data.domains=('day','dusk')" --prepare=cityscapes --dry_run

Each command is printed before it runs; `--dry_run` prints them without running anything.

* Only the files git tracks are shipped (`git archive HEAD`: commit first); no virtual
  environment, run folder or data cache goes along.
* The workdir defaults to `gs://<bucket>/runs/<tpu>/<config name>`: every worker writes its
  checkpoints there (Orbax) and process 0 the metrics and report (`etils.epath`).
* `--prepare=NAME` builds a catalogue dataset once, on worker 0, as ArrayRecord into
  `--data_dir` (default `gs://<bucket>/tensorflow_datasets`), which the run then reads.
* Every remote argument is quoted, so config overrides with quotes, parentheses or spaces and
  paths with spaces arrive on the workers as typed.
* The experiment runs with `--distributed`, so `jax.distributed.initialize()` joins the workers.
"""

import dataclasses
import os
import shlex
import subprocess
from collections.abc import Sequence

from absl import app, flags

_TPU = flags.DEFINE_string("tpu", None, "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", None, "GCP zone.")
_ACCELERATOR = flags.DEFINE_string("accelerator", "v4-8", "TPU accelerator type.")
_VERSION = flags.DEFINE_string("version", "tpu-ubuntu2204-base", "TPU VM software version.")
_CONFIG = flags.DEFINE_string("config", None, "Experiment config file, e.g. configs/x.py:demo.")
_OVERRIDES = flags.DEFINE_multi_string(
  "override", [], "Config override FIELD=VALUE, passed on as --config.FIELD=VALUE (repeatable)."
)
_BUCKET = flags.DEFINE_string("bucket", None, "GCS bucket for the workdir and the data.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir (default gs://BUCKET/runs/TPU/CONFIG).")
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "TFDS data dir (default gs://BUCKET/tensorflow_datasets)."
)
_PREPARE = flags.DEFINE_list("prepare", [], "Catalogue datasets to build on worker 0 first.")
_LOCAL_DIR = flags.DEFINE_string("local_dir", "runs/tpu", "Where results are copied back.")
_CREATE = flags.DEFINE_bool("create", True, "Create the TPU VM first.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands without running them.")
flags.mark_flags_as_required(["tpu", "zone", "config"])

REPO_DIR = "research"  # on the workers, relative to the home directory
ARCHIVE = "research.tar.gz"


@dataclasses.dataclass(frozen=True)
class Job:
  """What to run where; `plan(job)` turns it into commands."""

  tpu: str
  zone: str
  accelerator: str
  version: str
  config: str
  workdir: str
  data_dir: str | None = None
  overrides: tuple[str, ...] = ()
  prepare: tuple[str, ...] = ()
  local_dir: str = "runs/tpu"
  create: bool = True


def default_workdir(bucket: str | None, tpu: str, config: str) -> str:
  """`gs://<bucket>/runs/<tpu>/<config file stem>`; fails without a bucket."""
  if not bucket:
    raise ValueError(
      "--bucket is required unless --workdir is given: runs on a TPU VM write to GCS"
    )
  stem = os.path.splitext(os.path.basename(config.split(":")[0]))[0]
  return f"gs://{bucket}/runs/{tpu}/{stem}"


def _remote(*words: str) -> str:
  """A shell command line for the workers, every word quoted."""
  return " ".join(shlex.quote(w) for w in words)


def run_argv(job: Job) -> list[str]:
  """The argv of `launch.main` on every worker."""
  argv = ["python3", "-m", "launch.main", f"--config={job.config}", f"--workdir={job.workdir}"]
  if job.data_dir:
    argv.append(f"--config.data.data_dir={job.data_dir}")
  argv += [f"--config.{override}" for override in job.overrides]
  return argv + ["--distributed"]


def plan(job: Job) -> list[list[str]]:
  """The commands, in order: create, package, copy, install, prepare data, run, fetch."""
  tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = [f"--zone={job.zone}"]

  def ssh(worker: str, command: str) -> list[str]:
    return tpu_vm + ["ssh", job.tpu, *where, f"--worker={worker}", "--command", command]

  commands = []
  if job.create:
    commands.append(
      tpu_vm
      + [
        "create",
        job.tpu,
        *where,
        f"--accelerator-type={job.accelerator}",
        f"--version={job.version}",
      ]
    )
  commands += [
    ["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
    tpu_vm + ["scp", ARCHIVE, f"{job.tpu}:{ARCHIVE}", *where, "--worker=all"],
    ssh(
      "all",
      f"rm -rf {REPO_DIR} && mkdir {REPO_DIR} && tar xzf {ARCHIVE} -C {REPO_DIR} && "
      f"cd {REPO_DIR} && {_remote('pip', 'install', '-e', '.', 'jax[tpu]')}",
    ),
  ]
  for name in job.prepare:
    build = ["tfds", "build", name, "--file_format=array_record"]
    if job.data_dir:
      build.append(f"--data_dir={job.data_dir}")
    # Building a catalogue dataset needs TensorFlow; only this step installs it.
    commands.append(ssh("0", f"pip install tensorflow-cpu && {_remote(*build)}"))
  commands.append(ssh("all", f"cd {REPO_DIR} && {_remote(*run_argv(job))}"))
  if job.workdir.startswith("gs://"):
    commands.append(["gcloud", "storage", "cp", "-r", job.workdir, job.local_dir])
  else:
    commands.append(
      tpu_vm + ["scp", "--recurse", f"{job.tpu}:{job.workdir}", job.local_dir, *where, "--worker=0"]
    )
  return commands


def main(argv: Sequence[str]) -> None:
  """Prints (and unless --dry_run, runs) the plan."""
  del argv
  workdir = _WORKDIR.value or default_workdir(_BUCKET.value, _TPU.value, _CONFIG.value)
  data_dir = _DATA_DIR.value or (
    f"gs://{_BUCKET.value}/tensorflow_datasets" if _BUCKET.value and _PREPARE.value else None
  )
  job = Job(
    tpu=_TPU.value,
    zone=_ZONE.value,
    accelerator=_ACCELERATOR.value,
    version=_VERSION.value,
    config=_CONFIG.value,
    workdir=workdir,
    data_dir=data_dir,
    overrides=tuple(_OVERRIDES.value),
    prepare=tuple(_PREPARE.value),
    local_dir=_LOCAL_DIR.value,
    create=_CREATE.value,
  )
  for command in plan(job):
    print(shlex.join(command), flush=True)
    if not _DRY_RUN.value:
      subprocess.run(command, check=True)


if __name__ == "__main__":
  app.run(main)
