"""Independent numpy references shared by the tests (float64, written from the definitions).

Import as `import references` (tests/ is on sys.path through conftest.py). Each function is a
direct transcription of a textbook or paper formula, often as an explicit loop, never a copy
of the code under test.
"""

import itertools

import numpy as np
from scipy.special import logsumexp


def softmax(x):
  """Softmax over the last axis."""
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sigmoid(x):
  """The logistic function in float64."""
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy of integer labels: mean(logsumexp(z) - z_y)."""
  logits = np.asarray(logits, np.float64)
  return float(np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels]))


def bce_mean(logit, target):
  """Mean over pixels of -[t log s(x) + (1-t) log(1-s(x))], as a float64 loop."""
  total = 0.0
  for x, t in zip(np.ravel(logit), np.ravel(target), strict=True):
    s = 1.0 / (1.0 + np.exp(-float(x)))
    total += -(t * np.log(s) + (1.0 - t) * np.log(1.0 - s))
  return total / np.size(logit)


def dice_loss(logit, target):
  """Mask2Former's dice loss with +1 smoothing: 1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)."""
  p = sigmoid(logit).ravel()
  t = np.asarray(target, np.float64).ravel()
  return 1.0 - (2.0 * np.sum(p * t) + 1.0) / (p.sum() + t.sum() + 1.0)


def triplet_loss(emb, labels, margin, mining="batch_hard", squared=False):
  """Loops over every (anchor, positive, negative) triplet in float64.

  Batch hard / soft margin: per anchor, the worst triplet loss (relu and softplus are
  monotone, so this is the hardest positive against the hardest negative); mean over anchors
  with any triplet. Batch all: mean over the triplets with loss > 0. 0 when there is nothing to
  average.
  """
  emb = np.asarray(emb, np.float64)
  d = np.sqrt(((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1))
  if squared:
    d = d**2
  per_anchor, active = [], []
  for a in range(len(labels)):
    losses = []
    for p, n in itertools.product(range(len(labels)), repeat=2):
      if p != a and labels[p] == labels[a] and labels[n] != labels[a]:
        x = d[a, p] - d[a, n]
        losses.append(np.logaddexp(0.0, x) if mining == "soft_margin" else max(x + margin, 0.0))
    if losses:
      per_anchor.append(max(losses))
      active += [v for v in losses if v > 0]
  values = active if mining == "batch_all" else per_anchor
  return float(np.mean(values)) if values else 0.0


def incremental_distillation(cur, hist, old, *, fold=True, weighting="one_minus_no_object",
                             reduction="mean", temperature=1.0):  # fmt: skip
  """M4's distillation written from the patent's sentence (claim 8, ¶38/43/63).

  "The class probabilities of each class in the first and the second prediction": the
  classes of the second (historical) prediction are the old classes and no-object. For each
  query (rows of `cur`, `hist`: [N, C + 1], last = no-object) and each such class k:
  p_hist(k) = exp(h_k / T) / sum over old + no-object of exp(h_j / T); p_cur(k) is the current
  softmax over all C + 1 classes at k, where (fold=True) no-object also collects the mass of
  every new class (a query that drifted to a new class has left the old one just as if it had
  drifted to no-object); fold=False reads the plain softmax at k. Per-query loss
  sum_k p_hist(k) log(p_hist(k) / p_cur(k)) * T^2, weighted by 1 - p_hist(no-object) (or its
  square, or 1), then averaged over queries ("mean") or divided by the weight sum.
  """
  cur = np.asarray(cur, np.float64).reshape(-1, np.shape(cur)[-1])
  hist = np.asarray(hist, np.float64).reshape(-1, np.shape(hist)[-1])
  classes = [k for k in range(len(old)) if old[k]] + [len(old)]
  new = [k for k in range(len(old)) if not old[k]]
  total, weight_sum = 0.0, 0.0
  for q in range(cur.shape[0]):
    teacher = np.array([np.exp(hist[q, k] / temperature) for k in classes])
    teacher /= teacher.sum()
    student_all = np.exp(cur[q] / temperature) / np.exp(cur[q] / temperature).sum()
    loss = 0.0
    for i, k in enumerate(classes):
      p_cur = student_all[k]
      if fold and k == len(old):
        p_cur += sum(student_all[j] for j in new)
      loss += teacher[i] * (np.log(teacher[i]) - np.log(p_cur))
    p_object = 1.0 - teacher[-1]
    w = {"one_minus_no_object": p_object, "squared": p_object**2, "none": 1.0}[weighting]
    total += w * loss * temperature**2
    weight_sum += w
  return total / cur.shape[0] if reduction == "mean" else total / weight_sum


def comformer_distillation(student_logits, teacher_logits, num_old, gamma=2.0):
  """CoMFormer's `knowledge_distillation_loss(reweight=True, use_new=True)`, transcribed.

  Its teacher has only the old classes and no-object as outputs (`teacher_logits`
  [..., num_old + 1]); its student has all classes ([..., C + 1], old classes first):
  outputs = log_softmax(student) at the old classes and no-object; labels = softmax(teacher);
  loss_q = sum(labels * (log labels - outputs)); w_q = (1 - labels[no-object])^gamma;
  loss = sum_q w_q loss_q / sum_q w_q over every query of the batch.
  """
  s = np.asarray(student_logits, np.float64).reshape(-1, np.shape(student_logits)[-1])
  t = np.asarray(teacher_logits, np.float64).reshape(-1, np.shape(teacher_logits)[-1])
  log_s = s - logsumexp(s, axis=1, keepdims=True)
  outputs = np.concatenate([log_s[:, :num_old], log_s[:, -1:]], axis=1)
  log_labels = t - logsumexp(t, axis=1, keepdims=True)
  labels = np.exp(log_labels)
  loss = (labels * (log_labels - outputs)).sum(1)
  w = (1.0 - labels[:, -1]) ** gamma
  return float((w * loss).sum() / w.sum())
