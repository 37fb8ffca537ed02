"""Dynamic rank reduction: choose each factored layer's rank by singular-value energy, then
slice its factors, every optimizer moment that mirrors them, and its block's feedback.

Pure functions on pytrees (no config, no model): the training loop calls
:func:`choose_ranks` then :func:`reduce` (see ``rank.*`` in ``configs/default.py``).

Which directions are kept: a layer ``U diag(s) Vᵀ`` keeps the columns of its ``r'`` largest
``|s|`` (sorted, so the kept layer is the best rank-``r'`` truncation when U and V are
orthonormal). Which optimizer leaves are sliced: every leaf of the optax state whose key path
ends with a reduced layer's path and factor name (``.../conv2/u``: the whole run of trailing
dict keys, so ``conv1`` does not match ``stage1_block0/conv1``) and whose shape is that
factor's: Adam's ``mu``/``nu``, SGD's momentum, masked or chained states alike, found by tree
structure, never by optimizer name. Counters and scalars are left as they are. The feedback
of a block whose ``k`` exceeds its layer's new rank keeps its first ``k = r'`` directions
(the largest ``σ`` of a readout basis, which is stored in SVD order).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrdfa_jax import feedback as fb
from lrdfa_jax import layers, models

FACTORS = {'u': 1, 's': 0, 'v': 1}  # factor -> the axis that indexes the rank


def svd_layers(params: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict]:
  """Key path (a tuple of names) -> param dict of every factored layer."""
  out = {}
  for k, v in params.items():
    if layers.is_svd_layer(v):
      out[prefix + (k,)] = v
    elif isinstance(v, Mapping):
      out.update(svd_layers(v, prefix + (k,)))
  return out


def full_rank(layer: Mapping[str, Any]) -> int:
  """The largest rank ``U diag(s) Vᵀ`` can have: ``min`` of the factors' row counts."""
  return int(min(layer['u'].shape[0], layer['v'].shape[0]))


def energy_rank(s, energy: float, *, floor: int | float = 1, full: int | None = None) -> int:
  """The smallest ``r`` whose ``r`` largest ``s²`` hold a fraction ``energy`` of ``Σ s²``.

  Never below ``floor`` (an int rank, or a fraction in (0, 1) of ``full``, the layer's full
  rank) and never above ``len(s)``, the current rank.
  """
  if not 0.0 < energy <= 1.0:
    raise ValueError(f'rank energy must lie in (0, 1], got {energy}.')
  s2 = np.sort(np.square(np.asarray(s, np.float64)))[::-1]
  current = len(s2)
  if isinstance(floor, float) and not floor.is_integer():
    if not 0.0 < floor < 1.0:
      raise ValueError(f'a fractional rank floor must lie in (0, 1), got {floor}.')
    floor = max(1, int(round(floor * (full if full is not None else current))))
  floor = int(floor)
  if floor < 1:
    raise ValueError(f'rank floor must be >= 1, got {floor}.')
  total = s2.sum()
  if total <= 0:
    r = 1
  else:
    r = int(np.searchsorted(np.cumsum(s2), energy * total * (1 - 1e-12)) + 1)
  return int(min(current, max(r, floor)))


def choose_ranks(params: Any, energy: float, floor: int | float = 1
                 ) -> dict[tuple[str, ...], int]:
  """The new rank of every factored layer (a layer whose rank would not change is left out)."""
  out = {}
  for path, layer in svd_layers(params).items():
    s = jax.device_get(layer['s'])
    r = energy_rank(s, energy, floor=floor, full=full_rank(layer))
    if r < len(s):
      out[path] = r
  return out


def keep_indices(s, rank: int) -> np.ndarray:
  """Indices of the ``rank`` largest ``|s|``, largest first (stable for ties)."""
  return np.argsort(-np.abs(np.asarray(jax.device_get(s))), kind='stable')[:rank]


def _names(path) -> tuple[str, ...]:
  """The trailing dict keys of a key path (a param path inside an optax state)."""
  out: list[str] = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    out.append(str(entry.key))
  return tuple(reversed(out))


