"""Where a block's error comes from: the global output error, or a local one from a fixed readout.

``signal='global'`` is the paper's DFA: ``g_i = e F_iᵀ`` with ``e`` the output error
(:func:`lrdfa_jax.feedback.project`). ``signal='local'`` gives each block its own error from a
fixed readout built from the same factored matrix ``F_i = P_i diag(σ_i) Q_iᵀ`` (LLS, Apolinario
et al.; Mostafa et al. 2018), so the forward readout and the feedback pathway are one matrix:

* ``φ(h)``: the tap average-pooled to a ``g × g`` grid (conv taps; the grid is read off the
  width of ``P``), optionally through ``L`` learned 1×1 ReLU layers of the tap's width on the
  pooled map (``readout_layers``, the "MLP-SR" auxiliary head of Belilovsky et al.'s DGL),
  flattened, per-sample L2-normalised (``norm``);
* ``z_i = φ(h_i) F_i / T`` (T: ``temperature``), ``e_i = softmax(z_i) − onehot(y)``;
* the tap's cotangent ``∂ CE(z_i, y) / ∂h_i = (e_i F_iᵀ / T)`` pulled back through ``φ``.

``signal='mixed'`` sends ``(1 − m) e_i + m e`` (``m = mix``, the global share) through the same
matrix and the same pull-back. The similarity-matching term of Nøkland & Eidnes 2019 (``sim``,
no parameters) can be added to any of them: ``(1 − β) ∂L_signal/∂h + β ∂L_sim/∂h``.

InfoPro's reconstruction term (Wang et al. 2021, "Revisiting locally supervised learning"):
a conv block's readout may carry a learned decoder ``D`` (:func:`init_decoder`: the tap resized
bilinearly to ``s × s``, a 3×3 ReLU conv to 12 channels, a 3×3 conv to the image's channels),
and the block's cotangent gains ``λ ∂L_rec/∂h`` with ``L_rec = mean (D(h) − x_s)²``, ``x_s``
the (normalised) input image average-pooled to ``s × s`` (:func:`reconstruction_loss`). It
asks a greedy block to keep what its local loss does not need. Unlike InfoPro's CIFAR decoder:
no BatchNorm, MSE on the normalised image (theirs: BCE on [0, 1]), ``jax.image.resize``'s
half-pixel bilinear (theirs: ``align_corners=True``), and any side ``s`` (theirs: the input's).

Every function here is pure and acts on one tap; :func:`lrdfa_jax.dfa.local_grads` calls them.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lrdfa_jax import feedback as fb
from lrdfa_jax import losses

Array = jax.Array
SIGNALS = ('global', 'local', 'mixed')
BASES = ('random', 'sinusoidal')


def readout_grid(tap_shape: tuple[int, ...], dim: int) -> int:
  """The pool grid ``g`` of a conv tap ``[B, H, W, c]``: the largest divisor of H (and W) with
  ``g²·c ≤ dim`` (at least 1). LLS's SmallConv grids (4 after conv1, 2 after conv2 and conv3)
  are what ``dim=512`` gives."""
  _, h, w, c = tap_shape
  grids = [g for g in range(1, min(h, w) + 1) if h % g == 0 and w % g == 0 and g * g * c <= dim]
  return max(grids, default=1)


def readout_widths(tap_shapes: Mapping[str, Any], dim: int) -> dict[str, int]:
  """Block name -> width of its readout features ``φ(h)`` (dense taps keep their width)."""
  out = {}
  for name, s in tap_shapes.items():
    shape = tuple(s.shape)
    out[name] = (readout_grid(shape, dim) ** 2 * shape[-1] if len(shape) == 4
                 else math.prod(shape[1:]))
  return out


def features(h: Array, width: int, norm: bool = True, eps: float = 1e-12,
             hidden: tuple[tuple[Array, Array], ...] = ()) -> Array:
  """``φ(h)`` ``[B, width]``: average pool to the grid that gives ``width``, the ``hidden``
  1×1 layers ``x ↦ relu(x W + b)`` (``W [c, c]``, conv taps only), flatten, L2-normalise."""
  if h.ndim == 4:
    b, hh, ww, c = h.shape
    g = math.isqrt(width // c)
    if g * g * c != width or hh % g or ww % g:
      raise ValueError(f'a readout of width {width} fits no pool grid of a tap {h.shape}.')
    h = h.reshape(b, g, hh // g, g, ww // g, c).mean((2, 4))
    for w, bias in hidden:
      h = jax.nn.relu(h @ w + bias)
  elif hidden:
    raise ValueError(f'hidden readout layers act on conv taps only, got a tap {h.shape}.')
  x = h.reshape(h.shape[0], -1)
  if x.shape[-1] != width:
    raise ValueError(f'readout width {width} does not match the tap {h.shape}.')
  if norm:
    x = x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + eps)
  return x


def hidden_layers(block: Mapping[str, Array]) -> tuple[tuple[Array, Array], ...]:
  """The readout's hidden 1×1 layers ``((W_0, b_0), ...)`` (``w0``, ``b0``, ... in ``block``)."""
  out, i = [], 0
  while f'w{i}' in block:
    out.append((block[f'w{i}'], block[f'b{i}']))
    i += 1
  return tuple(out)


