"""The small models: an MLP and the paper's 3-conv CNN (one layer per DFA block)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import flax.linen as nn
import jax

from lrdfa_jax.models.common import (ModuleFn, avg_pool_2x2, batch_norm, block_input,
                                     max_pool_2x2, recompute)

Array = jax.Array


class MLP(nn.Module):
  """Fully connected net: ``dense{i}`` hidden blocks, then ``head``."""
  features: Sequence[int] = (256, 256)
  num_classes: int = 10
  dense: ModuleFn = nn.Dense
  act: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, local: bool | frozenset[str] = False):
    del train
    h = x.reshape(x.shape[0], -1)
    taps = {}
    for i, f in enumerate(self.features, start=1):
      name = f'dense{i}'
      h = self.act(self.dense(f, name=name)(block_input(h, local, name)))
      taps[name] = h
    logits = self.dense(self.num_classes, name='head')(block_input(h, local, 'head'))
    return logits, taps


class SmallConv(nn.Module):
  """The paper's small CNN: conv 32 → pool → 64 → pool → 128 → avgpool 2×2 → FC 512 → FC.

  Blocks: ``conv1``, ``conv2``, ``conv3`` (conv, activation, pool), ``fc1``, ``head``.
  ``tap='pooled'`` (default) taps each conv block after its pool, so feedback reaches the
  block at pooled resolution and flows back through the pool's argmax/average; ``'conv'`` taps
  the activation before the pool (4× the positions), and the pool then has no parameters
  to train and only feeds the next block's (stop-gradient) input. ``norm='batch'`` puts a
  BatchNorm between each conv and its activation (the LLS authors' SmallConv, with
  ``act='leaky_relu'``); its statistics belong to the block.
  """
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  hidden: int = 512
  conv: ModuleFn = nn.Conv
  dense: ModuleFn = nn.Dense
  act: Callable[[Array], Array] = nn.relu
  tap: str = 'pooled'
  norm: str = 'none'

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, local: bool | frozenset[str] = False):
    if self.tap not in ('pooled', 'conv'):
      raise ValueError(f"SmallConv tap must be 'pooled' or 'conv', got {self.tap!r}.")
    if self.norm not in ('none', 'batch'):
      raise ValueError(f"SmallConv norm must be 'none' or 'batch', got {self.norm!r}.")
    taps = {}
    h, again = x, None  # again: the block below on its own cut input (``OVERLAP``)
    for i, w in enumerate(self.widths, start=1):
      name = f'conv{i}'
      conv = self.conv(w, (3, 3), strides=(1, 1), padding='SAME', name=name)
      bn = batch_norm(train, f'{name}_bn') if self.norm == 'batch' else None
      pool = max_pool_2x2 if i < len(self.widths) else avg_pool_2x2

      def block(z, update_stats=True, conv=conv, bn=bn, pool=pool):
        z = conv(z)
        if bn is not None:
          z = bn(z, update_stats=update_stats)
        a = self.act(z)
        return a, pool(a)

      z = block_input(h, local, name, again)
      a, h = block(z)
      taps[name] = a if self.tap == 'conv' else h
      again = recompute(lambda z, update_stats, blk=block: blk(z, update_stats)[1], z)
    flat = lambda t: t.reshape(t.shape[0], -1)
    fc1 = self.dense(self.hidden, name='fc1')
    z = flat(block_input(h, local, 'fc1', again))
    h = self.act(fc1(z))
    taps['fc1'] = h
    again = recompute(lambda z, update_stats: self.act(fc1(z)), z)
    logits = self.dense(self.num_classes, name='head')(block_input(h, local, 'head', again))
    return logits, taps
