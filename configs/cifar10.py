"""SmallConv on CIFAR-10 (offline copy in ../shared/data), trained with SSA.

Run card:
  command:  python -m experiments.main --config=configs/cifar10.py --workdir=runs/c10
  smoke:    python -m experiments.main --config=configs/cifar10.py:smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa
  expected: see the README's "Main run" section (measured on this project's 2-core CPU
            machine; the number and the command that produced it are given there).
"""
from configs import default


def get_config(arg: str = ''):
  c = default.get_config()
  c.data.name = 'cifar10'
  c.data.source = 'offline'
  if arg:
    default.apply_arg(c, arg)
  return c
