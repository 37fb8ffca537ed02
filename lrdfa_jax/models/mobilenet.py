"""MobileNetV1 (Howard et al. 2017) with DFA semantics.

Blocks: ``conv1`` (the stem: 3×3 conv → BN → act; stride 1 on CIFAR, 2 on ImageNet), then
``block{i}``, each a depthwise-separable pair ``dw 3×3/s → dw_bn → act → pw 1×1 → pw_bn →
act`` whose tap is its output; the layer that writes it is ``pw``. The depthwise conv stays a
dense ``nn.Conv(feature_group_count=C)`` in every method (it has 9·C weights; factoring it
saves nothing); ``pw``, the stem and ``head`` come from the layer constructors.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import flax.linen as nn
import jax

from lrdfa_jax.models.common import (ModuleFn, batch_norm, block_input, global_avg_pool,
                                     same_pad, scale_width, scoped)

Array = jax.Array

# (channels, stride) of the 13 depthwise-separable blocks (Table 1 of the paper).
MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                       (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class DepthwiseSeparable(nn.Module):
  features: int
  stride: int = 1
  conv: ModuleFn = nn.Conv
  act: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    s = self.stride
    y = nn.Conv(c, (3, 3), strides=(s, s), padding=same_pad(3), feature_group_count=c,
                use_bias=False, name='dw')(x)
    y = self.act(batch_norm(train, 'dw_bn')(y))
    y = self.conv(self.features, (1, 1), strides=(1, 1), padding='VALID', use_bias=False,
                  name='pw')(y)
    return self.act(batch_norm(train, 'pw_bn')(y))


class MobileNetV1(nn.Module):
  """MobileNetV1; ``width`` is the paper's multiplier α; ``stem='cifar'`` has stride 1."""
  num_classes: int = 10
  blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS
  stem: str = 'cifar'
  stem_width: int = 32
  width: float = 1.0
  conv: ModuleFn = nn.Conv
  dense: ModuleFn = nn.Dense
  act: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, local: bool | frozenset[str] = False):
    if self.stem not in ('cifar', 'imagenet'):
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}.")
    s = 1 if self.stem == 'cifar' else 2
    h = self.conv(scale_width(self.stem_width, self.width), (3, 3), strides=(s, s),
                  padding=same_pad(3), use_bias=False, name='conv1')(block_input(x, local, 'conv1'))
    h = self.act(batch_norm(train, 'bn1')(h))
    taps = {'conv1': h}
    for i, (c, stride) in enumerate(self.blocks, start=1):
      name = f'block{i}'
      h = DepthwiseSeparable(scale_width(c, self.width), stride, conv=scoped(self.conv, name),
                             act=self.act, name=name)(block_input(h, local, name), train)
      taps[name] = h
    logits = self.dense(self.num_classes, name='head')(
        global_avg_pool(block_input(h, local, 'head')))
    return logits, taps
