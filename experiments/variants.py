"""The protocol's method variants on configs/cifar10.py (shared by protocol.py and tune.py)."""
from __future__ import annotations

import json
import os

from absl import app

from configs import cifar10, zoo
from lrdfa_jax import train

# variant name -> (config overrides, all seeds?)
VARIANTS = {
    'bp': ({'dfa.method': 'bp'}, True),
    'ssa': ({'dfa.method': 'ssa'}, True),
    'svd_bp': ({'dfa.method': 'svd_bp'}, True),
    'dfa': ({'dfa.method': 'dfa'}, True),
    'ssa_noalign': ({'dfa.method': 'ssa', 'dfa.align': 'none'}, True),
    'ssa_noorth': ({'dfa.method': 'ssa', 'dfa.orth_weight': 0.0}, True),
    # the feedback delivery ablation: channel broadcast (the DESIGN default, used by
    # configs/default.py) instead of cifar10.py's full feature-map feedback
    'ssa_channel': ({'dfa.method': 'ssa', 'dfa.delivery': 'channel'}, True),
    'dfa_channel': ({'dfa.method': 'dfa', 'dfa.delivery': 'channel'}, False),
    'ssa_channel_noalign': ({'dfa.method': 'ssa', 'dfa.delivery': 'channel', 'dfa.align': 'none'},
                            False),
    'ssa_channel_noorth': ({'dfa.method': 'ssa', 'dfa.delivery': 'channel',
                            'dfa.orth_weight': 0.0}, False),
    # local error signals (lrdfa_jax.signals): each block's error from its fixed LLS-style
    # readout instead of the output error; "+sim" adds the similarity term at β = 0.99
    'ssa_local': ({'dfa.method': 'ssa', 'dfa.signal': 'local'}, True),
    'dfa_local': ({'dfa.method': 'dfa', 'dfa.signal': 'local'}, True),
    'ssa_local_sim': ({'dfa.method': 'ssa', 'dfa.signal': 'local', 'dfa.sim_weight': 0.99},
                      False),
    'ssa_mixed': ({'dfa.method': 'ssa', 'dfa.signal': 'mixed'}, False),
    # learned feedback: readouts trained on their own CE (Nøkland & Eidnes' "pred", at the
    # model's rate) and Direct Kolen-Pollack on the global error (Webster et al.'s recipe)
    'ssa_local_pred': ({'dfa.method': 'ssa', 'dfa.signal': 'local', 'dfa.learn_feedback': 'local',
                        'dfa.feedback_lr': 1e-3, 'dfa.feedback_lr_decay': 1.0}, False),
    'ssa_dkp': ({'dfa.method': 'ssa', 'dfa.learn_feedback': 'global'}, False),
    'dfa_dkp': ({'dfa.method': 'dfa', 'dfa.learn_feedback': 'global'}, False),
    # the LLS authors' SmallConv: BatchNorm after each conv, LeakyReLU
    'ssa_local_bn': ({'dfa.method': 'ssa', 'dfa.signal': 'local', 'model.act': 'leaky_relu',
                      'model.kwargs': {'norm': 'batch'}}, False),
    'bp_bn': ({'dfa.method': 'bp', 'model.act': 'leaky_relu', 'model.kwargs': {'norm': 'batch'}},
              False),
    'svd_bp_bn': ({'dfa.method': 'svd_bp', 'model.act': 'leaky_relu',
                   'model.kwargs': {'norm': 'batch'}}, False),
    # ... and the global-signal methods on it (the "every method"; the tanh net's dfa
    # and ssa are the baselines the local variants were measured against before)
    'dfa_bn': ({'dfa.method': 'dfa', 'model.act': 'leaky_relu', 'model.kwargs': {'norm': 'batch'}},
               False),
    'ssa_bn': ({'dfa.method': 'ssa', 'model.act': 'leaky_relu', 'model.kwargs': {'norm': 'batch'}},
               False),
    'ssa_local_pred_bn': ({'dfa.method': 'ssa', 'dfa.signal': 'local',
                           'dfa.learn_feedback': 'local', 'dfa.feedback_lr': 1e-3,
                           'dfa.feedback_lr_decay': 1.0, 'model.act': 'leaky_relu',
                           'model.kwargs': {'norm': 'batch'}}, False),
}
# the held-out probe's choice (results/cifar10_small_conv_local/tuning*.md): the learned
# readout reads a finer pool grid (g²c ≤ 2048, Nøkland & Eidnes' decoder width: conv1 8×8,
# conv2 and conv3 4×4) instead of LLS's ≤ 512; its lr is the base variant's held-out choice
WIDE_READOUT = 2048
VARIANTS['ssa_local_pred_wide_bn'] = ({**VARIANTS['ssa_local_pred_bn'][0],
                                       'dfa.readout_dim': WIDE_READOUT}, False)
