"""Fixed feedback matrices that carry the output error straight to every block.

Structured feedback (SSA): ``F_i = P_i diag(σ_i) Q_iᵀ`` of shape ``d_i × C`` with orthonormal
``P_i`` (d_i×k) and ``Q_i`` (C×k). The signal for block i is
``g_i = e F_iᵀ = ((e Q_i) * σ_i) P_iᵀ``, costing ``O(B·k·(C + d_i))``; no dense ``d_i × C``
matrix is ever formed.

Dense feedback (plain DFA, Nøkland 2016): ``F_i`` with i.i.d. ``N(0, scale²/C)`` entries and
``g_i = e F_iᵀ``.

Blocks of equal shape are stacked along a leading axis so that all their projections run
as one ``jax.vmap``. The feedback is a pytree (checkpointable) that no optimizer sees and
no step changes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
KINDS = ('structured', 'dense')


@flax.struct.dataclass
class Feedback:
  """Stacked feedback. ``groups[key]`` holds arrays with a leading block axis.

  ``index`` (static) maps each block name to ``(group key, position in the stack)``.
  Structured groups hold ``p [G, d, k]``, ``sigma [G, k]``, ``q [G, C, k]``; dense
  groups hold ``f [G, d, C]``.
  """
  groups: dict[str, dict[str, Array]]
  index: tuple[tuple[str, str, int], ...] = flax.struct.field(pytree_node=False)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(n for n, _, _ in self.index)

  def block(self, name: str) -> dict[str, Array]:
    """The unstacked arrays of one block (for tests and alignment terms)."""
    for n, key, i in self.index:
      if n == name:
        return {k: a[i] for k, a in self.groups[key].items()}
    raise KeyError(f'no feedback for block {name!r}; blocks are {self.names}')


def _orthonormal(key: Array, n: int, k: int) -> Array:
  q, r = jnp.linalg.qr(jax.random.normal(key, (n, k)))
  return q * jnp.sign(jnp.diagonal(r))  # Haar-distributed columns


def init_feedback(key: Array, widths: Mapping[str, int], num_classes: int, *,
                  kind: str = 'structured', ranks: Mapping[str, int] | int | None = None,
                  scale: float = 1.0) -> Feedback:
  """Builds fixed feedback for named blocks.

  Args:
    key: PRNG key.
    widths: block name -> d_i, the width the signal is delivered at (channels of a
      conv block for channel-broadcast feedback, or the flattened feature-map size).
    num_classes: C.
    kind: ``'structured'`` (``P diag(σ) Qᵀ``) or ``'dense'`` (random Gaussian).
    ranks: k per block (int for all, mapping per block, None for ``min(d_i, C)``); each is
      clipped to ``min(d_i, C)``. Callers pass ``min(layer rank, C)`` for SSA.
    scale: for structured feedback every ``σ`` is ``scale``; for dense, the entries have
      standard deviation ``scale / sqrt(C)``.
  """
  if kind not in KINDS:
    raise ValueError(f'feedback kind must be one of {KINDS}, got {kind!r}.')
  blocks = {}
  keys = jax.random.split(key, max(len(widths), 1))
  for (name, d), k_block in zip(sorted(widths.items()), keys):
    if kind == 'dense':
      blocks[name] = {'f': scale * jax.random.normal(k_block, (d, num_classes))
                      / jnp.sqrt(num_classes)}
    else:
      k = ranks.get(name) if isinstance(ranks, Mapping) else ranks
      k = min(d, num_classes) if k is None else max(1, min(int(k), d, num_classes))
      kp, kq = jax.random.split(k_block)
      blocks[name] = {'p': _orthonormal(kp, d, k), 'sigma': jnp.full((k,), scale, jnp.float32),
                      'q': _orthonormal(kq, num_classes, k)}
  return from_blocks(blocks)


def from_blocks(blocks: Mapping[str, Mapping[str, Array]]) -> Feedback:
  """Stacks per-block arrays (``{'f'}`` dense, or ``{'p', 'sigma', 'q'}``, with a local
  readout's hidden layers ``w0, b0, ...`` and decoder ``rw0, rb0, rw1, rb1``) by shape."""
  groups: dict[str, dict[str, list[Array]]] = {}
  index = []
  for name in sorted(blocks):
    arrays = blocks[name]
    if 'f' in arrays:
      gkey = f'dense_d{arrays["f"].shape[0]}'
    else:
      gkey = f'structured_d{arrays["p"].shape[0]}_k{arrays["p"].shape[1]}'
    hidden = [a for a in arrays if a.startswith('w')]  # a readout's hidden layers (signals)
    if hidden:
      gkey += f'_h{len(hidden)}x{arrays["w0"].shape[0]}'
    if 'rw0' in arrays:  # a readout's reconstruction decoder (signals.init_decoder)
      gkey += f'_rec{arrays["rw0"].shape[2]}'
    group = groups.setdefault(gkey, {a: [] for a in arrays})
    index.append((name, gkey, len(group[next(iter(arrays))])))
    for a, x in arrays.items():
      group[a].append(x)
  stacked = {g: {a: jnp.stack(xs) for a, xs in arrs.items()} for g, arrs in groups.items()}
  return Feedback(groups=stacked, index=tuple(index))


def _project_structured(err_BxC: Array, p_DxK: Array, sigma_K: Array, q_CxK: Array) -> Array:
  return ((err_BxC @ q_CxK) * sigma_K) @ p_DxK.T


def _project_dense(err_BxC: Array, f_DxC: Array) -> Array:
  return err_BxC @ f_DxC.T


def project(feedback: Feedback, err_BxC: Array) -> dict[str, Array]:
  """Signals ``g_i = e F_iᵀ`` (shape ``[B, d_i]``) for every block, one vmap per group."""
  out: dict[str, Array] = {}
  per_group = {}
  for gkey, arrs in feedback.groups.items():
    if 'f' in arrs:
      per_group[gkey] = jax.vmap(_project_dense, in_axes=(None, 0))(err_BxC, arrs['f'])
    else:
      per_group[gkey] = jax.vmap(_project_structured, in_axes=(None, 0, 0, 0))(
          err_BxC, arrs['p'], arrs['sigma'], arrs['q'])
  for name, gkey, i in feedback.index:
    out[name] = per_group[gkey][i]
  return out


def dense_matrix(feedback: Feedback, name: str) -> Array:
  """``F_i`` as a dense ``d × C`` matrix. For tests and analysis only; training never forms it."""
  b = feedback.block(name)
  if 'f' in b:
    return b['f']
  return (b['p'] * b['sigma']) @ b['q'].T


def describe(feedback: Feedback) -> dict[str, Any]:
  """Block name -> (kind, d, k) for logs."""
  out = {}
  for name, gkey, _ in feedback.index:
    b = feedback.groups[gkey]
    if 'f' in b:
      out[name] = ('dense', b['f'].shape[1], b['f'].shape[2])
    else:
      out[name] = ('structured', b['p'].shape[1], b['p'].shape[2])
  return out
