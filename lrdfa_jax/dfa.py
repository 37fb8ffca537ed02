"""The local update (DFA / SSA) and backprop, as pure functions returning param-shaped pytrees.

The model is seen through ``forward(params) -> ((logits, taps), extra)``, run with
``local=True`` for the local update: every block input is ``stop_gradient``-ed and every
block output ``h_i`` is a tap. Then

1. ``e = softmax(z) − onehot(y)`` is computed once from the logits;
2. each block's signal ``g_i = e F_iᵀ`` comes from :func:`lrdfa_jax.feedback.project`;
3. one ``jax.vjp`` with cotangent ``e / B`` on the logits and ``g_i / B`` on tap i (plus the
   gradient of the output-alignment term where enabled) returns every block's update.

Because inputs are cut, the vjp goes through each block's own activation, normalisation
and layers and never into the block below; no input gradient is computed between blocks.
For a dense layer ``a = W h`` with ``δ_i = (g_i ⊙ φ'(a))`` this is the DFA rule
``ΔW = δ_iᵀ h`` (Nøkland 2016); for ``W = U diag(s) Vᵀ`` it is, per factor,
``ΔU = δ_iᵀ (s ⊙ hV)``, ``Δs = Σ_b (δ_i U) ⊙ (h V)``, ``ΔV = hᵀ ((δ_i U) ⊙ s)``.
The output block receives the exact cross-entropy gradient.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lrdfa_jax import feedback as fb
from lrdfa_jax import layers, losses, models, signals as sig

Array = jax.Array
Forward = Callable[[Any], tuple[tuple[Array, dict[str, Array]], Any]]
ALIGNMENTS = ('none', 'subspace', 'channel_subspace', 'output', 'next')
LEARN_FEEDBACK = ('none', 'local', 'global')


def expand_signal(g_BxD: Array, tap_shape: tuple[int, ...], name: str = '') -> Array:
  """Delivers a ``[B, d]`` signal at a tap: as is, broadcast over space (d = channels), or reshaped."""
  if g_BxD.shape == tuple(tap_shape):
    return g_BxD
  if len(tap_shape) > 2 and g_BxD.shape[-1] == tap_shape[-1]:
    return jnp.broadcast_to(g_BxD.reshape(g_BxD.shape[0], *([1] * (len(tap_shape) - 2)), -1),
                            tap_shape)
  if g_BxD.shape[-1] == math.prod(tap_shape[1:]):
    return g_BxD.reshape(tap_shape)
  raise ValueError(f'feedback for block {name!r} has width {g_BxD.shape[-1]}, which fits '
                   f'neither the channels nor the size of its tap {tuple(tap_shape)}.')


def tap_channels(taps: Mapping[str, Any]) -> dict[str, int]:
  """Block name -> channel count of its tap, for the feature-map taps (arrays or shapes)."""
  return {n: int(t.shape[-1]) for n, t in taps.items() if len(t.shape) > 2}


def tap_widths(tap_shapes: dict[str, Any], mode: str = 'channel') -> dict[str, int]:
  """Feedback width per tap: channel count (signal broadcast over space) or full size."""
  if mode not in ('channel', 'full'):
    raise ValueError(f"feedback delivery must be 'channel' or 'full', got {mode!r}.")
  return {n: (s.shape[-1] if mode == 'channel' else math.prod(s.shape[1:]))
          for n, s in tap_shapes.items()}


def subspace_alignment_loss(params: Any, feedback: fb.Feedback,
                            channels: Mapping[str, int] | None = None) -> Array:
  """Σ over blocks of :func:`losses.alignment_subspace` for each block whose layer is factored.

  The block's layer is the one that writes tap ``name``: ``params[name]``, or for a block
  that is a sub-module its last conv (:func:`lrdfa_jax.models.output_layer`). Its ``U diag(s)``
  is compared with the block's ``P``, or, for a block named in ``channels`` whose ``P`` spans
  a full feature map, with the map's channel directions (:func:`channel_marginal`).
  """
  total = jnp.zeros(())
  for name in subspace_alignment_blocks(params, feedback, channels):
    layer = models.output_layer(params, name)
    p = feedback.block(name)['p']
    if is_full_map(p.shape, (channels or {}).get(name)):
      p = channel_marginal(p, channels[name])
    total = total + losses.alignment_subspace(layer['u'], layer['s'], p)
  return total


def subspace_alignment_blocks(params: Any, feedback: fb.Feedback,
                              channels: Mapping[str, int] | None = None) -> list[str]:
  """The blocks :func:`subspace_alignment_loss` acts on.

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
    if not layers.is_svd_layer(layer) or 'p' not in b:
      continue
    rows, (d, k), c = layer['u'].shape[0], b['p'].shape, (channels or {}).get(name)
    if is_full_map(b['p'].shape, c):
      acts = rows % c == 0 and k < c
    else:
      acts = rows % d == 0
    if acts:
      out.append(name)
  return out