def slice_like(tree: Any, params: Any, keep: Mapping[tuple[str, ...], np.ndarray]) -> Any:
  """``tree`` with every leaf that mirrors a factor of a ``keep`` layer indexed by its
  ``keep`` indices along the rank axis (matched by key-path suffix and shape)."""
  targets = {}
  found = svd_layers(params)
  for path, idx in keep.items():
    layer = found.get(path)
    if layer is None:
      raise KeyError(f'no factored layer {"/".join(path)} in params.')
    for name, axis in FACTORS.items():
      targets[path + (name,)] = (axis, np.asarray(idx), tuple(layer[name].shape))

  def take(path, x):
    # the whole run of trailing dict keys must be the factor's path: a top-level conv1 must
    # not match stage1_block0/conv1
    hit = targets.get(_names(path))
    if hit is not None and tuple(getattr(x, 'shape', ())) == hit[2]:
      return jnp.take(x, hit[1], axis=hit[0])
    return x

  return jax.tree_util.tree_map_with_path(take, tree)


def slice_feedback(feedback: fb.Feedback, params: Any) -> fb.Feedback:
  """Caps every structured block's ``k`` at the rank of the layer that writes it (as
  ``init_feedback`` does for a fresh model), keeping its first ``k`` directions."""
  blocks = {}
  changed = False
  for name in feedback.names:
    b = feedback.block(name)
    layer = models.output_layer(params, name)
    if 'p' in b and layer is not None and layers.is_svd_layer(layer):
      k = min(b['p'].shape[-1], layer['s'].shape[0])
      if k < b['p'].shape[-1]:
        b = {**b, 'p': b['p'][:, :k], 'sigma': b['sigma'][:k], 'q': b['q'][:, :k]}
        changed = True
    blocks[name] = b
  return fb.from_blocks(blocks) if changed else feedback


def reduce(params: Any, opt_state: Any, ranks: Mapping[tuple[str, ...], int], *,
           feedback: fb.Feedback | None = None, feedback_opt_state: Any = None):
  """Slices the layers of ``ranks`` to their new ranks.

  Returns ``(params, opt_state, feedback, feedback_opt_state)``: the factors and every
  mirroring optimizer leaf sliced to the largest-``|s|`` directions; the feedback (and the
  state of a learned feedback's optimizer, whose ``Feedback``-shaped moments are sliced the
  same way) capped at the new ranks. Raises ``ValueError`` for a rank above the current one.
  """
  layers_now = svd_layers(params)
  keep = {}
  for path, r in ranks.items():
    if path not in layers_now:
      raise KeyError(f'no factored layer {"/".join(path)} in params.')
    current = layers_now[path]['s'].shape[0]
    if not 1 <= r <= current:
      raise ValueError(f'{"/".join(path)}: new rank {r} must lie in [1, {current}] (ranks '
                       'only go down).')
    keep[path] = keep_indices(layers_now[path]['s'], r)
  new_params = slice_like(params, params, keep)
  new_opt = slice_like(opt_state, params, keep)
  if feedback is None:
    return new_params, new_opt, None, feedback_opt_state
  new_fb = slice_feedback(feedback, new_params)
  if feedback_opt_state is not None:
    is_fb = lambda x: isinstance(x, fb.Feedback)  # noqa: E731
    feedback_opt_state = jax.tree.map(
        lambda x: slice_feedback(x, new_params) if is_fb(x) else x, feedback_opt_state,
        is_leaf=is_fb)
  return new_params, new_opt, new_fb, feedback_opt_state


def rank_overrides(params: Any) -> str:
  """``model.overrides`` items (``'conv2:12,stage1_block0/conv1:8'``) that rebuild every
  factored layer at its current rank: the model a reduced checkpoint restores into."""
  return ','.join(f'{"/".join(p)}:{layer["s"].shape[0]}'
                  for p, layer in svd_layers(params).items())
