"""Pieces shared by every model: activations, pools, block inputs, the per-layer factory.

DFA semantics (see ``docs/blocks.md``): a model's ``__call__(x, *, train, local)`` returns
``(logits, taps)``, ``taps`` mapping a block name to the block's output ``h_i``. With
``local=True`` every block input goes through :func:`block_input` (``stop_gradient``), so
one vjp with cotangents on the taps gives each block its local update.

Layer constructors are passed in (``conv=``, ``dense=``) and called as
``conv(features, kernel_size, strides=..., padding=..., name=...)`` and
``dense(features, name=...)``. Inside a sub-module (a residual block) the model hands the
block ``scoped(conv, block_name)``, so a :func:`layer_factory` sees the qualified layer name
(``stage2_block0/conv1``) that ``model.overrides`` patterns match.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrdfa_jax import layers

Array = jax.Array
ModuleFn = Callable[..., nn.Module]

ACTIVATIONS = {'relu': nn.relu, 'tanh': jnp.tanh, 'gelu': nn.gelu, 'silu': nn.silu,
               'leaky_relu': nn.leaky_relu}  # slope 0.01, PyTorch's default

# The layer that writes a sub-module block's output, by local name, first present wins:
# the bottleneck's conv3, the basic block's conv2, the depthwise-separable block's pw.
OUTPUT_LAYERS = ('conv3', 'conv2', 'pw')
# The layer that reads a sub-module block's input (its main path; a shortcut conv also reads
# it but is not counted): the residual blocks' conv1, the depthwise-separable block's dw.
INPUT_LAYERS = ('conv1', 'dw')


def max_pool_2x2(x: Array) -> Array:
  """2×2/2 max pool as a reshape-max (its backward is 3–5× faster than ``nn.max_pool`` on CPU)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max((2, 4))


def avg_pool_2x2(x: Array) -> Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))


def max_pool_3x3_s2(x: Array) -> Array:
  """3×3/2 max pool with padding 1 (the ImageNet ResNet stem), as a max over 9 strided slices.

  Same output as ``nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))``; the backward avoids
  XLA:CPU's slow select-and-scatter.
  """
  b, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(3):
    for j in range(3):
      win = xp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2, :]
      out = win if out is None else jnp.maximum(out, win)
  return out


def global_avg_pool(x: Array) -> Array:
  return x.mean((1, 2))


# In a ``local`` frozenset: LoCo's overlap (Xiong et al. 2020) at every cut block input. The
# cut block reads the block below *recomputed on that block's own cut input*, so the gradient
# that reaches the cut trains the block below as well and stops at its input (see
# :func:`block_input`); the forward values are the same.
OVERLAP = '<overlap>'


def is_cut(local: bool | frozenset[str], name: str) -> bool:
  """Whether block ``name``'s input is cut from the block below (see :func:`block_input`)."""
  return (name not in local) if isinstance(local, (set, frozenset)) else bool(local)


def block_input(x: Array, local: bool | frozenset[str], name: str = '',
                again: Callable[[], Array] | None = None) -> Array:
  """Block ``name``'s input: cut from the graph under the local update, so nothing crosses blocks.

  ``local`` is ``False`` (backprop: nothing cut), ``True`` (every block input cut) or a
  frozenset of block names whose input stays joined to the block below (``dfa.modules``:
  backprop within a module, a cut between modules); every other block's input is cut. If the
  frozenset holds :data:`OVERLAP` and the model passes ``again`` (the block below applied to
  its own input under ``stop_gradient``, its BatchNorm statistics left as they are), a cut
  input is ``again()``: the same value, through which the gradient trains the block below and
  stops at that block's input.
  """
  if not is_cut(local, name):
    return x
  if again is not None and isinstance(local, (set, frozenset)) and OVERLAP in local:
    return again()
  return jax.lax.stop_gradient(x)


def recompute(block: Callable[..., Any], x: Array, *args: Any) -> Callable[[], Array]:
  """The ``again`` of :func:`block_input` for a block called ``block(x, *args, update_stats)``:
  the block on ``stop_gradient(x)`` with ``update_stats=False`` (the forward has updated its
  BatchNorm statistics already)."""
  return lambda: block(jax.lax.stop_gradient(x), *args, False)


class BatchNorm(nn.BatchNorm):
  """flax's BatchNorm whose call can leave the running statistics as they are
  (``update_stats=False``): a block applied twice to one batch (:data:`OVERLAP`) counts it once."""

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None, update_stats: bool = True) -> Array:
    if update_stats or self.is_initializing():
      return super().__call__(x, use_running_average, mask=mask)
    kept = {k: self.get_variable('batch_stats', k) for k in ('mean', 'var')}
    y = super().__call__(x, use_running_average, mask=mask)
    for k, v in kept.items():
      self.put_variable('batch_stats', k, v)
    return y


