"""Losses shared by the methods (per-example and per-pixel cross-entropy variants)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(
  logits: jnp.ndarray, labels: jnp.ndarray, valid: jnp.ndarray | None = None
) -> jnp.ndarray:
  """Mean softmax cross-entropy over valid examples (0 when none is valid).

  Args:
    logits: [..., K] float logits.
    labels: [...] int labels; entries outside [0, K) must be masked by `valid`.
    valid: [...] bool mask, all True by default.

  Returns:
    scalar mean loss.
  """
  if valid is None:
    valid = jnp.ones(labels.shape, bool)
  safe = jnp.where(valid, labels, 0)
  per = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  return jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1)


def pixel_cross_entropy(
  logits: jnp.ndarray, labels: jnp.ndarray, ignore_label: int = 255
) -> jnp.ndarray:
  """Mean per-pixel cross-entropy over pixels whose label is not `ignore_label`.

  Args:
    logits: [B, H, W, K] float logits.
    labels: [B, H, W] int labels.
    ignore_label: label value excluded from the mean.

  Returns:
    scalar mean loss.
  """
  return softmax_cross_entropy(logits, labels.astype(jnp.int32), labels != ignore_label)


def l2_weight_penalty(params) -> jnp.ndarray:
  """Sum of squares of every kernel (weights with ndim > 1; biases and norms excluded)."""
  leaves = [p for p in jax.tree.leaves(params) if p.ndim > 1]
  return sum(jnp.sum(p.astype(jnp.float32) ** 2) for p in leaves)