def alignment_coverage(params: Any, feedback: fb.Feedback, align: str, *,
                       channels: Mapping[str, int] | None = None,
                       dense_feedback: bool = False, signal: str = 'global',
                       delivery: str = 'channel') -> tuple[list[str], str]:
  """The blocks the subspace term acts on, and a sentence on the factored blocks it skips
  and why ('' when it skips none); the arguments say how the feedback was built."""
  aligned = subspace_alignment_blocks(params, feedback, channels)
  skipped = [n for n in feedback.names if n not in aligned
             and layers.is_svd_layer(models.output_layer(params, n))]
  if not skipped:
    return aligned, ''
  why = "their feedback's P does not match the layer's output factor U"
  by_channel = "dfa.align='channel_subspace' compares such blocks by channel"
  if dense_feedback:
    why = 'their feedback is dense (no subspace P)'
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


def next_alignment_loss(params: Any, feedback: fb.Feedback, order: Sequence[str],
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
    if layers.is_svd_layer(layer) and 'p' in b and layer['v'].shape[0] % b['p'].shape[0] == 0:
      total = total + losses.alignment_subspace(layer['v'], layer['s'], b['p'])
  return total


def local_grads(forward: Forward, params: Any, feedback: fb.Feedback, labels_B: Array, *,
                align: str = 'none', align_weight: float = 0.0,
                tap_order: Sequence[str] = (), signal: str = 'global', signal_mix: float = 0.5,
                readout_norm: bool = True, readout_temperature: float = 0.5,
                sim_weight: float = 0.0,
                learn_feedback: str = 'none') -> tuple[Any, dict[str, Any]]:
  """The DFA/SSA update: a pytree shaped like ``params`` to feed ``tx.update``.

  Args:
    forward: ``params -> ((logits, taps), extra)``, the model applied with ``local=True``.
    params: parameters.
    feedback: fixed feedback with one entry per tap that should learn (taps without one get
      a zero signal).
    labels_B: integer labels.
    align: ``'none'``, ``'subspace'`` (param term, :func:`subspace_alignment_loss`),
      ``'channel_subspace'`` (the same, with full-map conv blocks compared by channel,
      :func:`channel_marginal`),
      ``'output'`` (``1 − cos(h_i, −g_i)`` on each tap, added to the tap's cotangent) or
      ``'next'`` (param term on the reading layer, :func:`next_alignment_loss`).
    align_weight: weight of the alignment term.
    tap_order: the tap names in forward order (``align='next'`` only).
    signal: where each block's error comes from (:mod:`lrdfa_jax.signals`): ``'global'``
      (``g_i = e F_iᵀ``), ``'local'`` (the block's fixed readout ``φ(h_i) F_i / T``; then
      ``feedback`` holds the readouts, :func:`lrdfa_jax.signals.init_readout`) or ``'mixed'``
      (``(1 − signal_mix) e_i + signal_mix e`` through the readout).
    signal_mix: the global error's share under ``'mixed'``.
    readout_norm, readout_temperature: ``φ``'s L2 normalisation and ``T`` (local/mixed).
    sim_weight: ``β`` of the similarity-matching term: a tap's cotangent becomes
      ``(1 − β) (its signal) + β ∂L_sim/∂h`` (:func:`lrdfa_jax.signals.similarity_loss`).

    learn_feedback: ``'none'`` (fixed feedback), ``'local'`` (each readout learns from its
      own CE, Nøkland & Eidnes' "pred" decoder; local/mixed signal) or ``'global'`` (Direct
      Kolen-Pollack, Webster et al. 2020: ``∇F_i = ψ(h_i)ᵀ e / B``, ``ψ`` the transpose of the
      signal's delivery; global signal). Its gradient is ``aux['feedback_grads']``, shaped
      like ``feedback``, in the factors ``P``, ``σ``, ``Q`` (chain rule through ``P diag(σ) Qᵀ``).

  Returns:
    ``(updates, aux)``; ``aux`` holds ``loss`` (CE), ``logits``, ``extra``, ``align_loss``,
    ``local_loss`` (mean over blocks of the readouts' CE; 0 under the global signal) and
    ``feedback_grads`` (None unless ``learn_feedback``).
  """
  if signal not in sig.SIGNALS:
    raise ValueError(f'signal must be one of {sig.SIGNALS}, got {signal!r}.')
  if learn_feedback not in LEARN_FEEDBACK:
    raise ValueError(f'learn_feedback must be one of {LEARN_FEEDBACK}, got {learn_feedback!r}.')
  if learn_feedback != 'none' and (learn_feedback == 'global') != (signal == 'global'):
    raise ValueError(f"learn_feedback={learn_feedback!r} needs signal="
                     f"{'global' if learn_feedback == 'global' else 'local or mixed'}, "
                     f'got {signal!r}.')
  if align not in ALIGNMENTS:
    raise ValueError(f'align must be one of {ALIGNMENTS}, got {align!r}.')
  (logits, taps), vjp_fn, extra = jax.vjp(forward, params, has_aux=True)
  missing = set(feedback.names) - set(taps)
  if missing:
    raise ValueError(f'feedback names blocks {sorted(missing)} that the model does not tap; '
                     f'taps are {sorted(taps)}.')
  batch = logits.shape[0]
  err_BxC = losses.output_error(logits, labels_B)
  signals = fb.project(feedback, err_BxC) if signal == 'global' else {}
  align_loss = jnp.zeros(())
  local_losses = []
  cotangents = {}
  for name, h in taps.items():
    if name not in feedback.names:
      cotangents[name] = jnp.zeros_like(h)
      continue
    if signal == 'global':
      cot = expand_signal(signals[name], h.shape, name) / batch
    else:
      cot, ce = sig.readout_cotangent(
          h, feedback.block(name), labels_B, err_BxC, mix=signal_mix if signal == 'mixed' else 0.0,
          norm=readout_norm, temperature=readout_temperature)
      local_losses.append(ce)
    if sim_weight:
      sim = jax.grad(sig.similarity_loss)(h, labels_B, logits.shape[-1])
      cot = (1.0 - sim_weight) * cot + sim_weight * sim
    if align == 'output' and align_weight:
      a, da = jax.value_and_grad(losses.alignment_output)(h, cot * batch)
      cot = cot + align_weight * da
      align_loss = align_loss + a
    cotangents[name] = cot.astype(h.dtype)
  (updates,) = vjp_fn(((err_BxC / batch).astype(logits.dtype), cotangents))
  if align in ('subspace', 'channel_subspace', 'next') and align_weight:
    if align == 'next' and not tap_order:
      raise ValueError("align='next' needs tap_order, the taps in forward order.")
    if align == 'next':
      term = functools.partial(next_alignment_loss, order=tuple(tap_order))
    else:
      term = functools.partial(subspace_alignment_loss,
                               channels=tap_channels(taps) if align == 'channel_subspace' else None)
    align_loss, da = jax.value_and_grad(term)(params, feedback)
    updates = jax.tree.map(lambda u, d: u + align_weight * d, updates, da)
  aux = {'loss': losses.cross_entropy(logits, labels_B), 'logits': logits, 'extra': extra,
         'align_loss': align_loss,
         'local_loss': sum(local_losses) / len(local_losses) if local_losses else jnp.zeros(()),
         'feedback_grads': None}
  if learn_feedback != 'none':
    aux['feedback_grads'] = feedback_grads(
        feedback, {n: jax.lax.stop_gradient(h) for n, h in taps.items()}, labels_B, err_BxC,
        learn_feedback, norm=readout_norm, temperature=readout_temperature)
  return updates, aux


def feedback_grads(feedback: fb.Feedback, taps: Mapping[str, Array], labels_B: Array,
                   err_BxC: Array, rule: str, *, norm: bool = True,
                   temperature: float = 0.5) -> fb.Feedback:
  """The gradient of learned feedback, shaped like ``feedback`` (see :func:`local_grads`).

  ``'local'``: of ``Σ_i CE(φ(h_i) F_i / T, y)``, each readout its own block's CE.
  ``'global'`` (DKP): of ``Σ_i ⟨ψ(h_i) F_i, e⟩ / B`` with ``e`` held fixed, i.e.
  ``∇F_i = ψ(h_i)ᵀ e / B``, where ``ψ`` is the transpose of :func:`expand_signal` (a
  sum over positions for channel broadcast, a flatten for full maps).
  """
  batch = err_BxC.shape[0]
  err = jax.lax.stop_gradient(err_BxC)

  def objective(f):
    total = jnp.zeros(())
    for name in f.names:
      h, block = taps[name], f.block(name)
      if rule == 'local':
        total = total + sig.local_loss(h, block, labels_B, norm=norm, temperature=temperature)
      else:
        _, transpose = jax.vjp(lambda g: expand_signal(g, h.shape, name),
                               jnp.zeros((batch, sig.block_width(block)), h.dtype))
        (psi,) = transpose(h)
        total = total + jnp.sum(sig.linear(block, psi) * err) / batch
    return total
  return jax.grad(objective)(feedback)


def bp_grads(forward: Forward, params: Any, labels_B: Array) -> tuple[Any, dict[str, Any]]:
  """Backprop: ``jax.grad`` of mean cross-entropy, with the same ``aux`` as :func:`local_grads`.

  ``forward`` is the model applied with ``local=False``.
  """
  def loss_fn(p):
    (logits, _), extra = forward(p)
    return losses.cross_entropy(logits, labels_B), (logits, extra)

  (loss, (logits, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, {'loss': loss, 'logits': logits, 'extra': extra, 'align_loss': jnp.zeros(()),
                 'local_loss': jnp.zeros(())}


def update_angles(a: Any, b: Any, eps: float = 1e-12) -> dict[str, Array]:
  """Angle in degrees between two param-shaped pytrees, per top-level layer (e.g. DFA vs BP)."""
  out = {}
  for name in a:
    xa = jnp.concatenate([x.ravel() for x in jax.tree.leaves(a[name])])
    xb = jnp.concatenate([x.ravel() for x in jax.tree.leaves(b[name])])
    cos = jnp.dot(xa, xb) / (jnp.linalg.norm(xa) * jnp.linalg.norm(xb) + eps)
    out[name] = jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
  return out
