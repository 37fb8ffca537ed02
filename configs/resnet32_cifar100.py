"""resnet32 on CIFAR-100, trained with SSA: `resnet32_cifar10.py` with 100 classes.

Run card:
  command:  python -m experiments.main --config=configs/resnet32_cifar100.py --workdir=runs/r32_c100
  data:     ../shared/data/cifar100 when present, else tfds (see configs/cifar100.py)
  smoke:    python -m experiments.main --config=configs/resnet32_cifar100.py:smoke
  expected: not measured in this project yet.
"""
from configs import default, resnet32_cifar10


def get_config(arg: str = ''):
  c = resnet32_cifar10.get_config()
  c.data.name = 'cifar100'
  if arg:
    default.apply_arg(c, arg)
  return c
