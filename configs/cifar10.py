"""SmallConv on CIFAR-10 (offline copy in ../shared/data), trained with SSA.

Run card:
  command:  python -m experiments.main --config=configs/cifar10.py --workdir=runs/c10
  smoke:    python -m experiments.main --config=configs/cifar10.py:smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa
  expected: 56.63 % final test accuracy after 10 epochs (ssa, seed 0; 56.86 ± 0.52 % over seeds
            0-2), measured 2026-11-27 on this project's shared 2-core CPU (x86_64, jax 0.10.2) by
            `python -m experiments.protocol` (its ssa run has this config), with up to 9 runs
            sharing the machine (stopped after epoch 5 and resumed; see the README). Summary in results/main_cifar10/, the comparison
            with bp/svd_bp/dfa in results/cifar10_small_conv/ and the README.
"""
from configs import default


def get_config(arg: str = ''):
  c = default.get_config()
  c.data.name = 'cifar10'
  c.data.source = 'offline'
  if arg:
    default.apply_arg(c, arg)
  return c
