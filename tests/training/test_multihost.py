"""Multi-host for real: 2 processes x 4 CPU devices, each streaming only its slice of every batch.

The test starts two processes of this file (`jax.distributed.initialize` with a local
coordinator, gloo CPU collectives, 4 fake devices each). They train a small classifier on the
embedded digits (a TFDS ArrayRecord source, augmented by the streaming pipeline) with `fit`,
checkpoint, are killed after step 5, and are started again: the second invocation resumes from
the checkpoint of step 4. The final parameters must equal those of one process with 8 devices
running the same steps uninterrupted (this pytest process, see conftest.py), and each process
must have read exactly its half of every global batch.
"""

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

STEPS = 8
CRASH_AFTER = 5  # steps done when the first invocation is killed; its last checkpoint is 4
BATCH = 16
CROP = 6
NUM_CLASSES = 10
# The gradient all-reduce sums in another order on 2 x 4 than on 8 devices (as 4 and 8 devices
# of one process already do): one step differs by ~3e-8, eight by ~2e-6 (parameters ~0.9). A
# wrong slice, augmentation or resume moves them by far more: mirroring one image of the last
# step moves them by 1e-2.
TOLERANCE = 1e-5


class Recording(Sequence):
  """A source that logs which records this process reads (in `reads`)."""

  def __init__(self, source: Sequence, reads: list):
    self.source, self.reads = source, reads

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index):
    self.reads.append(int(index))
    return self.source[index]

  def __getitems__(self, indices):
    self.reads.extend(int(i) for i in indices)
    return self.source.__getitems__(indices)


class Crash(Exception):
  """The simulated kill of the first invocation."""


def train(workdir: str, crash_after: int | None, reads: list) -> dict:
  """One invocation of the run: `fit` over the streaming pipeline; returns the final params."""
  import jax
  import jax.numpy as jnp
  import optax

  from research.data import builders, pipeline, samplers, transforms
  from research.training import fit, parallel, steps

  source = Recording(builders.digits_builder().as_data_source()["train"], reads)

  def loss_fn(params, batch, rng):
    del rng
    x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) / 16.0
    logits = jnp.tanh(x @ params["w1"]) @ params["w2"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {}

  run = fit.start_run(workdir)
  tx = optax.sgd(0.1)
  step = parallel.compile_train_step(
    functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx), run.mesh
  )
  keys = jax.random.split(jax.random.key(0))
  params = {
    "w1": 0.3 * jax.random.normal(keys[0], (CROP * CROP, 16)),
    "w2": 0.3 * jax.random.normal(keys[1], (16, NUM_CLASSES)),
  }

  def on_step_end(done):
    if done == crash_after:
      raise Crash(f"killed after step {done}")

  with pipeline.streaming_batch_fn(
    source,
    samplers.RandomSampler(len(source), BATCH, seed=1),
    run.mesh,
    transforms.ClassificationTransform(NUM_CLASSES, CROP),
    num_steps=STEPS,
    seed=2,
  ) as batch_fn:
    result = fit.fit(
      run,
      fit.Phase("train", STEPS, log_every=2, checkpoint_every=2, examples_per_step=BATCH),
      params=params,
      tx=tx,
      step_fn=step,
      batch_fn=batch_fn,
      rng=jax.random.key(3),
      on_step_end=on_step_end,
    )
  return jax.device_get(result.params)


def _process_main() -> None:
  """One host: parse flags, join the 2-process job, train, write params and reads."""
  parser = argparse.ArgumentParser()
  for flag in ("process_id", "port", "crash_after"):
    parser.add_argument(f"--{flag}", type=int)
  parser.add_argument("--workdir")
  args = parser.parse_args()
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{args.port}", num_processes=2, process_id=args.process_id
  )
  assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
  reads: list[int] = []
  out = pathlib.Path(args.workdir) / f"process_{args.process_id}"
  crashed = False
  try:
    params = train(args.workdir, args.crash_after, reads)
    np.savez(f"{out}_params.npz", **params)
  except Crash:
    crashed = True
  (pathlib.Path(f"{out}_reads_{'first' if args.crash_after else 'second'}.json")).write_text(
    json.dumps({"reads": reads, "crashed": crashed})
  )
  jax.distributed.shutdown()


def _run_two_processes(workdir: pathlib.Path, crash_after: int) -> None:
  import portpicker

  port = portpicker.pick_unused_port()
  repo = pathlib.Path(__file__).resolve().parents[2]
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
  }
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, f"--process_id={i}", f"--port={port}"]
      + [f"--crash_after={crash_after}", f"--workdir={workdir}"],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in (0, 1)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, text) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed (exit {p.returncode}):\n{text[-3000:]}"


def test_two_processes_stream_their_slices_resume_and_match_one_process(tmp_path):
  import jax

  from research.data import samplers

  work = tmp_path / "two_hosts"
  work.mkdir()
  _run_two_processes(work, CRASH_AFTER)  # killed after step 5: the last checkpoint is 4
  assert sorted(p.name for p in (work / "train_checkpoints").iterdir() if p.name.isdigit()) == [
    "2",
    "4",
  ]
  _run_two_processes(work, 0)  # resumes from step 4 and runs to the end

  reference = train(str(tmp_path / "one_host"), None, [])
  assert jax.device_count() == 8 and jax.process_count() == 1
  sampler = samplers.RandomSampler(1297, BATCH, seed=1)
  for i in (0, 1):
    first = json.loads((work / f"process_{i}_reads_first.json").read_text())
    second = json.loads((work / f"process_{i}_reads_second.json").read_text())
    assert first["crashed"] and not second["crashed"]
    half = [samplers.process_slice(sampler.indices(s), i, 2).tolist() for s in range(STEPS)]
    assert first["reads"] == sum(half[:CRASH_AFTER], [])
    assert second["reads"] == sum(half[4:], [])  # resumed at the checkpoint of step 4
    with np.load(work / f"process_{i}_params.npz") as got:
      for k, want in reference.items():
        np.testing.assert_allclose(got[k], want, rtol=0, atol=TOLERANCE, err_msg=k)


if __name__ == "__main__":
  _process_main()
