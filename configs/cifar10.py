"""SmallConv on CIFAR-10 (offline copy in ../shared/data), trained with SSA.

Run card:
  command:  python -m experiments.main --config=configs/cifar10.py --workdir=runs/c10
  smoke:    python -m experiments.main --config=configs/cifar10.py:smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa
  expected: 54.01 % final test accuracy after 10 epochs (ssa, seed 0), 2,343 s wall time on a
            shared 2-core CPU (x86_64, jax 0.10.2), measured 2026-11-27 by the command above;
            summary in results/main_cifar10/. (A 3-epoch probe under lighter load took 221 s.)
"""
from configs import default


def get_config(arg: str = ''):
  c = default.get_config()
  c.data.name = 'cifar10'
  c.data.source = 'offline'
  if arg:
    default.apply_arg(c, arg)
  return c