# an auxiliary readout head per conv block (Belilovsky et al.'s DGL "MLP-SR": the pooled map
# through learned 1×1 ReLU layers of the block's width before the linear readout); the issue-12
# diagnosis found the last conv block's linear readout the costliest
READOUT_LAYERS = 2
VARIANTS['ssa_local_mlp_bn'] = ({**VARIANTS['ssa_local_pred_bn'][0],
                                 'dfa.readout_layers': READOUT_LAYERS}, False)
# ... and Nøkland & Eidnes' predsim on it: the learned readout plus the similarity term, β = 0.99
# (on the tanh net with a fixed readout, ssa_local_sim, the term cost 4.6 points)
VARIANTS['ssa_local_predsim_bn'] = ({**VARIANTS['ssa_local_pred_bn'][0], 'dfa.sim_weight': 0.99},
                                    False)
# the 10-epoch held-out probe's best (results/cifar10_small_conv_local/tuning_10ep_probes.md,
# +1.1 within noise): the readouts learn at the model's rate 3e-3 instead of 1e-3; 3 seeds decide
READOUT_LR = 3e-3
VARIANTS['ssa_local_pred_fblr_bn'] = ({**VARIANTS['ssa_local_pred_bn'][0],
                                       'dfa.feedback_lr': READOUT_LR}, False)
# rank reduction during training (lrdfa_jax.rank; issue 16): start at rank 1/2, cut after
# epochs 3 and 6 to the ranks holding REDUCE_ENERGY of each layer's Σ s², with and without
# Hoyer sparsity on s, against fixed ranks (1/4 is the plain ssa / svd_bp)
REDUCE_ENERGY = 0.5
HOYER_WEIGHT = 1.0
for _m in ('ssa', 'svd_bp'):
  VARIANTS[f'{_m}_r8'] = ({'dfa.method': _m, 'model.rank': 0.125}, False)
  VARIANTS[f'{_m}_reduce'] = ({'dfa.method': _m, 'model.rank': 0.5, 'rank.epochs': (3, 6),
                               'rank.energy': REDUCE_ENERGY}, False)
  VARIANTS[f'{_m}_reduce_hoyer'] = ({**VARIANTS[f'{_m}_reduce'][0],
                                     'dfa.hoyer_weight': HOYER_WEIGHT}, False)
# the held-out probe's choice (results/cifar10_small_conv_rank/hoyer_probe.md: 3 epochs at rank
# 1/2, Hoyer 0, 0.01, 0.1): Hoyer 0.1 costs no held-out accuracy and, for svd_bp, packs 90 % of
# Σ s² into 0.21× the parameters; cut after epochs 3 and 6 to τ = 0.9
PROBED_ENERGY = 0.9
PROBED_HOYER = 0.1
for _m in ('ssa', 'svd_bp'):
  VARIANTS[f'{_m}_reduce_h01'] = ({'dfa.method': _m, 'model.rank': 0.5, 'rank.epochs': (3, 6),
                                   'rank.energy': PROBED_ENERGY,
                                   'dfa.hoyer_weight': PROBED_HOYER}, False)