def same_pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding ``k // 2`` (PyTorch's, also at stride 2; TF's SAME pads (0, 1) there)."""
  p = kernel_size // 2
  return ((p, p), (p, p))


def batch_norm(train: bool, name: str) -> nn.Module:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there, 0.9 here; eps 1e-5)."""
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def scale_width(c: int, width: float) -> int:
  """Channel count ``c`` under a width multiplier (rounded, at least 1)."""
  return max(1, int(round(c * width)))


# ------------------------------------------------------------------------- layer choice


def layer_rank(path: str, rank: layers.Rank | None, overrides: Mapping[str, Any] | None) -> Any:
  """The rank (or ``'dense'``, or ``None`` for dense) of the layer at qualified ``path``.

  ``overrides`` maps ``fnmatch`` patterns to a rank or ``'dense'``. A pattern applies to a
  layer when it matches the layer's path (``stage2_block0/conv1``) or a parent path
  (``stage2_block0``); ``*`` also matches ``/``. Of the patterns that apply, the last one
  wins; with none, the global ``rank``. A plain name (``conv1``) is an exact match, as before.
  """
  parts = path.split('/')
  scopes = ['/'.join(parts[:i]) for i in range(1, len(parts) + 1)]
  r = rank
  for pattern, value in (overrides or {}).items():
    if any(fnmatch.fnmatchcase(s, pattern) for s in scopes):
      r = value
  return r


def layer_factory(svd_cls: ModuleFn, dense_cls: ModuleFn, rank: layers.Rank | None,
                  overrides: Mapping[str, Any] | None = None, *, prefix: str = '',
                  **svd_kwargs) -> ModuleFn:
  """A layer constructor that picks dense or SVD, and the rank, by qualified layer name.

  ``rank=None`` builds every layer dense. ``overrides`` are patterns (see :func:`layer_rank`)
  mapped to a rank (int or fraction) or ``'dense'``. ``make.scope(block)`` is the same
  factory for the layers inside sub-module ``block`` (names qualified as ``block/layer``).
  """
  overrides = dict(overrides or {})

  def make(*args, name: str, **kwargs):
    r = layer_rank(prefix + name, rank, overrides)
    if r is None or r == 'dense':
      return dense_cls(*args, name=name, **kwargs)
    return svd_cls(*args, rank=r, name=name, **svd_kwargs, **kwargs)

  make.scope = lambda sub: layer_factory(svd_cls, dense_cls, rank, overrides,  # type: ignore
                                         prefix=f'{prefix}{sub}/', **svd_kwargs)
  return make


def scoped(layer_fn: ModuleFn, block: str) -> ModuleFn:
  """The constructor to hand the sub-module ``block``: scoped if it is a :func:`layer_factory`."""
  scope = getattr(layer_fn, 'scope', None)
  return scope(block) if scope is not None else layer_fn


def _is_layer(tree: Any) -> bool:
  return isinstance(tree, Mapping) and ('kernel' in tree or layers.is_svd_layer(dict(tree)))


def layer_paths(params: Any, prefix: str = '') -> dict[str, Any]:
  """Qualified name -> param dict of every conv/dense layer (dense or factored) in ``params``."""
  out = {}
  for k, v in params.items():
    if _is_layer(v):
      out[prefix + k] = v
    elif isinstance(v, Mapping):
      out.update(layer_paths(v, f'{prefix}{k}/'))
  return out


def unmatched_overrides(params: Any, overrides: Mapping[str, Any] | None) -> list[str]:
  """The override patterns that apply to no layer of ``params`` (typos, another model's names)."""
  paths = list(layer_paths(params))
  return [p for p in (overrides or {})
          if not any(layer_rank(q, None, {p: 'x'}) == 'x' for q in paths)]


def _block_layer(params: Any, tap_name: str, names: Sequence[str]) -> Any:
  p = params.get(tap_name) if isinstance(params, Mapping) else None
  if not isinstance(p, Mapping):
    return None
  if _is_layer(p):
    return p
  return next((p[name] for name in names if name in p), None)


def output_layer(params: Any, tap_name: str) -> Any:
  """The layer that writes block ``tap_name``'s output: ``params[tap_name]`` when that is a
  layer (single-layer blocks, stems), else the block's last conv (:data:`OUTPUT_LAYERS`).

  Used for the feedback rank (``min(rank, C)``) and the subspace alignment term. ``None``
  when the block has no such layer.
  """
  return _block_layer(params, tap_name, OUTPUT_LAYERS)


def input_layer(params: Any, tap_name: str) -> Any:
  """The layer that reads block ``tap_name``'s input: ``params[tap_name]`` when that is a
  layer, else the block's first layer (:data:`INPUT_LAYERS`); ``None`` when there is none.

  Used by the next-layer alignment term (``dfa.align='next'``).
  """
  return _block_layer(params, tap_name, INPUT_LAYERS)
