"""ResNet-56 (CIFAR) on CIFAR-10, trained with SSA; the ResNet-20 config at depth 56.

Run card:
  command:  python -m experiments.main --config=configs/resnet56_cifar10.py --workdir=runs/r56_c10
  smoke:    python -m experiments.main --config=configs/resnet56_cifar10.py:smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa
  params:   853,018 dense (bp, dfa); 241,810 at rank 1/4, channel split (svd_bp, ssa)
            (python -m experiments.param_counts)
  expected: not measured in this project yet. Published references (BioTorch, Adam):
            BP 92.17 %, DFA 67.98 % on CIFAR-10.
"""
from configs import default, resnet20_cifar10


def get_config(arg: str = ''):
  c = resnet20_cifar10.get_config()
  c.model.name = 'resnet56'
  if arg:
    default.apply_arg(c, arg)
  return c