# the diagnosis of issue 12: one block of ssa_local_pred_bn learns by backprop (the gradient of
# the output loss through the whole net), the others by their local rule, for each block in turn
BP_BLOCKS = ('conv1', 'conv2', 'conv3', 'fc1')
for _b in BP_BLOCKS:
  VARIANTS[f'ssa_local_pred_bp_{_b}_bn'] = ({**VARIANTS['ssa_local_pred_bn'][0],
                                            'dfa.bp_blocks': (_b,)}, False)
# ... and every block by backprop: the ceiling of the diagnosis (svd_bp_bn with ssa's orthogonality;
# a bp block's update is the bare gradient, without the alignment term)
VARIANTS['ssa_local_pred_bp_all_bn'] = ({**VARIANTS['ssa_local_pred_bn'][0],
                                        'dfa.bp_blocks': BP_BLOCKS}, False)
# block-wise backprop (DGL, Belilovsky et al. 2020; the diagnosis found conv3's local rule the
# costliest): the blocks of a module backprop into each other and learn from the module's last
# readout (or the output loss), a cut between modules. K = 3: conv3 joins the classifier;
# K = 2: two modules of about equal depth; K = 2 cut after conv1: only the first (and largest-map)
# block learns from a readout, the other four backprop into each other from the output loss
MODULES = {'k3': 'conv3+fc1+head', 'k2': 'conv1+conv2,conv3+fc1+head',
           'k2_conv1': 'conv2+conv3+fc1+head'}
for _k, _m in MODULES.items():
  VARIANTS[f'ssa_local_pred_{_k}_bn'] = ({**VARIANTS['ssa_local_pred_bn'][0],
                                         'dfa.modules': _m}, False)
# ... K = 2 with the finer readout grid (the 10-epoch held-out probe at 6e-3: 80.62 against
# 79.70, results/cifar10_small_conv_local/tuning_10ep_k2_probes.md; the module's one readout,
# conv2's, reads 4×4×64 instead of 2×2×64)
VARIANTS['ssa_local_pred_k2_wide_bn'] = ({**VARIANTS['ssa_local_pred_k2_bn'][0],
                                         'dfa.readout_dim': WIDE_READOUT}, False)
# ... and on the zoo's ResNets one module per stage (the stem joins stage 1, the classifier stage
# 3): a local loss every 3 blocks (ResNet-20) instead of every block
STAGE_MODULES = 'conv1+stage1_*,stage2_*,stage3_*+head'
VARIANTS['ssa_local_pred_stages'] = ({**VARIANTS['ssa_local_pred'][0],
                                      'dfa.modules': STAGE_MODULES}, False)
# LoCo's overlap (Xiong et al. 2020, dfa.overlap): the gradient at each cut between modules
# also trains the last block of the module below (conv2; a stage's last residual block)
VARIANTS['ssa_local_pred_k2_wide_overlap_bn'] = ({**VARIANTS['ssa_local_pred_k2_wide_bn'][0],
                                                 'dfa.overlap': True}, False)
VARIANTS['ssa_local_pred_stages_overlap'] = ({**VARIANTS['ssa_local_pred_stages'][0],
                                              'dfa.overlap': True}, False)
# ... and the SmallConv's best on the ResNets: two modules (DGL's K = 2), the stem with stages 1
# and 2, then stage 3 with the classifier; the one readout (stage 2's end) on the finer grid, and
# LoCo's overlap at the cut
K2_STAGE_MODULES = 'conv1+stage1_*+stage2_*,stage3_*+head'
VARIANTS['ssa_local_pred_k2_stages_overlap'] = ({**VARIANTS['ssa_local_pred_stages'][0],
                                                'dfa.modules': K2_STAGE_MODULES,
                                                'dfa.readout_dim': WIDE_READOUT,
                                                'dfa.overlap': True}, False)
