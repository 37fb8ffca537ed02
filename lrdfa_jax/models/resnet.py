"""ResNets with DFA semantics: CIFAR ResNet-20/32/56 (He et al. 2016, §4.2) and ImageNet
ResNet-18/50 (torchvision's layout, v1.5 strides).

DFA blocks (``docs/blocks.md``):

* ``conv1``, the stem: ``conv1 → bn1 → act`` (ImageNet: 7×7/2 conv and a 3×3/2 max-pool).
  Its input is the image; its tap the stem's output.
* ``stage{s}_block{b}``, one residual block: main path, shortcut, add, act. The tap is the
  block output **after** the residual add and the activation. The input is cut
  (``stop_gradient``) before it enters *both* paths, so the local signal trains the main
  path's convs and BNs and the shortcut's 1×1 conv and BN, and stops at the block input.
  The layer that writes the tap is the last conv of the main path (``conv2``/``conv3``).
* ``head``: global average pool of the last block's (cut) output, then the classifier; it
  gets the exact cross-entropy gradient.

BN scale and shift are trained by the block's local vjp (in train mode the normalisation
uses the batch's statistics, and the vjp goes through them); running statistics are updated
in the forward pass, as under backprop.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrdfa_jax.models.common import (ModuleFn, batch_norm, block_input, global_avg_pool,
                                     max_pool_3x3_s2, recompute, same_pad, scale_width,
                                     scoped)

Array = jax.Array
SHORTCUTS = ('pad', 'conv')


def _shortcut(x: Array, features: int, stride: int, kind: str, conv: ModuleFn,
              train: bool, update_stats: bool = True) -> Array:
  """Identity, or a projection when the shape changes.

  ``'pad'`` (option A of He et al., parameter free): subsample by the stride, zero-pad the
  channels. ``'conv'`` (option B): a 1×1 strided conv named ``shortcut`` and ``shortcut_bn``.
  """
  if stride == 1 and x.shape[-1] == features:
    return x
  if kind == 'pad':
    extra = features - x.shape[-1]
    return jnp.pad(x[:, ::stride, ::stride, :],
                   ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  y = conv(features, (1, 1), strides=(stride, stride), padding='VALID', use_bias=False,
           name='shortcut')(x)
  return batch_norm(train, 'shortcut_bn')(y, update_stats=update_stats)


class BasicBlock(nn.Module):
  """``conv1 3×3/s → bn1 → act → conv2 3×3 → bn2``, plus the shortcut, then act."""
  features: int
  stride: int = 1
  shortcut: str = 'conv'
  conv: ModuleFn = nn.Conv
  act: Callable[[Array], Array] = nn.relu
  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool, update_stats: bool = True) -> Array:
    s = self.stride
    y = self.conv(self.features, (3, 3), strides=(s, s), padding=same_pad(3), use_bias=False,
                  name='conv1')(x)
    y = self.act(batch_norm(train, 'bn1')(y, update_stats=update_stats))
    y = self.conv(self.features, (3, 3), strides=(1, 1), padding=same_pad(3), use_bias=False,
                  name='conv2')(y)
    y = batch_norm(train, 'bn2')(y, update_stats=update_stats)
    return self.act(y + _shortcut(x, self.features, s, self.shortcut, self.conv, train,
                                   update_stats))


class Bottleneck(nn.Module):
  """``conv1 1×1 → conv2 3×3/s → conv3 1×1 (4× wide)``, each with BN, + shortcut, then act."""
  features: int
  stride: int = 1
  shortcut: str = 'conv'
  conv: ModuleFn = nn.Conv
  act: Callable[[Array], Array] = nn.relu
  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool, update_stats: bool = True) -> Array:
    s = self.stride
    out = self.features * self.expansion
    y = self.conv(self.features, (1, 1), strides=(1, 1), padding='VALID', use_bias=False,
                  name='conv1')(x)
    y = self.act(batch_norm(train, 'bn1')(y, update_stats=update_stats))
    y = self.conv(self.features, (3, 3), strides=(s, s), padding=same_pad(3), use_bias=False,
                  name='conv2')(y)
    y = self.act(batch_norm(train, 'bn2')(y, update_stats=update_stats))
    y = self.conv(out, (1, 1), strides=(1, 1), padding='VALID', use_bias=False, name='conv3')(y)
    y = batch_norm(train, 'bn3')(y, update_stats=update_stats)
    return self.act(y + _shortcut(x, out, s, self.shortcut, self.conv, train, update_stats))


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


def after(x: Array, tree) -> Array:
  """``x`` unchanged, but computable only once every leaf of ``tree`` is: an exact zero made
  from the sum of all of ``tree`` is added to it. XLA:CPU drops ``lax.optimization_barrier``
  before it schedules, so this data dependency is what orders the program (a non-finite sum
  adds zero, never a NaN)."""
  total = sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))
  return x + (jnp.where(jnp.abs(total) < 1.0, total, 0.0) * 0.0).astype(x.dtype)


class ResNet(nn.Module):
  """A ResNet: a stem, stages of residual blocks, global average pool, ``head``.

  Args (fields):
    stage_sizes: blocks per stage; stage s > 1 starts with a stride-2 block.
    block: ``'basic'`` or ``'bottleneck'``.
    widths: channels per stage (before the bottleneck's expansion).
    stem: ``'cifar'`` (3×3/1 conv) or ``'imagenet'`` (7×7/2 conv, 3×3/2 max-pool).
    stem_width: channels of the stem conv.
    shortcut: ``'pad'`` (option A, CIFAR ResNets of He et al.) or ``'conv'`` (option B).
    width: multiplier on every channel count (e.g. 2 for ResNet-32×2; < 1 for tests).
    remat: ``''`` (off) or the name of a ``jax.checkpoint_policies`` policy
      (``'nothing_saveable'``, ``'dots_with_no_batch_dims_saveable'``, ...): each residual
      block is rematerialised (``nn.remat``) under it, so its backward recomputes what the
      policy does not save. Same params, same update, more FLOPs; on XLA:CPU it leaves bp's
      temporaries unchanged, raises the local signal's and lowers global-signal ssa's by 7–8 %
      (measured, ``docs/benchmarks.md``); other backends are not measured.
  """
  stage_sizes: Sequence[int] = (3, 3, 3)
  block: str = 'basic'
  widths: Sequence[int] = (16, 32, 64)
  stem: str = 'cifar'
  stem_width: int = 16
  shortcut: str = 'pad'
  width: float = 1.0
  num_classes: int = 10
  conv: ModuleFn = nn.Conv
  dense: ModuleFn = nn.Dense
  act: Callable[[Array], Array] = nn.relu
  remat: str = ''

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, local: bool | frozenset[str] = False,
               local_step: Callable[[str, Array], Array] | None = None):
    """``(logits, taps)``. With ``local_step`` (``dfa.blockwise``; needs ``local=True``) each
    residual block's update is taken right after its forward: ``local_step(name, h)`` gives
    the cotangent of the block's output, the block's param gradient is sown into the
    ``'local_grads'`` collection (``blocks``, a dict by block name), and the next block starts
    only once it is computed (:func:`after`), so a block's activations die before the next
    runs."""
    if local_step is not None and (local is not True or self.remat):
      raise ValueError('local_step (dfa.blockwise) needs local=True (every block input cut, no '
                       'modules or overlap) and remat off.')
    if self.remat and not callable(getattr(jax.checkpoint_policies, self.remat, None)):
      raise ValueError(f'remat {self.remat!r} is not a jax.checkpoint_policies policy; use one '
                       "of them (e.g. 'nothing_saveable') or '' (off).")
    if self.block not in BLOCKS:
      raise ValueError(f'unknown block {self.block!r}; choose one of {sorted(BLOCKS)}.')
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f'unknown shortcut {self.shortcut!r}; choose one of {SHORTCUTS}.')
    if self.stem not in ('cifar', 'imagenet'):
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}.")
    if len(self.widths) != len(self.stage_sizes):
      raise ValueError(f'{len(self.widths)} widths for {len(self.stage_sizes)} stages.')
    taps = {}
    k = 3 if self.stem == 'cifar' else 7
    s = 1 if self.stem == 'cifar' else 2
    stem_conv = self.conv(scale_width(self.stem_width, self.width), (k, k), strides=(s, s),
                          padding=same_pad(k), use_bias=False, name='conv1')
    stem_bn = batch_norm(train, 'bn1')

    def stem(z, update_stats=True):
      z = self.act(stem_bn(stem_conv(z), update_stats=update_stats))
      return max_pool_3x3_s2(z) if self.stem == 'imagenet' else z

    z = block_input(x, local, 'conv1')
    h = taps['conv1'] = stem(z)
    again = recompute(stem, z)  # the block below on its own cut input (``OVERLAP``)
    block_cls = BLOCKS[self.block]
    if self.remat:  # ``train`` and ``update_stats`` (arguments 2, 3, counting self): static
      block_cls = nn.remat(block_cls, static_argnums=(2, 3),
                           policy=getattr(jax.checkpoint_policies, self.remat))
    for i, (n, c) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for b in range(n):
        name = f'stage{i}_block{b}'
        blk = block_cls(scale_width(c, self.width), stride=2 if i > 1 and b == 0 else 1,
                        shortcut=self.shortcut, conv=scoped(self.conv, name), act=self.act,
                        name=name)
        z = block_input(h, local, name, again)
        if local_step is None:
          h = taps[name] = blk(z, train, True)
        else:
          h, block_vjp = nn.vjp(lambda m, z: m(z, train, True), blk, z)
          grads, _ = block_vjp(local_step(name, h))
          self.sow('local_grads', 'blocks', {name: grads['params']}, init_fn=dict,
                   reduce_fn=lambda acc, g: {**acc, **g})
          h = taps[name] = after(h, grads)
        again = recompute(blk, z, train)
    logits = self.dense(self.num_classes, name='head')(
        global_avg_pool(block_input(h, local, 'head', again)))
    return logits, taps
