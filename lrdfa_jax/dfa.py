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
from lrdfa_jax import alignment as al
from lrdfa_jax import losses, signals as sig

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


def tap_widths(tap_shapes: dict[str, Any], mode: str = 'channel') -> dict[str, int]:
  """Feedback width per tap: channel count (signal broadcast over space) or full size."""
  if mode not in ('channel', 'full'):
    raise ValueError(f"feedback delivery must be 'channel' or 'full', got {mode!r}.")
  return {n: (s.shape[-1] if mode == 'channel' else math.prod(s.shape[1:]))
          for n, s in tap_shapes.items()}


def _tap_cotangent(name: str, h: Array, feedback: fb.Feedback, labels_B: Array,
                   err_BxC: Array | None, *, signal: str, signal_mix: float, readout_norm: bool,
                   readout_temperature: float, sim_weight: float, recon_weight: float,
                   recon_size: int, images: Array | None, align: str, align_weight: float,
                   global_cot: Array | None = None, num_classes: int = 0
                   ) -> tuple[Array, dict[str, Array]]:
  """One tap's cotangent (see :func:`local_grads`) and its loss terms (``ce``, ``rec``,
  ``align``, where they apply): the signal, blended with the similarity term, plus the
  reconstruction and output-alignment gradients."""
  batch = h.shape[0]
  terms = {}
  if global_cot is not None:
    cot = global_cot
  else:
    cot, terms['ce'] = sig.readout_cotangent(
        h, feedback.block(name), labels_B, err_BxC, mix=signal_mix if signal == 'mixed' else 0.0,
        norm=readout_norm, temperature=readout_temperature)
  if sim_weight:
    sim = jax.grad(sig.similarity_loss)(h, labels_B, num_classes)
    cot = (1.0 - sim_weight) * cot + sim_weight * sim
  if recon_weight and sig.has_decoder(feedback.block(name)):  # local readouts only
    terms['rec'], drec = jax.value_and_grad(sig.reconstruction_loss)(
        h, feedback.block(name), images, recon_size)
    cot = cot + recon_weight * drec
  if align == 'output' and align_weight:
    terms['align'], da = jax.value_and_grad(losses.alignment_output)(h, cot * batch)
    cot = cot + align_weight * da
  return cot.astype(h.dtype), terms


