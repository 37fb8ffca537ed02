"""ResNet-18 (torchvision layout: 7×7/2 stem + 3×3/2 max-pool, 4 stages of basic blocks,
1×1/2 projection shortcuts) on ImageNet-2012, trained with SSA.

The model fields spelled out on top of configs/imagenet.py (which already trains ResNet-18),
as the base for variants. Smoke: synthetic 64×64 images, 1000 classes.

Run card:
  data:     place the ILSVRC2012 archives in DIR/downloads/manual, then
            pip install 'lrdfa_jax[tfds-prepare]'; tfds build imagenet2012 --data_dir=DIR --file_format=array_record
  command:  python -m experiments.main --config=configs/resnet18_imagenet.py --config.data.data_dir=DIR
  smoke:    python -m experiments.main --config=configs/resnet18_imagenet.py:smoke
  params:   11,689,512 dense (bp, dfa); 3,692,120 at rank 1/4, channel split (svd_bp, ssa)
            (python -m experiments.param_counts)
  expected: not measured in this project. Published references (BioTorch): BP 69.61 %,
            DFA 17.55 % top-1.
"""
import ml_collections

from configs import default, imagenet


def get_config(arg: str = ''):
  c = imagenet.get_config()
  c.model.name = 'resnet18'
  c.model.act = 'relu'
  c.model.rank = 0.25
  c.model.overrides = 'conv1:dense,head:dense'  # e.g. '*/shortcut:dense,stage4*:0.125'
  c.model.kwargs = ml_collections.ConfigDict()
  c.model.kwargs.width = 1.0       # channel multiplier
  c.model.kwargs.stem = 'imagenet'  # imagenet (7×7/2 + max-pool) | cifar (3×3/1, for 32×32 inputs)
  c.model.kwargs.shortcut = 'conv'  # conv (option B) | pad (option A)
  if arg:
    default.apply_arg(c, arg)
  return c
