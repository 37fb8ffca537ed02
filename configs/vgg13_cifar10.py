"""VGG-13 with BatchNorm (CIFAR variant: 10 convs in 5 stages, 512 → classes) on CIFAR-10, SSA.

Each conv (+ BN, ReLU, and the stage's 2×2 max-pool) is one DFA block (docs/blocks.md).

Run card:
  command:  python -m experiments.main --config=configs/vgg13_cifar10.py --workdir=runs/vgg13_c10
  smoke:    python -m experiments.main --config=configs/vgg13_cifar10.py:smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa
  params:   9,413,066 dense (bp, dfa); 2,667,674 at rank 1/4, channel split (svd_bp, ssa)
            (python -m experiments.param_counts)
  expected: not measured in this project yet. The SSA paper's earlier version reports VGG-13
            within ~0.2 points of BP on CIFAR-10 (secondary source, PAPER.md).
"""
import ml_collections

from configs import default


def get_config(arg: str = ''):
  # overrides example: 'conv1?:0.5' (conv10); kwargs: width = channel multiplier,
  # hidden = FC widths before the head (e.g. (512, 512))
  c = default.zoo_cifar('vgg13', width=1.0, hidden=())
  if arg:
    default.apply_arg(c, arg)
  return c
