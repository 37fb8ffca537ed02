"""What each energy threshold would cut: per-layer ranks and trainable parameters of a run.

  python -m experiments.rank_energy --run=runs/c10 --energies=0.95,0.9,0.8,0.7

Reads the latest checkpoint of ``--run`` (at the ranks it has, after any reduction) and, for
every threshold τ, prints the rank :func:`lrdfa_jax.rank.choose_ranks` would give each
factored layer (the smallest keeping τ of ``Σ s²``, not below ``--floor``) and the trainable
parameters after the cut, as a markdown table: a look at a run's spectra before choosing
``rank.energy`` for a parameter budget. Nothing is written to the run.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from lrdfa_jax import metrics as metrics_lib, rank, train


def energy_table(params, energies, floor: int | float = 1) -> list[dict]:
  """One row per τ: the new rank of every factored layer (unchanged ones too) and the
  trainable parameters of ``params`` after the cut."""
  current = {p: l['s'].shape[0] for p, l in rank.svd_layers(params).items()}
  rows = [{'energy': None, 'ranks': {'/'.join(p): r for p, r in current.items()},
           'params': metrics_lib.param_count(params)}]
  for tau in energies:
    ranks = rank.choose_ranks(params, tau, floor)  # only the layers that change
    cut, _, _, _ = rank.reduce(params, None, ranks)
    rows.append({'energy': tau, 'params': metrics_lib.param_count(cut),
                 'ranks': {'/'.join(p): ranks.get(p, r) for p, r in current.items()}})
  return rows


def markdown(rows: list[dict]) -> str:
  names = list(rows[0]['ranks'])
  out = ['| energy τ | ' + ' | '.join(names) + ' | trainable params | × now |',
         '|---|' + '---:|' * (len(names) + 2)]
  for r in rows:
    label = 'now' if r['energy'] is None else f'{r["energy"]:g}'
    out.append(f'| {label} | ' + ' | '.join(str(r['ranks'][n]) for n in names) +
               f' | {r["params"]:,} | {r["params"] / rows[0]["params"]:.2f} |')
  return '\n'.join(out) + '\n'


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--run', required=True, help='a run directory with a checkpoint')
  p.add_argument('--energies', default='0.99,0.95,0.9,0.8,0.7,0.5',
                 help='comma separated energy thresholds in (0, 1]')
  p.add_argument('--floor', type=float, default=1.0,
                 help='rank.floor: an int rank, or a fraction of full rank')
  a = p.parse_args(argv)
  path = os.path.join(a.run, 'config.json')
  if not os.path.exists(path):
    p.error(f'{a.run} has no config.json: pass a run directory.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  state = train.restore_checkpoint(config, a.run)
  params = jax.device_get(state.params)
  if not rank.svd_layers(params):
    p.error(f'{a.run} has no factored layer (method {config.dfa.method}); rank reduction '
            'applies to svd_bp and ssa.')
  rows = energy_table(params, [float(e) for e in a.energies.split(',')], a.floor)
  print(f'{a.run}, step {int(state.step)}:\n')
  print(markdown(rows))
  spectra = {'/'.join(p): np.sort(np.abs(np.asarray(l['s'])))[::-1]
             for p, l in rank.svd_layers(params).items()}
  for name, s in spectra.items():
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    print(f'{name}: rank {len(s)}, s max {s[0]:.3g} min {s[-1]:.3g}, energy of the top '
          f'quarter {share[max(0, len(s) // 4 - 1)]:.2f}')


if __name__ == '__main__':
  main()
