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
  # overrides example: 'block1[23]/pw:0.5' (blocks 12, 13); kwargs: width = the paper's
  # multiplier α, stem = cifar (3×3/1) | imagenet (3×3/2)
  c = default.zoo_cifar('mobilenet_v1', width=1.0, stem='cifar')
  if arg:
    default.apply_arg(c, arg)
  return c
