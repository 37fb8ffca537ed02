"""ImageNet-2012 config (tfds). The training loop does not stream ImageNet yet (see README).

Run card:
  data:     place the ILSVRC2012 archives in DIR/downloads/manual, then
            pip install 'lrdfa_jax[tfds-prepare]'; tfds build imagenet2012 --data_dir=DIR --file_format=array_record
  command:  python -m experiments.main --config=configs/imagenet.py --config.data.data_dir=DIR
  smoke:    python -m experiments.main --config=configs/imagenet.py:smoke (synthetic 64×64)
  expected: not measured yet.
"""
from configs import default


def get_config(arg: str = ''):
  c = default.get_config()
  c.data.name = 'imagenet2012'
  c.data.source = 'tfds'
  c.train.batch_size = 256
  c.train.epochs = 90
  c.opt.lr = 1e-3
  if arg:
    default.apply_arg(c, arg)
  return c
