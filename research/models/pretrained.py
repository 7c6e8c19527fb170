"""Initialising a model (or its backbone) from parameters saved in an Orbax checkpoint.

A checkpoint here is an Orbax item directory written by `ocp.StandardCheckpointer` (e.g. with
`save_params`), or the `state` folder of a step written by `research.training.checkpoint`
(`<workdir>/<name>_checkpoints/<step>/state`, whose parameters are under `source="params"`).

`restore_params` reads the parameter tree of the checkpoint (or its subtree `source`) into the
part `target` of a freshly initialised parameter tree. Before any array is read, every leaf of
that part is checked against the checkpoint's metadata: the same paths and the same shapes. A
checkpoint of another backbone, with missing or extra parameters or other shapes, raises one
`PretrainedMismatchError` naming the first mismatching parameter path and both shapes. Restored
leaves take the dtype of the fresh tree (float32 parameters stay float32).

A checkpoint directory may be any `etils.epath` location Orbax reads and writes (`gs://...`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from research.training import checkpoint


class PretrainedMismatchError(ValueError):
  """The checkpoint's parameters do not match the model's (paths or shapes)."""


def save_params(directory: epath.PathLike, params: Any) -> None:
  """Writes a parameter tree to the (new) Orbax item `directory` and waits until it is on disk."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(checkpoint.orbax_directory(directory), params)
    checkpointer.wait_until_finished()


def _path_str(path: tuple) -> str:
  """`('backbone', 'stem', 'kernel')` key path -> `'backbone/stem/kernel'`."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _subtree(tree: Any, where: str | None, what: str) -> Any:
  """The subtree of `tree` at the slash path `where` (None: the whole tree)."""
  if not where:
    return tree
  node = tree
  for i, part in enumerate(where.split("/")):
    if not isinstance(node, dict) or part not in node:
      available = sorted(node) if isinstance(node, dict) else []
      raise PretrainedMismatchError(
        f"{what} has no {'/'.join(where.split('/')[: i + 1])!r}: its keys there are {available}"
      )
    node = node[part]
  return node


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{leaf path: shape}` of a tree of arrays or array metadata, in flattening order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(path): tuple(leaf.shape) for path, leaf in leaves}


def check_shapes(saved: Any, expected: Any, prefix: str = "") -> None:
  """Raises `PretrainedMismatchError` at the first leaf whose path or shape differs.

  Args:
    saved: the checkpoint's tree (arrays or Orbax `ArrayMetadata`, anything with `.shape`).
    expected: the model's tree.
    prefix: prepended to the paths in the message (the `target` part of the model).
  """
  have, want = _shapes(saved), _shapes(expected)
  name = (prefix + "/") if prefix else ""
  for path, shape in want.items():
    if path not in have:
      raise PretrainedMismatchError(
        f"parameter {name}{path} is missing from the checkpoint (model shape {shape}; "
        f"checkpoint shape: none)"
      )
    if have[path] != shape:
      raise PretrainedMismatchError(
        f"parameter {name}{path} has shape {have[path]} in the checkpoint but {shape} in the model"
      )
  for path, shape in have.items():
    if path not in want:
      raise PretrainedMismatchError(
        f"parameter {name}{path} of the checkpoint (shape {shape}) is not in the model "
        "(model shape: none)"
      )


def restore_params(
  directory: epath.PathLike,
  params: Any,
  *,
  target: str | None = None,
  source: str | None = None,
) -> Any:
  """`params` with its part `target` replaced by the checkpoint's parameters `source`.

  Args:
    directory: an Orbax item directory (see the module docstring), any `etils.epath` location.
    params: a freshly initialised parameter tree (e.g. `model.init(...)["params"]`).
    target: slash path of the part of `params` to restore, e.g. `'backbone'` (None: all).
    source: slash path of the saved subtree to read, e.g. `'params'` for a training state or
      `'backbone'` for a whole saved model (None: the whole checkpoint).

  Returns:
    A new tree like `params`, with the restored leaves (cast to the fresh leaves' dtypes).

  Raises:
    PretrainedMismatchError: when a path or shape differs (the first one is named), or
      `target` / `source` is not in its tree.
    FileNotFoundError: when `directory` does not exist.
  """
  directory = checkpoint.orbax_directory(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  fresh = _subtree(params, target, "the model's parameter tree")
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(directory).item_metadata
    saved_meta = _subtree(
      getattr(metadata, "tree", metadata), source, f"the checkpoint {directory}"
    )
    check_shapes(saved_meta, fresh, target or "")
    saved = _subtree(checkpointer.restore(directory), source, f"the checkpoint {directory}")
  by_path = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
  restored = jax.tree_util.tree_unflatten(
    treedef, [jnp.asarray(by_path[_path_str(p)], dtype=leaf.dtype) for p, leaf in leaves]
  )
  if not target:
    return restored
  return _replace(params, target.split("/"), restored)


def _replace(tree: dict, parts: list[str], value: Any) -> dict:
  """A copy of the nested dict `tree` with `tree[parts[0]][parts[1]]... = value`."""
  out = dict(tree)
  out[parts[0]] = value if len(parts) == 1 else _replace(tree[parts[0]], parts[1:], value)
  return out