def readout_features(h: Array, block: Mapping[str, Array], norm: bool = True) -> Array:
  """``φ(h)`` for one block's readout (its width and hidden layers read off ``block``)."""
  return features(h, block_width(block), norm, hidden=hidden_layers(block))


def linear(block: Mapping[str, Array], x_BxD: Array) -> Array:
  """``x F`` for one block's (unstacked) feedback, factored or dense."""
  if 'f' in block:
    return x_BxD @ block['f']
  return ((x_BxD @ block['p']) * block['sigma']) @ block['q'].T


def block_width(block: Mapping[str, Array]) -> int:
  """The feature width ``d`` of one block's feedback or readout (``F`` is ``d × C``)."""
  return (block['f'] if 'f' in block else block['p']).shape[0]


def _apply_t(block: Mapping[str, Array], e_BxC: Array) -> Array:
  """``e Fᵀ`` for one block's feedback."""
  if 'f' in block:
    return e_BxC @ block['f'].T
  return ((e_BxC @ block['q']) * block['sigma']) @ block['p'].T


def readout_logits(h: Array, block: Mapping[str, Array], *, norm: bool = True,
                   temperature: float = 0.5) -> Array:
  """The block's fixed local readout ``z_i = φ(h) F_i / T``."""
  return linear(block, readout_features(h, block, norm)) / temperature


def local_loss(h: Array, block: Mapping[str, Array], labels_B: Array, **readout) -> Array:
  """Mean cross-entropy of the block's fixed readout (the local objective; for logs and tests)."""
  return losses.cross_entropy(readout_logits(h, block, **readout), labels_B)


def readout_cotangent(h: Array, block: Mapping[str, Array], labels_B: Array,
                      err_BxC: Array | None = None, *, mix: float = 0.0, norm: bool = True,
                      temperature: float = 0.5) -> tuple[Array, Array]:
  """``(cotangent for the tap, local CE)`` under the local (``mix=0``) or mixed signal.

  The error sent through the readout is ``(1 − mix) e_i + mix e``, ``e`` the global output
  error ``err_BxC`` (needed when ``mix > 0``). Scaled like a mean loss (``1/B``): with
  ``mix=0`` it equals ``jax.grad(local_loss)`` with respect to ``h``.
  """
  x, pull = jax.vjp(lambda t: readout_features(t, block, norm), h)
  z = linear(block, x) / temperature
  onehot = jax.nn.one_hot(labels_B, z.shape[-1], dtype=z.dtype)
  e_local = jax.nn.softmax(z) - onehot
  ce = losses.cross_entropy(z, labels_B)
  e = e_local if not mix else (1.0 - mix) * e_local + mix * err_BxC
  (cot,) = pull(_apply_t(block, e) / (temperature * h.shape[0]))
  return cot, ce


DECODER_CHANNELS = 12  # InfoPro's decoder width on CIFAR


def init_decoder(key: Array, channels: int, out_channels: int = 3,
                 hidden: int = DECODER_CHANNELS) -> dict[str, Array]:
  """A reconstruction decoder's params ``rw0 [3, 3, c, hidden]``, ``rb0``, ``rw1 [3, 3, hidden,
  out]``, ``rb1`` (He-normal for the ReLU layer, LeCun-normal for the linear one, zero biases)."""
  k0, k1 = jax.random.split(key)
  return {'rw0': jax.random.normal(k0, (3, 3, channels, hidden)) * jnp.sqrt(2.0 / (9 * channels)),
          'rb0': jnp.zeros((hidden,), jnp.float32),
          'rw1': jax.random.normal(k1, (3, 3, hidden, out_channels)) * jnp.sqrt(1.0 / (9 * hidden)),
          'rb1': jnp.zeros((out_channels,), jnp.float32)}


def has_decoder(block: Mapping[str, Array]) -> bool:
  return 'rw0' in block


def _conv3x3(x: Array, w: Array, b: Array) -> Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b


def decode(h: Array, block: Mapping[str, Array], size: int) -> Array:
  """The decoder's image ``[B, size, size, out]`` from a conv tap ``h [B, H, W, c]``."""
  x = jax.image.resize(h, (h.shape[0], size, size, h.shape[-1]), 'bilinear')
  x = jax.nn.relu(_conv3x3(x, block['rw0'], block['rb0']))
  return _conv3x3(x, block['rw1'], block['rb1'])


