"""The alignment terms of SSA, as pure functions of the parameters and the fixed feedback.

``PARAM_TERMS`` maps a ``dfa.align`` name to its loss ``(params, feedback, *, channels,
tap_order) -> scalar``. :func:`lrdfa_jax.dfa.local_grads` adds ``align_weight ·`` its gradient
to the update. The ``output`` form acts on the taps instead of the parameters
(:func:`lrdfa_jax.losses.alignment_output`, added to each tap's cotangent there).

* ``subspace``: ``‖(I − PPᵀ) U diag(s)‖² / ‖U diag(s)‖²`` on each block's factored output layer
  (:func:`subspace_loss`, the blocks it acts on: :func:`subspace_blocks`);
* ``channel_subspace``: the same, with a full-map conv block compared by channel
  (:func:`channel_marginal`);
* ``next``: the reading layer's input factor ``V_{i+1} diag(s_{i+1})`` against ``P_i``
  (:func:`next_loss`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lrdfa_jax import feedback as fb
from lrdfa_jax import layers, losses, models

Array = jax.Array


def tap_channels(taps: Mapping[str, Any]) -> dict[str, int]:
  """Block name -> channel count of its tap, for the feature-map taps (arrays or shapes)."""
  return {n: int(t.shape[-1]) for n, t in taps.items() if len(t.shape) > 2}


def subspace_loss(params: Any, feedback: fb.Feedback,
                            channels: Mapping[str, int] | None = None) -> Array:
  """Σ over blocks of :func:`losses.alignment_subspace` for each block whose layer is factored.

  The block's layer is the one that writes tap ``name``: ``params[name]``, or for a block
  that is a sub-module its last conv (:func:`lrdfa_jax.models.output_layer`). Its ``U diag(s)``
  is compared with the block's ``P``, or, for a block named in ``channels`` whose ``P`` spans
  a full feature map, with the map's channel directions (:func:`channel_marginal`).
  """
  total = jnp.zeros(())
  for name in subspace_blocks(params, feedback, channels):
    layer = models.output_layer(params, name)
    p = feedback.block(name)['p']
    if is_full_map(p.shape, (channels or {}).get(name)):
      p = channel_marginal(p, channels[name])
    total = total + losses.alignment_subspace(layer['u'], layer['s'], p)
  return total


def subspace_blocks(params: Any, feedback: fb.Feedback,
                              channels: Mapping[str, int] | None = None) -> list[str]:
  """The blocks :func:`subspace_loss` acts on.

  A block counts when its output layer is factored and its structured feedback's ``P`` has
  the layer's output width (or a divisor of it). With ``delivery='full'`` a conv block's
  ``P`` spans positions × channels, which U's channel directions cannot be compared with,
  so only dense blocks (``fc1``) and conv blocks whose tap is 1×1 remain, unless
  ``channels`` (block name -> its tap's channel count, ``align='channel_subspace'``) gives
  the map's channels: then a full-map block whose ``k`` is below its channel count counts
  too, through :func:`channel_marginal` (with ``k ≥ c`` every channel direction would be
  "aligned" and the term would be 0).
  """
  out = []
  for name in feedback.names:
    layer = models.output_layer(params, name)
    b = feedback.block(name)
    if not layers.is_svd_layer(layer) or 'p' not in b or 'w0' in b:  # w0: P reads hidden units
      continue
    rows, (d, k), c = layer['u'].shape[0], b['p'].shape, (channels or {}).get(name)
    if is_full_map(b['p'].shape, c):
      acts = rows % c == 0 and k < c
    else:
      acts = rows % d == 0
    if acts:
      out.append(name)
  return out


def coverage(params: Any, feedback: fb.Feedback, align: str, *,
                       channels: Mapping[str, int] | None = None,
                       dense_feedback: bool = False, signal: str = 'global',
                       delivery: str = 'channel') -> tuple[list[str], str]:
  """The blocks the subspace term acts on, and a sentence on the factored blocks it skips
  and why ('' when it skips none); the arguments say how the feedback was built."""
  aligned = subspace_blocks(params, feedback, channels)
  skipped = [n for n in feedback.names if n not in aligned
             and layers.is_svd_layer(models.output_layer(params, n))]
  if not skipped:
    return aligned, ''
  why = "their feedback's P does not match the layer's output factor U"
  by_channel = "dfa.align='channel_subspace' compares such blocks by channel"
  if dense_feedback:
    why = 'their feedback is dense (no subspace P)'
  elif any('w0' in feedback.block(n) for n in skipped):
    why = "their local readout's P reads its hidden layers (dfa.readout_layers), not U"
  elif align == 'channel_subspace':
    why += ' or its k reaches every channel'
  elif signal != 'global':
    why += f" (a conv block's local readout spans pooled positions × channels; {by_channel})"
  elif delivery == 'full':
    why += f' (full feature-map feedback spans positions × channels; {by_channel})'
  return aligned, (f'dfa.align={align!r} skips the factored blocks {skipped}: {why}. It acts '
                   f"on {aligned or 'no block'}; dfa.align='output' acts on every block.")


def is_full_map(p_shape: tuple[int, ...], channels: int | None) -> bool:
  """Whether a ``P`` of this shape spans a feature map of ``channels`` (None: not known)."""
  return bool(channels) and p_shape[0] != channels and p_shape[0] % channels == 0


def channel_marginal(p_DxK: Array, channels: int) -> Array:
  """The ``k`` channel directions a full-map feedback writes into most (orthonormal, ``[c, k]``).

  ``P`` (``[positions·c, k]``, channels innermost as in a flattened NHWC map) is read as one
  ``c × k`` slice per position; the result is the top-``k`` eigenvectors of
  ``Σ_positions P_pos P_posᵀ``, the channel second moment of the signals the block receives.
  For a random ``P`` with ``positions·k ≫ c`` that moment is close to isotropic (every channel
  direction gets signal and the term has little to pull towards); with few positions it is not.
  It is recomputed on every step (one ``c × c`` ``eigh`` per block): negligible on SmallConv,
  not on wide nets, where the bases of the fixed feedback should be computed once.
  """
  _, vecs = jnp.linalg.eigh(channel_moment(p_DxK, channels))
  return vecs[:, ::-1][:, :min(p_DxK.shape[1], channels)]  # eigh sorts ascending


def channel_moment(p_DxK: Array, channels: int) -> Array:
  """``Σ_positions P_pos P_posᵀ`` (``[c, c]``) of a full-map ``P`` with channels innermost."""
  per_pos = p_DxK.reshape(-1, channels, p_DxK.shape[1])
  return jnp.einsum('nck,ndk->cd', per_pos, per_pos)


def next_loss(params: Any, feedback: fb.Feedback, order: Sequence[str],
                        reader_of_last: str = 'head') -> Array:
  """Σ over blocks i of :func:`losses.alignment_subspace` (``V_{i+1}``, ``s_{i+1}``, ``P_i``).

  The layer that reads block i's output (:func:`lrdfa_jax.models.input_layer` of the next
  block in ``order``, the forward order of the taps; ``reader_of_last`` for the last) is
  pulled to read the directions block i's feedback writes into: the energy of its input
  factor ``V diag(s)`` (per input position) outside ``span(P_i)``, normalised. It uses
  parameters and fixed feedback only, no activation crosses blocks. Blocks whose reader is
  not factored, or whose feedback has no ``P`` (dense), add nothing.
  """
  total = jnp.zeros(())
  readers = list(order[1:]) + [reader_of_last]
  for name, reader in zip(order, readers):
    if name not in feedback.names:
      continue
    layer = models.input_layer(params, reader)
    b = feedback.block(name)
    if (layers.is_svd_layer(layer) and 'p' in b and 'w0' not in b
        and layer['v'].shape[0] % b['p'].shape[0] == 0):
      total = total + losses.alignment_subspace(layer['v'], layer['s'], b['p'])
  return total


def _subspace_term(params, feedback, *, channels=None, tap_order=()):
  del channels, tap_order
  return subspace_loss(params, feedback)


def _channel_subspace_term(params, feedback, *, channels=None, tap_order=()):
  del tap_order
  return subspace_loss(params, feedback, channels)


def _next_term(params, feedback, *, channels=None, tap_order=()):
  del channels
  if not tap_order:
    raise ValueError("align='next' needs tap_order, the taps in forward order.")
  return next_loss(params, feedback, tuple(tap_order))


# dfa.align name -> the parameter term it adds; 'output' acts on the taps, 'none' adds nothing
PARAM_TERMS = {'subspace': _subspace_term, 'channel_subspace': _channel_subspace_term,
               'next': _next_term}
