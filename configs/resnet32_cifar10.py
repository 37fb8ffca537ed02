"""ResNet-32 (CIFAR) on CIFAR-10, trained with SSA; the ResNet-20 config at depth 32.

Run card:
  command:  python -m experiments.main --config=configs/resnet32_cifar10.py --workdir=runs/r32_c10
  smoke:    python -m experiments.main --config=configs/resnet32_cifar10.py:smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa
  params:   464,154 dense (bp, dfa); 132,274 at rank 1/4, channel split (svd_bp, ssa)
            (python -m experiments.param_counts)
  expected: not measured in this project yet. The paper (SSA) reports ResNet-32 on CIFAR;
            Khodak et al. 2021: low-rank BP ResNet-32×2 at 10 % params 94.34 % (dense 94.49 %).
"""
from configs import default, resnet20_cifar10


def get_config(arg: str = ''):
  c = resnet20_cifar10.get_config()
  c.model.name = 'resnet32'
  if arg:
    default.apply_arg(c, arg)
  return c
