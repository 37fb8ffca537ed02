"""ResNet-18 on ImageNet-2012 (tfds, streamed), trained with SSA.

Records are read from the prepared array_record split and decoded per batch in
``data.workers`` threads; train images get the inception crop + flip, eval images a resize
+ centre crop, both to ``data.image_size`` (0: 224). Metrics include top-5.

Run card:
  data:     place the ILSVRC2012 archives in DIR/downloads/manual, then
            pip install 'lrdfa_jax[tfds-prepare]'; tfds build imagenet2012 --data_dir=DIR --file_format=array_record
  command:  python -m experiments.main --config=configs/imagenet.py --config.data.data_dir=DIR --workdir=runs/in1k
  smoke:    python -m experiments.main --config=configs/imagenet.py:smoke (synthetic 64×64)
  expected: not measured in this project (no ImageNet copy or accelerator was available).
            Published references (BioTorch, ResNet-18): BP 69.61 %, DFA 17.55 % top-1.
"""
import ml_collections

from configs import default


def get_config(arg: str = ''):
  c = default.get_config()
  c.data.name = 'imagenet2012'
  c.data.source = 'tfds'
  c.data.image_size = 224
  c.data.workers = 32
  c.model.name = 'resnet18'
  c.model.act = 'relu'
  c.model.overrides = 'conv1:dense,head:dense'
  c.model.kwargs = ml_collections.ConfigDict(
      {'width': 1.0, 'stem': 'imagenet', 'shortcut': 'conv'})
  c.train.batch_size = 256
  c.train.epochs = 90
  c.opt.lr = 1e-3
  c.opt.warmup_steps = 2500
  if arg:
    default.apply_arg(c, arg)
  return c