# ... at rank 1/2 (issue 17: on ResNet-20 / CIFAR-10 svd_bp's rank-1/4 factors cost backprop 3.6
# of the variant's 4.55 points): the factored layers keep half their full rank; lr: the base's
HALF_RANK = 0.5
for _v in ('ssa_local_pred_k2_stages_overlap', 'svd_bp'):
  VARIANTS[f'{_v}_r2'] = ({**VARIANTS[_v][0], 'model.rank': HALF_RANK}, False)
# ... with dense layers (dfa, no factors): the rule's cost without the rank's (issue 17)
VARIANTS['dfa_local_pred_k2_stages_overlap'] = (
    {**VARIANTS['ssa_local_pred_k2_stages_overlap'][0], 'dfa.method': 'dfa'}, False)
# variants whose fields name blocks of some models only -> those models (and the advice for others)
_STAGES = (('resnet20', 'resnet32', 'resnet56'),
           "one module per ResNet stage; on small_conv: 'ssa_local_pred_k2_bn'")
ONLY_ON = {'ssa_local_pred_stages': _STAGES, 'ssa_local_pred_stages_overlap': _STAGES,
           'ssa_local_pred_k2_stages_overlap': _STAGES,
           'ssa_local_pred_k2_stages_overlap_r2': _STAGES,
           'dfa_local_pred_k2_stages_overlap': _STAGES}
# an ablation's learning rate is its base variant's tuned one
BASE = {'ssa_noalign': 'ssa', 'ssa_noorth': 'ssa', 'bp_bn': 'bp', 'svd_bp_bn': 'svd_bp',
        'ssa_local_pred_wide_bn': 'ssa_local_pred_bn', 'ssa_local_mlp_bn': 'ssa_local_pred_bn',
        'ssa_local_predsim_bn': 'ssa_local_pred_bn', 'ssa_local_pred_fblr_bn': 'ssa_local_pred_bn',
        **{f'ssa_local_pred_bp_{b}_bn': 'ssa_local_pred_bn' for b in (*BP_BLOCKS, 'all')},
        **{f'ssa_local_pred_{k}_bn': 'ssa_local_pred_bn' for k in MODULES},
        'ssa_local_pred_k2_wide_bn': 'ssa_local_pred_k2_bn',
        'ssa_local_pred_stages': 'ssa_local_pred',
        'ssa_local_pred_k2_wide_overlap_bn': 'ssa_local_pred_k2_bn',
        'ssa_local_pred_stages_overlap': 'ssa_local_pred_stages',
        'ssa_local_pred_k2_stages_overlap': 'ssa_local_pred_stages',
        'ssa_local_pred_k2_stages_overlap_r2': 'ssa_local_pred_k2_stages_overlap',
        'svd_bp_r2': 'svd_bp',
        'dfa_local_pred_k2_stages_overlap': 'ssa_local_pred_k2_stages_overlap',
        'ssa_channel_noalign': 'ssa_channel', 'ssa_channel_noorth': 'ssa_channel',
        **{f'{m}_{v}': m for m in ('ssa', 'svd_bp') for v in ('r8', 'reduce', 'reduce_hoyer', 'reduce_h01')}}


DATASETS = ('cifar10', 'cifar100')
MODELS = ('small_conv', *zoo.CIFAR_MODELS)


