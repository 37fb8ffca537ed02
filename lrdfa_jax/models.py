"""Models with DFA semantics. Each returns ``(logits, taps)``.

``taps`` maps a block name to the block's output ``h_i`` (after activation and pooling).
With ``local=True`` every block input is ``stop_gradient``-ed, so a vjp through the model
with cotangents on the taps gives each block its local update and nothing crosses blocks.
The classifier (``head``) is the output block: it receives the exact CE gradient.

Models take their layer constructors as arguments (``conv=``, ``dense=``), called as
``conv(features, kernel_size, strides=..., padding=..., name=...)`` and
``dense(features, name=...)``: ``nn.Conv``/``nn.Dense``, the SVD layers, or
:func:`layer_factory`, which picks per layer name.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrdfa_jax import layers

Array = jax.Array
ModuleFn = Callable[..., nn.Module]

ACTIVATIONS = {'relu': nn.relu, 'tanh': jnp.tanh, 'gelu': nn.gelu, 'silu': nn.silu}


def max_pool_2x2(x: Array) -> Array:
  """2×2/2 max pool as a reshape-max (its backward is 3–5× faster than ``nn.max_pool`` on CPU)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max((2, 4))


def avg_pool_2x2(x: Array) -> Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))


def _block_input(x: Array, local: bool) -> Array:
  return jax.lax.stop_gradient(x) if local else x


class MLP(nn.Module):
  """Fully connected net: ``dense{i}`` hidden blocks, then ``head``."""
  features: Sequence[int] = (256, 256)
  num_classes: int = 10
  dense: ModuleFn = nn.Dense
  act: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, local: bool = False):
    del train
    h = x.reshape(x.shape[0], -1)
    taps = {}
    for i, f in enumerate(self.features, start=1):
      name = f'dense{i}'
      h = self.act(self.dense(f, name=name)(_block_input(h, local)))
      taps[name] = h
    logits = self.dense(self.num_classes, name='head')(_block_input(h, local))
    return logits, taps


class SmallConv(nn.Module):
  """The paper's small CNN: conv 32 → pool → 64 → pool → 128 → avgpool 2×2 → FC 512 → FC.

  Blocks: ``conv1``, ``conv2``, ``conv3`` (conv, activation, pool), ``fc1``, ``head``.
  """
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  hidden: int = 512
  conv: ModuleFn = nn.Conv
  dense: ModuleFn = nn.Dense
  act: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, local: bool = False):
    del train
    taps = {}
    h = x
    for i, w in enumerate(self.widths, start=1):
      name = f'conv{i}'
      h = self.act(self.conv(w, (3, 3), strides=(1, 1), padding='SAME', name=name)(
          _block_input(h, local)))
      h = max_pool_2x2(h) if i < len(self.widths) else avg_pool_2x2(h)
      taps[name] = h
    h = h.reshape(h.shape[0], -1)
    h = self.act(self.dense(self.hidden, name='fc1')(_block_input(h, local)))
    taps['fc1'] = h
    logits = self.dense(self.num_classes, name='head')(_block_input(h, local))
    return logits, taps


def layer_factory(svd_cls: ModuleFn, dense_cls: ModuleFn, rank: layers.Rank | None,
                  overrides: Mapping[str, Any] | None = None, **svd_kwargs) -> ModuleFn:
  """A layer constructor that picks dense or SVD, and the rank, by layer name.

  ``rank=None`` builds every layer dense. ``overrides[name]`` is a rank (int or fraction)
  or ``'dense'`` for that layer.
  """
  overrides = dict(overrides or {})

  def make(*args, name: str, **kwargs):
    r = overrides.get(name, rank)
    if r is None or r == 'dense':
      return dense_cls(*args, name=name, **kwargs)
    return svd_cls(*args, rank=r, name=name, **svd_kwargs, **kwargs)

  return make


MODELS = {'mlp': MLP, 'small_conv': SmallConv}


def build_model(name: str, *, num_classes: int, rank: layers.Rank | None = None,
                overrides: Mapping[str, Any] | None = None, split: str = 'spatial',
                act: str = 'relu', **model_kwargs) -> nn.Module:
  """Builds a model by name; ``rank=None`` for the dense model, else SVD layers at ``rank``."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}.')
  if act not in ACTIVATIONS:
    raise ValueError(f'unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}.')
  dense = layer_factory(layers.SVDDense, nn.Dense, rank, overrides)
  conv = layer_factory(layers.SVDConv, nn.Conv, rank, overrides, split=split)
  cls = MODELS[name]
  kwargs = dict(num_classes=num_classes, dense=dense, act=ACTIVATIONS[act], **model_kwargs)
  if 'conv' in cls.__dataclass_fields__:
    kwargs['conv'] = conv
  return functools.partial(cls, **kwargs)()
