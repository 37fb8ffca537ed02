"""Optax pieces: the orthogonality and Hoyer penalties, an exact retraction, the chain builder.

Factor leaves are found by name: ``u`` and ``v`` (2-D) inside a layer dict that also holds ``s``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrdfa_jax import layers, losses

Array = jax.Array
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine')


def _leaf_name(path) -> str:
  last = path[-1] if path else None
  return str(getattr(last, 'key', getattr(last, 'name', '')))


def _is_factor(path, x) -> bool:
  return _leaf_name(path) in ('u', 'v') and getattr(x, 'ndim', 0) == 2


def _is_factor_leaf(path, x) -> bool:
  return _leaf_name(path) == 's' or _is_factor(path, x)


def factor_mask(params: Any) -> Any:
  """Pytree of bools: True at ``u``/``v`` factor leaves."""
  return jax.tree_util.tree_map_with_path(_is_factor, params)


def _needs_params(name: str, params: Any) -> None:
  if params is None:
    raise ValueError(f'{name} needs params: call tx.update(g, s, params).')


def add_orthogonality_penalty(weight: float) -> optax.GradientTransformation:
  """Adds ``weight · ∇_X ‖XᵀX − I‖²_F / r²`` to the update of every ``u`` and ``v`` leaf.

  Place it before the optimizer in a chain: the penalty gradient is then treated like
  the loss gradient (scaled by Adam, by the learning rate). Needs ``params``.
  """
  grad_one = jax.grad(losses.orthogonality_one)

  def update(updates, params):
    _needs_params('add_orthogonality_penalty', params)
    return jax.tree_util.tree_map_with_path(
        lambda path, u, p: u + weight * grad_one(p) if _is_factor(path, p) else u,
        updates, params)

  return optax.stateless(update)


def add_hoyer_penalty(weight: float) -> optax.GradientTransformation:
  """Adds ``weight · ∇_s (‖s‖₁ / ‖s‖₂)`` to the ``s`` update of every factored layer.

  The Hoyer measure pushes a layer's singular-value energy into fewer directions, for rank
  reduction (:mod:`lrdfa_jax.rank`). Layers are dicts holding ``u``, ``s`` and ``v``. Place it
  first in a chain: the penalty is then part of the gradient that is clipped and scaled.
  """
  grad_one = jax.grad(losses.hoyer)

  def update(updates, params):
    _needs_params('add_hoyer_penalty', params)
    return jax.tree.map(
        lambda u, p: {**u, 's': u['s'] + weight * grad_one(p['s'])} if layers.is_svd_layer(p)
        else u, updates, params, is_leaf=layers.is_svd_layer)

  return optax.stateless(update)


def retract_factors(layer: dict[str, Array]) -> dict[str, Array]:
  """Re-orthonormalises one layer's factors without changing ``U diag(s) Vᵀ``.

  ``U = Q_u R_u``, ``V = Q_v R_v``; the small ``R_u diag(s) R_vᵀ = A diag(s') Bᵀ``; then
  ``U' = Q_u A``, ``s' ≥ 0``, ``V' = Q_v B`` have orthonormal columns and the same product.
  """
  qu, ru = jnp.linalg.qr(layer['u'])
  qv, rv = jnp.linalg.qr(layer['v'])
  a, s, bt = jnp.linalg.svd((ru * layer['s']) @ rv.T)
  return {**layer, 'u': qu @ a, 's': s, 'v': qv @ bt.T}


def map_svd_layers(fn, tree: Any) -> Any:
  """Applies ``fn`` to every layer dict holding ``u``, ``s`` and ``v``."""
  if layers.is_svd_layer(tree):
    return fn(tree)
  if isinstance(tree, dict):
    return {k: map_svd_layers(fn, v) for k, v in tree.items()}
  return tree


class RetractionState(NamedTuple):
  count: Array


def retract_every(every: int) -> optax.GradientTransformation:
  """Every ``every`` steps, rewrites the final update so the new factors are orthonormal.

  The last element of a chain (after the learning rate): with ``p' = p + update``, the
  emitted update is ``retract(p') − p`` (see :func:`retract_factors`). Optimizer moments
  are left as they are.
  """
  if every < 1:
    raise ValueError(f'retract_every needs every >= 1, got {every}.')

  def init_fn(params):
    del params
    return RetractionState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('retract_every needs params: call tx.update(g, s, params).')
    count = state.count + 1

    def retracted(u):
      new = map_svd_layers(retract_factors, optax.apply_updates(params, u))
      return jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new, params)

    updates = jax.lax.cond(count % every == 0, retracted, lambda u: u, updates)
    return updates, RetractionState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(base_lr: float, total_steps: int, *, kind: str = 'cosine',
                  warmup_steps: int = 0, end_factor: float = 0.0) -> optax.Schedule:
  """Learning-rate schedule: ``'constant'`` or ``'cosine'`` (both with linear warmup)."""
  if kind not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {kind!r}.')
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else base_lr, base_lr, warmup_steps,
        max(total_steps, warmup_steps + 1), end_value=base_lr * end_factor)
  if warmup_steps:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup_steps), optax.constant_schedule(base_lr)],
        [warmup_steps])
  return optax.constant_schedule(base_lr)


def build_optimizer(*, learning_rate: float | optax.Schedule, optimizer: str = 'adam',
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                    momentum: float = 0.9, weight_decay: float = 0.0,
                    orth_weight: float = 0.0, hoyer_weight: float = 0.0, retract: int = 0,
                    clip_norm: float = 0.0,
                    factor_lr_scale: float = 1.0) -> optax.GradientTransformation:
  """The whole chain: Hoyer penalty → clip → orthogonality penalty → optimizer → factor scale
  → retraction.

  Args:
    learning_rate: a float or an optax schedule.
    optimizer: ``'adam'``, ``'adamw'`` (decoupled decay on every leaf but ``s`` and ``bias``)
      or ``'sgd'`` (with ``momentum``; 0 for plain SGD).
    orth_weight: weight of :func:`add_orthogonality_penalty` (0 leaves it out).
    hoyer_weight: weight of :func:`add_hoyer_penalty` (0 leaves it out).
    retract: QR retraction every this many steps (0 leaves it out).
    clip_norm: global-norm clipping of the update (0 leaves it out).
    factor_lr_scale: multiplies the optimizer's step of every ``u``, ``s`` and ``v`` leaf, so the
      factors take this fraction of the rate the other leaves (BN, stem, head) take (1 leaves
      it out). The hypothesis it tests (docs/method.md): under BatchNorm a dense kernel's norm
      grows and its relative step shrinks, while the factors, held near unit norm by the
      orthogonality penalty, keep theirs.
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.')
  parts = []
  if hoyer_weight:
    parts.append(add_hoyer_penalty(hoyer_weight))
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  if orth_weight:
    parts.append(add_orthogonality_penalty(orth_weight))
  if optimizer == 'adam':
    parts.append(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
  elif optimizer == 'adamw':
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, x: _leaf_name(path) not in ('s', 'bias') and x.ndim > 1, p)
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
  else:
    parts.append(optax.sgd(learning_rate, momentum=momentum or None))
  if factor_lr_scale != 1.0:
    if factor_lr_scale <= 0:
      raise ValueError(f'factor_lr_scale must be > 0, got {factor_lr_scale}.')
    parts.append(optax.masked(optax.scale(factor_lr_scale),
                              lambda p: jax.tree_util.tree_map_with_path(_is_factor_leaf, p)))
  if retract:
    parts.append(retract_every(retract))
  return optax.chain(*parts)
