"""ResNet-20 (CIFAR, 3 stages × 3 basic blocks, option-A shortcuts) on CIFAR-10, trained with SSA.

Base of the CIFAR ResNet configs (``resnet{20,32,56}_cifar{10,100}.py``).

Run card:
  command:  python -m experiments.main --config=configs/resnet20_cifar10.py --workdir=runs/r20_c10
  smoke:    python -m experiments.main --config=configs/resnet20_cifar10.py:smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa (bp/dfa: dense layers; svd_bp/ssa: factors
            at model.rank with model.overrides)
  ranks:    --config.model.rank=0.5 --config.model.overrides='conv1:dense,head:dense,stage3*:0.25'
  params:   269,722 dense (bp, dfa); 77,506 at rank 1/4, channel split (svd_bp, ssa)
            (python -m experiments.param_counts)
  time:     CPU step times (batch 128, 2-core machine) in the README's model-zoo section;
            an epoch is 390 steps.
  expected: not measured in this project yet. Published references (BioTorch, Adam):
            BP 89.99 %, DFA 67.84 % on CIFAR-10.
"""
import ml_collections

from configs import default


def get_config(arg: str = ''):
  # overrides example: 'stage3*:0.5', 'stage1_block0:dense'; kwargs: width = channel
  # multiplier (2.0: ResNet-20×2), shortcut = pad (option A) | conv (option B: 1×1 conv + BN)
  c = default.zoo_cifar('resnet20', width=1.0, shortcut='pad')
  if arg:
    default.apply_arg(c, arg)
  return c
