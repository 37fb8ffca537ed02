"""VGG for CIFAR (with BatchNorm): every conv is one DFA block.

Block ``conv{i}`` is ``conv → BN → act`` (then the 2×2 max-pool closing its stage); its tap is
that output, its input the previous block's tap (the image for ``conv1``). Hidden FC layers
``fc{i}`` (none by default) are blocks too; ``head`` is the output block.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import flax.linen as nn
import jax

from lrdfa_jax.models.common import (ModuleFn, batch_norm, block_input, max_pool_2x2,
                                     same_pad, scale_width)

Array = jax.Array

# Stages of 3×3 convs, each closed by a 2×2 max-pool (Simonyan & Zisserman 2015, config B).
VGG13_WIDTHS = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


class VGG(nn.Module):
  """VGG with BN for 32×32 inputs: 5 pools take 32×32 to 1×1, then ``hidden`` FCs and ``head``.

  The default is VGG-13 with the CIFAR classifier (512 → classes, as in most CIFAR code).
  Convs have no bias (BN's shift takes its place). ``width`` scales every channel count.
  """
  num_classes: int = 10
  widths: Sequence[Sequence[int]] = VGG13_WIDTHS
  hidden: Sequence[int] = ()
  width: float = 1.0
  conv: ModuleFn = nn.Conv
  dense: ModuleFn = nn.Dense
  act: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, local: bool | frozenset[str] = False):
    taps = {}
    h = x
    i = 0
    for stage in self.widths:
      for j, c in enumerate(stage):
        i += 1
        name = f'conv{i}'
        h = self.conv(scale_width(c, self.width), (3, 3), strides=(1, 1), padding=same_pad(3),
                      use_bias=False, name=name)(block_input(h, local, name))
        h = self.act(batch_norm(train, f'bn{i}')(h))
        if j == len(stage) - 1:
          h = max_pool_2x2(h)
        taps[name] = h
    h = h.reshape(h.shape[0], -1)
    for k, f in enumerate(self.hidden, start=1):
      name = f'fc{k}'
      h = self.act(self.dense(scale_width(f, self.width), name=name)(block_input(h, local, name)))
      taps[name] = h
    logits = self.dense(self.num_classes, name='head')(block_input(h, local, 'head'))
    return logits, taps