def config_for(variant: str, seed: int, epochs: int, dataset: str = 'cifar10',
               model: str = 'small_conv'):
  """configs/cifar10.py with ``variant``'s fields, on ``dataset`` (CIFAR-100 (re-split) is the
  same pipeline with 100 classes: same augmentation, optimizer, schedule and model).

  Any other ``model`` starts from its zoo run card instead (``configs/zoo.py:MODEL,DATASET``:
  BN + ReLU, its own warmup); a variant that changes SmallConv's architecture (the ``_bn``
  ones) is refused there, since the zoo nets have BatchNorm already.
  """
  if dataset not in DATASETS:
    raise ValueError(f'dataset {dataset!r} is not one of {", ".join(DATASETS)}')
  if model not in MODELS:
    raise ValueError(f'model {model!r} is not one of {", ".join(MODELS)}')
  fields = VARIANTS[variant][0]
  models, why = ONLY_ON.get(variant, (MODELS, ''))
  if model not in models:
    raise ValueError(f'variant {variant!r} applies to {", ".join(models)}, not {model} ({why}).')
  if model == 'small_conv':
    c = cifar10.get_config()
    c.data.name = dataset
  else:
    arch = sorted(k for k in fields if k.startswith('model.') and k != 'model.rank')
    if arch:
      raise ValueError(f'variant {variant!r} sets {", ".join(arch)} of SmallConv; on {model} '
                       f'(BN + ReLU already) use a variant without them, e.g. '
                       f'{variant.removesuffix("_bn")!r}.')
    c = zoo.get_config(f'{model},{dataset}')
  for key, value in fields.items():
    section, field = key.split('.')
    c[section][field] = value
  c.train.seed = seed
  c.train.epochs = epochs
  c.train.progress_bar = False
  return c


def applies(variant: str, model: str) -> bool:
  """Whether :func:`config_for` builds ``variant`` on ``model`` (the ``_bn`` variants change
  SmallConv only; the per-stage modules need a CIFAR ResNet)."""
  try:
    config_for(variant, 0, 1, model=model)
  except ValueError:
    return False
  return True


def check_variants(names, model: str) -> None:
  """Raises ValueError (one line) unless every name is a variant that applies to ``model``."""
  for v in names:
    if v not in VARIANTS:
      raise ValueError(f'{v!r} is no variant of experiments/variants.py.')
    config_for(v, 0, 1, model=model)


def chosen_lr(path: str, variant: str) -> float | None:
  """The tuned learning rate for a protocol variant (an ablation uses its base variant's).

  None when ``path`` holds no choice for it: the caller keeps the config's rate.
  """
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    choice = json.load(f)['best']
  for key in (variant, BASE.get(variant)):
    if key in choice:
      return choice[key]['lr']
  return None


def tuned_model(path: str) -> str | None:
  """The model an experiments.tune output tuned (files from before the flag: small_conv);
  None when ``path`` does not exist."""
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get('model', 'small_conv')


def config_differences(have: dict, want: dict) -> list[str]:
  """``section.field`` where a finished run's config (``have``) differs from ``want``.

  As :func:`lrdfa_jax.train.config_changes`, but a run stopped early (``stop_after_steps``)
  or on other devices counts as another run; only what is logged or saved may differ.
  """
  return [f'{k}: {o!r} there, {n!r} now'
          for k, o, n in train.config_changes(have, want, ignore=train.MONITORING)]


def finished_summary(workdir: str, config) -> dict | None:
  """The summary of a finished run in ``workdir`` made with ``config``; None if there is none.

  Raises ValueError when the finished run was made with another config (say, under an older
  default), instead of reusing it under a name it no longer matches.
  """
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  diffs = config_differences(summary['config'], json.loads(config.to_json_best_effort()))
  if diffs:
    raise ValueError(f'{workdir} holds a finished run made with another config '
                     f'({"; ".join(diffs)}). Move it away or pass another --rundir.')
  return summary


def run_or_diverge(workdir: str, config) -> dict | None:
  """The summary of the run in ``workdir`` (reused if finished, else trained or resumed).

  A run that diverges gives None, with one line saying so, so that a grid or a protocol goes on
  to its next run. Bad input (a config the library refuses, missing data, a finished run made
  with another config) stops the command with one line (``app.UsageError``), not a traceback.
  """
  name = os.path.basename(os.path.normpath(workdir))
  try:
    return finished_summary(workdir, config) or train.train_and_evaluate(config, workdir)
  except train.DivergenceError as e:
    print(f'{name}: diverged: {e}')
    return None
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f'{name}: {e}') from None
