"""The protocol's method variants on configs/cifar10.py (shared by protocol.py and tune.py)."""
from __future__ import annotations

import json
import os

from configs import cifar10

# variant name -> (config overrides, all seeds?)
VARIANTS = {
    'bp': ({'dfa.method': 'bp'}, True),
    'ssa': ({'dfa.method': 'ssa'}, True),
    'svd_bp': ({'dfa.method': 'svd_bp'}, False),
    'dfa': ({'dfa.method': 'dfa'}, False),
    'ssa_noalign': ({'dfa.method': 'ssa', 'dfa.align': 'none'}, False),
    'ssa_noorth': ({'dfa.method': 'ssa', 'dfa.orth_weight': 0.0}, False),
    # the feedback delivery ablation: channel broadcast (the DESIGN default, used by
    # configs/default.py) instead of cifar10.py's full feature-map feedback
    'ssa_channel': ({'dfa.method': 'ssa', 'dfa.delivery': 'channel'}, True),
    'dfa_channel': ({'dfa.method': 'dfa', 'dfa.delivery': 'channel'}, False),
    'ssa_channel_noalign': ({'dfa.method': 'ssa', 'dfa.delivery': 'channel', 'dfa.align': 'none'},
                            False),
    'ssa_channel_noorth': ({'dfa.method': 'ssa', 'dfa.delivery': 'channel',
                            'dfa.orth_weight': 0.0}, False),
}
# an ablation's learning rate is its base variant's tuned one
BASE = {'ssa_noalign': 'ssa', 'ssa_noorth': 'ssa',
        'ssa_channel_noalign': 'ssa_channel', 'ssa_channel_noorth': 'ssa_channel'}


def config_for(variant: str, seed: int, epochs: int):
  c = cifar10.get_config()
  for key, value in VARIANTS[variant][0].items():
    section, field = key.split('.')
    c[section][field] = value
  c.train.seed = seed
  c.train.epochs = epochs
  c.train.progress_bar = False
  return c


def chosen_lr(path: str, variant: str) -> float | None:
  """The tuned learning rate for a protocol variant (ablations use their base method's)."""
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    choice = json.load(f)['best']
  method = VARIANTS[variant][0]['dfa.method'] if variant in VARIANTS else None
  for key in (variant, BASE.get(variant), method):
    if key in choice:
      return choice[key]['lr']
  return None
