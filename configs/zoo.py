"""The model zoo as one run card: ``--config=configs/zoo.py:MODEL,DATASET[,smoke]``.

MODEL (CIFAR, 32×32): ``resnet20``, ``resnet32``, ``resnet56`` (3 stages of basic blocks,
option-A shortcuts), ``vgg13`` (VGG-13-BN, 10 convs, 512 → classes), ``mobilenet_v1``
(stride-1 stem, depthwise convs kept dense); (ImageNet, 224×224): ``resnet18``, ``resnet50``
(torchvision layout, 1×1 projection shortcuts). DATASET: ``cifar10``, ``cifar100``
(the offline copy, else tfds: see configs/cifar100.py), ``imagenet2012`` (tfds, streamed:
see configs/imagenet.py). ``smoke`` shrinks any of them to synthetic data of the same shape.

Run card:
  command:  python -m experiments.main --config=configs/zoo.py:resnet20,cifar10 --workdir=runs/r20_c10
            python -m experiments.main --config=configs/zoo.py:resnet18,imagenet2012 --config.data.data_dir=DIR
  smoke:    python -m experiments.main --config=configs/zoo.py:resnet20,cifar100,smoke
  method:   --config.dfa.method=bp|svd_bp|dfa|ssa (bp/dfa: dense layers; svd_bp/ssa: factors
            at model.rank with model.overrides, default rank 1/4 with conv1 and head dense)
  ranks:    --config.model.rank=0.5 --config.model.overrides='conv1:dense,head:dense,stage3*:0.25'
  kwargs:   --config.model.kwargs.width=2.0 (channel multiplier); resnets: shortcut = pad
            (option A) | conv (option B); vgg13: hidden = FC widths before the head;
            mobilenet_v1 and resnet18/50: stem = cifar | imagenet
  recipe:   CIFAR: ReLU + BN, Adam 1e-3, cosine after 500 warmup steps, batch 128, 100 epochs,
            crop + flip. ImageNet: configs/imagenet.py's (batch 256, 90 epochs).
  params:   python -m experiments.param_counts (the table in docs/zoo.md)
  expected: this card's 100 epochs not measured here. At 10 epochs (`python -m experiments.protocol
            --model=MODEL`, each method at its held-out rate, seed 0, 2-core CPU): ResNet-20 /
            CIFAR-10 bp 85.67 % (seeds 0-2: 85.70 ± 0.16), ssa 53.47 % (seeds 0-2:
            51.40 ± 2.13), dfa 55.78 %, the best local variant
            (ssa_local_pred_k2_stages_overlap_r2) 84.08 %; ResNet-32 / CIFAR-10
            bp 86.10 %, that variant 84.54 %, svd_bp 84.07 %, dfa 54.77 %, ssa 51.13 %, the
            same rule on dense layers (dfa_local_pred_k2_stages_overlap) 85.46 %. Every cell:
            results/zoo.md (`python -m experiments.zoo_table`).
            Published references (BioTorch, Adam): ResNet-20 / CIFAR-10 BP 89.99 %, DFA 67.84 %;
            ResNet-18 / ImageNet BP 69.61 %, DFA 17.55 % top-1. The SSA paper's earlier version
            reports VGG-13 within ~0.2 points of BP on CIFAR-10 (secondary source).
"""
import ml_collections

from configs import default, imagenet

# model -> constructor kwargs (models.build_model)
CIFAR_MODELS = {
    'resnet20': {'width': 1.0, 'shortcut': 'pad'},
    'resnet32': {'width': 1.0, 'shortcut': 'pad'},
    'resnet56': {'width': 1.0, 'shortcut': 'pad'},
    'vgg13': {'width': 1.0, 'hidden': ()},
    'mobilenet_v1': {'width': 1.0, 'stem': 'cifar'},
}
IMAGENET_MODELS = {
    'resnet18': {'width': 1.0, 'stem': 'imagenet', 'shortcut': 'conv'},
    'resnet50': {'width': 1.0, 'stem': 'imagenet', 'shortcut': 'conv'},
}
DATASETS = ('cifar10', 'cifar100', 'imagenet2012')
PAIRS = tuple([(m, d) for m in CIFAR_MODELS for d in ('cifar10', 'cifar100')]
              + [(m, 'imagenet2012') for m in IMAGENET_MODELS])


def get_config(arg: str = 'resnet20,cifar10') -> ml_collections.ConfigDict:
  parts = [a.strip() for a in arg.split(',') if a.strip()]
  if len(parts) < 2 or parts[0] not in {**CIFAR_MODELS, **IMAGENET_MODELS} or \
      parts[1] not in DATASETS:
    raise ValueError(f'configs/zoo.py takes MODEL,DATASET[,smoke], got {arg!r}; models: '
                     f'{", ".join([*CIFAR_MODELS, *IMAGENET_MODELS])}; datasets: '
                     f'{", ".join(DATASETS)}.')
  model, dataset, rest = parts[0], parts[1], ','.join(parts[2:])
  if (model, dataset) not in PAIRS:
    raise ValueError(f'{model} is built for '
                     f'{"imagenet2012" if model in IMAGENET_MODELS else "cifar10 or cifar100"}'
                     f' (its stem and input size), not {dataset}.')
  if dataset == 'imagenet2012':
    c = imagenet.get_config()
    c.model.name = model
    c.model.rank = 0.25
    c.model.kwargs = ml_collections.ConfigDict(IMAGENET_MODELS[model])
  else:
    c = default.zoo_cifar(model, **CIFAR_MODELS[model])
    c.data.name = dataset
  if rest:
    default.apply_arg(c, rest)
  return c