def local_grads(forward: Forward, params: Any, feedback: fb.Feedback, labels_B: Array, *,
                align: str = 'none', align_weight: float = 0.0,
                tap_order: Sequence[str] = (), signal: str = 'global', signal_mix: float = 0.5,
                readout_norm: bool = True, readout_temperature: float = 0.5,
                sim_weight: float = 0.0,
                learn_feedback: str = 'none', recon_weight: float = 0.0, recon_size: int = 0,
                images: Array | None = None,
                blockwise: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
  """The DFA/SSA update: a pytree shaped like ``params`` to feed ``tx.update``.

  Args:
    forward: ``params -> ((logits, taps), extra)``, the model applied with ``local=True``.
    params: parameters.
    feedback: fixed feedback with one entry per tap that should learn (taps without one get
      a zero signal).
    labels_B: integer labels.
    align: ``'none'``, ``'subspace'`` (param term, :func:`lrdfa_jax.alignment.subspace_loss`),
      ``'channel_subspace'`` (the same, with full-map conv blocks compared by channel),
      ``'output'`` (``1 − cos(h_i, −g_i)`` on each tap, added to the tap's cotangent) or
      ``'next'`` (param term on the reading layer, :func:`lrdfa_jax.alignment.next_loss`).
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
    recon_weight, recon_size, images: InfoPro's reconstruction term on the readouts that
      carry a decoder (:func:`lrdfa_jax.signals.reconstruction_loss` of the input ``images``
      pooled to ``recon_size``, 0: their own side): such a tap's cotangent gains
      ``recon_weight · ∂L_rec/∂h`` (after the sim blend), and under ``learn_feedback='local'``
      the decoder learns ``recon_weight · L_rec``.
    blockwise: the blocks whose update the model takes itself, right after each one's forward
      (``dfa.blockwise``; local signal): ``forward`` is then called as
      ``forward(params, local_step=fn) -> ((logits, taps), extra, block_grads)``, the model
      asks ``fn(name, h)`` for a block's output cotangent and returns the block's gradient
      in ``block_grads[name]``; everything else (stem, head) goes through the one ``vjp``.
      Same update as without it, up to float rounding; what changes is the order, so a
      block's activations can be freed before the next block runs.

  Returns:
    ``(updates, aux)``; ``aux`` holds ``loss`` (CE), ``logits``, ``extra``, ``align_loss``,
    ``local_loss`` (mean over blocks of the readouts' CE; 0 under the global signal),
    ``recon_loss`` (mean over the decoders of ``L_rec``; 0 without them) and
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
  if recon_weight and images is None:
    raise ValueError('recon_weight needs the input images (images=...).')
  opts = dict(signal=signal, signal_mix=signal_mix, readout_norm=readout_norm,
              readout_temperature=readout_temperature, sim_weight=sim_weight,
              recon_weight=recon_weight, recon_size=recon_size, images=images,
              align=align, align_weight=align_weight)
  terms = {'ce': [], 'rec': [], 'align': [], 'feedback_grads': []}
  block_taps = {}  # blockwise: the shapes of the taps the model handled itself
  if blockwise:
    if signal != 'local' or sim_weight or learn_feedback == 'global':
      raise ValueError('blockwise needs signal=local, sim_weight=0 and no global feedback '
                       'learning: a block\'s error must come from its own output alone.')

    def local_step(name, h):  # a block's cotangent, right after its forward
      block_taps[name] = jax.ShapeDtypeStruct(h.shape, h.dtype)  # for the param terms
      if name not in feedback.names:
        return jnp.zeros_like(h)
      cot, t = _tap_cotangent(name, h, feedback, labels_B, None, **opts)
      for k, v in t.items():
        terms[k].append(v)
      if learn_feedback == 'local':
        terms['feedback_grads'].append(feedback_grads(
            feedback, {name: jax.lax.stop_gradient(h)}, labels_B, None, 'local',
            norm=readout_norm, temperature=readout_temperature, recon_weight=recon_weight,
            recon_size=recon_size, images=images))
      return cot

    fixed = {k: v for k, v in params.items() if k in blockwise}

    def outer(free):
      (logits, taps), extra, block_grads = forward({**free, **fixed}, local_step=local_step)
      return (logits, {n: h for n, h in taps.items() if n not in blockwise}), (
          extra, block_grads, terms)
    free = {k: v for k, v in params.items() if k not in blockwise}
    (logits, taps), vjp_fn, (extra, block_grads, terms) = jax.vjp(outer, free, has_aux=True)
  else:
    (logits, taps), vjp_fn, extra = jax.vjp(forward, params, has_aux=True)
  missing = set(feedback.names) - set(taps) - set(blockwise)
  if missing:
    raise ValueError(f'feedback names blocks {sorted(missing)} that the model does not tap; '
                     f'taps are {sorted(taps)}.')
  batch = logits.shape[0]
  err_BxC = losses.output_error(logits, labels_B)
  signals = fb.project(feedback, err_BxC) if signal == 'global' else {}
  cotangents = {}
  for name, h in taps.items():
    if name not in feedback.names:
      cotangents[name] = jnp.zeros_like(h)
      continue
    global_cot = (expand_signal(signals[name], h.shape, name) / batch if signal == 'global'
                  else None)
    cot, t = _tap_cotangent(name, h, feedback, labels_B, err_BxC, global_cot=global_cot,
                            num_classes=logits.shape[-1], **opts)
    for k, v in t.items():
      terms[k].append(v)
    cotangents[name] = cot
  (updates,) = vjp_fn(((err_BxC / batch).astype(logits.dtype), cotangents))
  if blockwise:
    updates = {k: block_grads[k] if k in blockwise else updates[k] for k in params}
  align_loss = sum(terms['align']) if terms['align'] else jnp.zeros(())
  local_losses, recon_losses = terms['ce'], terms['rec']
  if align in al.PARAM_TERMS and align_weight:
    term = functools.partial(al.PARAM_TERMS[align],
                             channels=al.tap_channels({**taps, **block_taps}),
                             tap_order=tap_order)
    align_loss, da = jax.value_and_grad(term)(params, feedback)
    updates = jax.tree.map(lambda u, d: u + align_weight * d, updates, da)
  aux = {'loss': losses.cross_entropy(logits, labels_B), 'logits': logits, 'extra': extra,
         'align_loss': align_loss,
         'local_loss': sum(local_losses) / len(local_losses) if local_losses else jnp.zeros(()),
         'recon_loss': sum(recon_losses) / len(recon_losses) if recon_losses else jnp.zeros(()),
         'feedback_grads': None}
  if learn_feedback != 'none':  # under blockwise, `taps` are the rest: stem and head
    aux['feedback_grads'] = feedback_grads(
        feedback, {n: jax.lax.stop_gradient(h) for n, h in taps.items()}, labels_B, err_BxC,
        learn_feedback, norm=readout_norm, temperature=readout_temperature,
        recon_weight=recon_weight, recon_size=recon_size, images=images)
    if terms['feedback_grads']:  # the blocks' readouts, from their own outputs
      aux['feedback_grads'] = jax.tree.map(lambda *g: sum(g), aux['feedback_grads'],
                                           *terms['feedback_grads'])
  return updates, aux


def feedback_grads(feedback: fb.Feedback, taps: Mapping[str, Array], labels_B: Array,
                   err_BxC: Array | None, rule: str, *, norm: bool = True,
                   temperature: float = 0.5, recon_weight: float = 0.0, recon_size: int = 0,
                   images: Array | None = None) -> fb.Feedback:
  """The gradient of learned feedback, shaped like ``feedback`` (see :func:`local_grads`).

  ``'local'``: of ``Σ_i CE(φ(h_i) F_i / T, y)``, each readout its own block's CE, plus
  ``recon_weight · L_rec`` for a readout with a decoder.
  ``'global'`` (DKP): of ``Σ_i ⟨ψ(h_i) F_i, e⟩ / B`` with ``e`` held fixed, i.e.
  ``∇F_i = ψ(h_i)ᵀ e / B``, where ``ψ`` is the transpose of :func:`expand_signal` (a
  sum over positions for channel broadcast, a flatten for full maps).
  Only the readouts of the blocks in ``taps`` contribute (``'local'`` needs no ``err_BxC``).
  """
  err = None if err_BxC is None else jax.lax.stop_gradient(err_BxC)

  def objective(f):
    total = jnp.zeros(())
    for name in (n for n in f.names if n in taps):
      h, block = taps[name], f.block(name)
      if rule == 'local':
        total = total + sig.local_loss(h, block, labels_B, norm=norm, temperature=temperature)
        if recon_weight and sig.has_decoder(block):
          total = total + recon_weight * sig.reconstruction_loss(h, block, images, recon_size)
      else:
        batch = h.shape[0]
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
                 'local_loss': jnp.zeros(()), 'recon_loss': jnp.zeros(())}


def update_angles(a: Any, b: Any, eps: float = 1e-12) -> dict[str, Array]:
  """Angle in degrees between two param-shaped pytrees, per top-level layer (e.g. DFA vs BP)."""
  out = {}
  for name in a:
    xa = jnp.concatenate([x.ravel() for x in jax.tree.leaves(a[name])])
    xb = jnp.concatenate([x.ravel() for x in jax.tree.leaves(b[name])])
    cos = jnp.dot(xa, xb) / (jnp.linalg.norm(xa) * jnp.linalg.norm(xb) + eps)
    out[name] = jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
  return out
