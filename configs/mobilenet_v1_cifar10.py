"""MobileNetV1 (CIFAR: stride-1 stem, 13 depthwise-separable blocks) on CIFAR-10, SSA.

Depthwise convs stay dense in every method; the pointwise convs are factored (docs/blocks.md).

Run card:
  command:  python -m experiments.main --config=configs/mobilenet_v1_cifar10.py --workdir=runs/mbv1_c10
  smoke:    python -m experiments.main --config=configs/mobilenet_v1_cifar10.py:smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa
  params:   3,217,226 dense (bp, dfa); 1,561,378 at rank 1/4, channel split (svd_bp, ssa)
            (python -m experiments.param_counts)
  expected: not measured in this project yet (the SSA paper uses MobileNetV1 in its efficiency
            figure only).
"""
import ml_collections

from configs import default


def get_config(arg: str = ''):
  c = default.get_config()
  c.model.name = 'mobilenet_v1'
  c.model.act = 'relu'
  c.model.rank = 0.25
  c.model.overrides = 'conv1:dense,head:dense'  # e.g. 'block1[23]/pw:0.5' (blocks 12, 13)
  c.model.kwargs = ml_collections.ConfigDict()
  c.model.kwargs.width = 1.0       # the paper's width multiplier α
  c.model.kwargs.stem = 'cifar'    # cifar (3×3/1 stem) | imagenet (3×3/2 stem)
  c.data.name = 'cifar10'
  c.data.source = 'offline'
  c.opt.lr = 1e-3
  c.opt.warmup_steps = 500
  c.train.epochs = 100
  if arg:
    default.apply_arg(c, arg)
  return c
