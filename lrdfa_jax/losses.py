"""Loss terms of SSA, each a pure function of explicit arrays.

Notation: logits ``z [B, C]``, integer labels ``y [B]``, a layer ``W = U diag(s) Vᵀ`` with
``U [m, r]``, ``V [n, r]``, and a block's fixed feedback ``F = P diag(σ) Qᵀ`` (``P [d, k]``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def cross_entropy(logits_BxC: Array, labels_B: Array) -> Array:
  """Mean softmax cross-entropy ``-(1/B) Σ_b log softmax(z_b)[y_b]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()


def output_error(logits_BxC: Array, labels_B: Array) -> Array:
  """The DFA error signal ``e = softmax(z) − onehot(y)`` (per example; not a loss).

  It is ``B`` times the gradient of :func:`cross_entropy` with respect to the logits.
  """
  return jax.nn.softmax(logits_BxC) - jax.nn.one_hot(labels_B, logits_BxC.shape[-1])


def alignment_subspace(u_DxR: Array, s_R: Array, p_DxK: Array, eps: float = 1e-8) -> Array:
  """Energy of ``U diag(s)`` outside the feedback subspace ``span(P)``, normalised.

  ``L = ‖(I − P Pᵀ) U diag(s)‖²_F / (‖U diag(s)‖²_F + eps)``, in ``[0, 1]``; 0 when every
  output direction the layer writes lies in the directions the feedback writes into.
  ``P`` must have orthonormal columns. ``u`` may hold several row blocks of size ``d``
  (the spatial conv split's ``[kw·Cout, r]``): they are folded into extra columns first.
  """
  d = p_DxK.shape[0]
  a = (u_DxR * s_R).reshape(-1, d, u_DxR.shape[-1])      # [kw, d, r]
  a = a.transpose(1, 0, 2).reshape(d, -1)                # [d, kw·r]
  outside = a - p_DxK @ (p_DxK.T @ a)
  return jnp.sum(outside**2) / (jnp.sum(a**2) + eps)


def alignment_output(h_BxD: Array, g_BxD: Array, eps: float = 1e-6) -> Array:
  """``mean_b [1 − cos(h_b, −g_b)]`` with ``cos(a, b) = a·b / (sqrt(‖a‖² + eps) sqrt(‖b‖² + eps))``.

  The epsilon keeps the term smooth at zero (a reviewer's point on the earlier version).
  ``g`` is the block's feedback signal, treated as a constant.
  """
  g = jax.lax.stop_gradient(g_BxD)
  h = h_BxD.reshape(h_BxD.shape[0], -1)
  g = g.reshape(g.shape[0], -1)
  cos = -jnp.sum(h * g, -1) / (jnp.sqrt(jnp.sum(h * h, -1) + eps) * jnp.sqrt(jnp.sum(g * g, -1) + eps))
  return jnp.mean(1.0 - cos)


def orthogonality(u_MxR: Array, v_NxR: Array) -> Array:
  """``‖UᵀU − I‖²_F / r² + ‖VᵀV − I‖²_F / r²`` (Yang et al. 2020)."""
  return orthogonality_one(u_MxR) + orthogonality_one(v_NxR)


def orthogonality_one(x_MxR: Array) -> Array:
  """``‖XᵀX − I‖²_F / r²`` for one factor."""
  r = x_MxR.shape[-1]
  x = jnp.asarray(x_MxR)  # a NumPy float64 factor: JAX's dtype, no float64 eye
  gram = x.T @ x
  return jnp.sum((gram - jnp.eye(r, dtype=gram.dtype))**2) / r**2


def hoyer(s_R: Array, eps: float = 1e-12) -> Array:
  """Hoyer sparsity ``‖s‖₁ / ‖s‖₂`` of singular values (lower = fewer effective ranks)."""
  return jnp.sum(jnp.abs(s_R)) / (jnp.sqrt(jnp.sum(s_R**2)) + eps)
