"""SmallConv on CIFAR-100, trained with SSA.

Run card:
  command:  python -m experiments.main --config=configs/cifar100.py --workdir=runs/c100
  data:     the offline copy ../shared/data/cifar100 (same layout as cifar10) when present, or
            tfds: pip install 'lrdfa_jax[tfds-prepare]'; tfds build cifar100 --data_dir=DIR --file_format=array_record;
            then add --config.data.source=tfds --config.data.data_dir=DIR
  expected: not measured yet.
"""
from configs import default


def get_config(arg: str = ''):
  c = default.get_config()
  c.data.name = 'cifar100'
  c.data.source = 'offline'
  if arg:
    default.apply_arg(c, arg)
  return c
