"""The protocol's method variants on configs/cifar10.py (shared by protocol.py and tune.py)."""
from __future__ import annotations

from configs import cifar10

# variant name -> (config overrides, all seeds?)
VARIANTS = {
    'bp': ({'dfa.method': 'bp'}, True),
    'ssa': ({'dfa.method': 'ssa'}, True),
    'svd_bp': ({'dfa.method': 'svd_bp'}, False),
    'dfa': ({'dfa.method': 'dfa'}, False),
    'ssa_noalign': ({'dfa.method': 'ssa', 'dfa.align': 'none'}, False),
    'ssa_noorth': ({'dfa.method': 'ssa', 'dfa.orth_weight': 0.0}, False),
}


def config_for(variant: str, seed: int, epochs: int):
  c = cifar10.get_config()
  for key, value in VARIANTS[variant][0].items():
    section, field = key.split('.')
    c[section][field] = value
  c.train.seed = seed
  c.train.epochs = epochs
  c.train.progress_bar = False
  return c
