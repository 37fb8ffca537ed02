"""ResNet-50 (torchvision v1.5 layout: bottleneck blocks, stride on the 3×3 conv) on
ImageNet-2012, trained with SSA: `resnet18_imagenet.py` with the deeper model.

Run card:
  command:  python -m experiments.main --config=configs/resnet50_imagenet.py --config.data.data_dir=DIR
  smoke:    python -m experiments.main --config=configs/resnet50_imagenet.py:smoke
  params:   25,557,032 dense (bp, dfa); 9,264,392 at rank 1/4, channel split (svd_bp, ssa)
            (python -m experiments.param_counts)
  expected: not measured in this project.
"""
from configs import default, resnet18_imagenet


def get_config(arg: str = ''):
  c = resnet18_imagenet.get_config()
  c.model.name = 'resnet50'
  if arg:
    default.apply_arg(c, arg)
  return c
