"""Models with DFA semantics. Each returns ``(logits, taps)``.

``taps`` maps a block name to the block's output ``h_i`` (after activation and pooling; for a
residual block, after the add). With ``local=True`` every block input is
``stop_gradient``-ed, so a vjp through the model with cotangents on the taps gives each block
its local update and nothing crosses blocks; with ``local=frozenset(names)`` the inputs of
those blocks stay joined to the block below (``dfa.modules``). The classifier (``head``) is the
output block: it receives the exact CE gradient. What a block is in each model: ``docs/blocks.md``.

Models take their layer constructors as arguments (``conv=``, ``dense=``), called as
``conv(features, kernel_size, strides=..., padding=..., name=...)`` and
``dense(features, name=...)``: ``nn.Conv``/``nn.Dense``, the SVD layers, or
:func:`layer_factory`, which picks per qualified layer name.

Zoo (select by name in :data:`MODELS`): ``mlp``, ``small_conv``, ``vgg13``, ``resnet20``,
``resnet32``, ``resnet56`` (CIFAR), ``resnet18``, ``resnet50`` (ImageNet), ``mobilenet_v1``.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from lrdfa_jax import layers
from lrdfa_jax.models.common import (ACTIVATIONS, INPUT_LAYERS, OUTPUT_LAYERS, avg_pool_2x2,
                                     block_input, global_avg_pool, input_layer, layer_factory,
                                     layer_paths, layer_rank, max_pool_2x2, max_pool_3x3_s2,
                                     output_layer, scoped, unmatched_overrides)
from lrdfa_jax.models.mobilenet import MOBILENET_V1_BLOCKS, DepthwiseSeparable, MobileNetV1
from lrdfa_jax.models.resnet import BLOCKS, BasicBlock, Bottleneck, ResNet
from lrdfa_jax.models.small import MLP, SmallConv
from lrdfa_jax.models.vgg import VGG, VGG13_WIDTHS

_cifar_resnet = functools.partial(ResNet, block='basic', widths=(16, 32, 64), stem='cifar',
                                  stem_width=16, shortcut='pad')
_imagenet_resnet = functools.partial(ResNet, widths=(64, 128, 256, 512), stem='imagenet',
                                     stem_width=64, shortcut='conv')

MODELS = {
    'mlp': MLP,
    'small_conv': SmallConv,
    'vgg13': functools.partial(VGG, widths=VGG13_WIDTHS),
    'resnet20': functools.partial(_cifar_resnet, stage_sizes=(3, 3, 3)),
    'resnet32': functools.partial(_cifar_resnet, stage_sizes=(5, 5, 5)),
    'resnet56': functools.partial(_cifar_resnet, stage_sizes=(9, 9, 9)),
    'resnet18': functools.partial(_imagenet_resnet, stage_sizes=(2, 2, 2, 2), block='basic'),
    'resnet50': functools.partial(_imagenet_resnet, stage_sizes=(3, 4, 6, 3), block='bottleneck'),
    'mobilenet_v1': MobileNetV1,
}
# the models that recompute the block below a cut for ``dfa.overlap`` (common.OVERLAP)
OVERLAP_MODELS = ('small_conv', 'resnet20', 'resnet32', 'resnet56', 'resnet18', 'resnet50')
# the models that can take each residual block's update right after its forward (dfa.blockwise)
BLOCKWISE_MODELS = ('resnet20', 'resnet32', 'resnet56', 'resnet18', 'resnet50')


def residual_blocks(tap_order: Sequence[str]) -> tuple[str, ...]:
  """The taps of a ResNet that are residual blocks (``stage{i}_block{j}``), in forward order."""
  return tuple(n for n in tap_order if n.startswith('stage'))


def _fields(fn) -> Mapping[str, Any]:
  while isinstance(fn, functools.partial):
    fn = fn.func
  return fn.__dataclass_fields__


def build_model(name: str, *, num_classes: int, rank: layers.Rank | None = None,
                overrides: Mapping[str, Any] | None = None, split: str = 'spatial',
                act: str = 'relu', conv_execution: str = 'factored',
                im2col_positions: int = layers.TINY_MAP, conv_kernel_grad: str = 'auto',
                **model_kwargs) -> nn.Module:
  """Builds a model by name; ``rank=None`` for the dense model, else SVD layers at ``rank``.

  ``overrides`` maps layer-name patterns to a rank or ``'dense'`` (:func:`layer_rank`);
  ``model_kwargs`` go to the constructor (e.g. ``width=0.25``, ``shortcut='conv'``).
  ``conv_execution``: how factored convs run (:class:`lrdfa_jax.layers.SVDConv`);
  ``im2col_positions``: convs with at most this many output positions run as im2col + matmul
  (:func:`lrdfa_jax.layers.conv_general_dilated`), dense and factored alike;
  ``conv_kernel_grad``: ``'xla'``, ``'gemm'`` or ``'auto'``: per conv shape on CPU (im2col,
  GEMMs or XLA's; :func:`lrdfa_jax.layers.pick_conv_form`), XLA's on accelerators.
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}.')
  if act not in ACTIVATIONS:
    raise ValueError(f'unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}.')
  fields = _fields(MODELS[name])
  unknown = set(model_kwargs) - set(fields)
  if unknown:
    raise ValueError(f'model {name!r} takes no argument(s) {sorted(unknown)}; it takes '
                     f'{sorted(set(fields) - {"parent", "name", "conv", "dense", "act"})}.')
  dense = layer_factory(layers.SVDDense, nn.Dense, rank, overrides)
  if conv_kernel_grad not in layers.KERNEL_GRADS:
    raise ValueError(f'unknown conv kernel gradient {conv_kernel_grad!r}; choose one of '
                     f'{layers.KERNEL_GRADS}.')
  dense_conv = functools.partial(nn.Conv, conv_general_dilated=functools.partial(
      layers.conv_general_dilated, max_positions=im2col_positions,
      kernel_grad=conv_kernel_grad))
  if conv_execution not in layers.CONV_EXECUTIONS:
    raise ValueError(f'unknown conv execution {conv_execution!r}; choose one of '
                     f'{layers.CONV_EXECUTIONS}.')
  conv = layer_factory(layers.SVDConv, dense_conv, rank, overrides, split=split,
                       execution=conv_execution, im2col_positions=im2col_positions,
                       kernel_grad=conv_kernel_grad)
  kwargs = dict(num_classes=num_classes, dense=dense, act=ACTIVATIONS[act], **model_kwargs)
  if 'conv' in fields:
    kwargs['conv'] = conv
  return functools.partial(MODELS[name], **kwargs)()


__all__ = [
    'ACTIVATIONS', 'BLOCKS', 'INPUT_LAYERS', 'MLP', 'MODELS', 'MOBILENET_V1_BLOCKS',
    'BLOCKWISE_MODELS', 'OUTPUT_LAYERS', 'OVERLAP_MODELS',
    'VGG13_WIDTHS', 'BasicBlock', 'Bottleneck', 'DepthwiseSeparable', 'MobileNetV1', 'ResNet',
    'SmallConv', 'VGG', 'avg_pool_2x2', 'block_input', 'build_model', 'global_avg_pool',
    'input_layer', 'layer_factory', 'layer_paths', 'layer_rank', 'max_pool_2x2', 'residual_blocks',
    'max_pool_3x3_s2', 'output_layer', 'scoped', 'unmatched_overrides',
]