def pooled_image(images: Array, size: int) -> Array:
  """``images [B, H, W, C]`` average-pooled to ``size × size`` (``size`` divides H and W)."""
  b, hh, ww, c = images.shape
  if hh % size or ww % size:
    raise ValueError(f'a reconstruction of side {size} does not divide the {hh}×{ww} input.')
  return images.reshape(b, size, hh // size, size, ww // size, c).mean((2, 4))


def reconstruction_loss(h: Array, block: Mapping[str, Array], images: Array,
                        size: int = 0) -> Array:
  """``mean (D(h) − x_s)²`` over the batch, positions and channels (``size`` 0: the input's
  own side)."""
  size = size or images.shape[1]
  return jnp.mean((decode(h, block, size) - pooled_image(images, size)) ** 2)


def similarity_matrix(x: Array, eps: float = 1e-8) -> Array:
  """Batch cosine-similarity ``[B, B]`` of rows centred by their own mean, clipped to [−1, 1].

  A conv tap ``[B, H, W, c]`` is first reduced to each channel's standard deviation over
  space (Nøkland & Eidnes 2019, ``similarity_matrix`` of anokland/local-loss).
  """
  if x.ndim == 4:
    b, hh, ww, c = x.shape
    x = jnp.std(x.reshape(b, hh * ww, c), axis=1, ddof=1) if hh * ww > 1 else x.reshape(b, c)
  x = x.reshape(x.shape[0], -1)
  xc = x - x.mean(-1, keepdims=True)
  xn = xc / (eps + jnp.sqrt(jnp.sum(xc * xc, -1, keepdims=True)))
  return jnp.clip(xn @ xn.T, -1.0, 1.0)


def similarity_loss(h: Array, labels_B: Array, num_classes: int) -> Array:
  """``mean_{b,b'} (S(h) − S(onehot(y)))²``, the "sim" term (no parameters)."""
  target = similarity_matrix(jax.nn.one_hot(labels_B, num_classes, dtype=h.dtype))
  return jnp.mean((similarity_matrix(h) - target) ** 2)


def sinusoidal_basis(width: int, num_classes: int) -> Array:
  """LLS's fixed basis ``B[c, t] = sin(f_c t)``, ``f = linspace(50, 512, C)``, ``t = 0..d−1``."""
  f = jnp.linspace(50.0, 512.0, num_classes)
  return jnp.sin(f[:, None] * jnp.arange(width, dtype=jnp.float32)[None, :])


def init_readout(key: Array, widths: Mapping[str, int], num_classes: int, *,
                 basis: str = 'sinusoidal', ranks: Mapping[str, int] | int | None = None,
                 scale: float = 1.0, hidden: Mapping[str, tuple[int, int]] | None = None,
                 decoders: Mapping[str, int] | None = None) -> fb.Feedback:
  """Fixed factored readouts ``F_i = P_i diag(σ_i) Q_iᵀ`` (``d_i × C``), one per block.

  ``basis='sinusoidal'``: the truncated SVD of LLS's basis (rank ``k``, exact at ``k = C``);
  ``'random'``: Haar-orthonormal ``P``, ``Q`` with every ``σ = sqrt(d_i / 2)``, the norm of a
  sinusoid row, so both bases give logits of the same size. ``scale`` multiplies ``σ``.
  ``ranks`` as in :func:`lrdfa_jax.feedback.init_feedback`. ``hidden`` maps a conv block to
  ``(layers, channels)``: that many 1×1 ReLU layers ``W_l [c, c]`` (He-normal, ``b_l = 0``)
  between the pool and ``F`` (:func:`features`); the width ``d_i`` is unchanged.
  ``decoders`` maps a conv block to its channels: a reconstruction decoder
  (:func:`init_decoder`) joins its readout.
  """
  if basis not in BASES:
    raise ValueError(f'readout basis must be one of {BASES}, got {basis!r}.')
  if basis == 'random':
    out = fb.init_feedback(key, widths, num_classes, kind='structured', ranks=ranks)
    blocks = {}
    for name in out.names:
      b = out.block(name)
      blocks[name] = {**b, 'sigma': b['sigma'] * scale * jnp.sqrt(b['p'].shape[0] / 2.0)}
  else:
    blocks = {}
    for name, d in widths.items():
      k = ranks.get(name) if isinstance(ranks, Mapping) else ranks
      k = min(d, num_classes) if k is None else max(1, min(int(k), d, num_classes))
      p, s, qt = jnp.linalg.svd(sinusoidal_basis(d, num_classes).T, full_matrices=False)
      blocks[name] = {'p': p[:, :k], 'sigma': s[:k] * scale, 'q': qt[:k].T}
  for name, (n_layers, c) in sorted((hidden or {}).items()):
    if widths[name] % c:
      raise ValueError(f'block {name!r}: readout width {widths[name]} is not a grid of {c} '
                       'channels; hidden readout layers act on conv taps only.')
    keys = jax.random.split(jax.random.fold_in(key, zlib.crc32(name.encode())), n_layers)
    for i, k_layer in enumerate(keys):
      blocks[name][f'w{i}'] = jax.random.normal(k_layer, (c, c)) * jnp.sqrt(2.0 / c)
      blocks[name][f'b{i}'] = jnp.zeros((c,), jnp.float32)
  for name, c in sorted((decoders or {}).items()):
    blocks[name].update(init_decoder(jax.random.fold_in(key, zlib.crc32(b'rec' + name.encode())),
                                     c))
  return fb.from_blocks(blocks)
