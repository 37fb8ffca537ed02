"""Per-layer update angle against final accuracy, over the runs of results folders.

Every local run logs, each ``train.angle_every`` steps, the angle between each layer's local
update and its backprop gradient on one batch (``angle/<layer>`` in its exported JSON). One
batch is noisy (±15° between measurements), so a run's angle for a layer is the mean of the
measurements in the last ``--tail`` share of training. This writes, per run, those angles next
to the final test accuracy, and per layer the Spearman rank correlation between angle and
accuracy across the runs (a negative ρ: runs whose updates point closer to backprop's end more
accurate), as markdown and a scatter plot:

  python -m experiments.angles --epochs=10 --out=results/angles_small_conv_local_10ep.md \\
      --folders=results/cifar10_small_conv_local,results/cifar10_small_conv_local_tuned

Variants differ in more than their angle (BN, readouts, feedback), so ρ across them says which
layer's angle moves with accuracy, not that the angle causes it; and the p-values treat the
seeds of one variant as independent runs, so they overstate the evidence.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from experiments import report


def layers_of(summary: dict) -> list[str]:
  """The layers with a logged angle, without BN companions (``conv1_bn``) or the head, whose
  update is exact in every local method."""
  names = [k.split('/', 1)[1] for k in summary['curves'] if k.startswith('angle/')]
  return [n for n in names if n != 'head' and not n.endswith('_bn')]


def run_angles(summary: dict, tail: float) -> dict[str, float]:
  """Mean angle (degrees) per layer over the measurements in the last `tail` of training."""
  c = summary['curves']
  start = (1.0 - tail) * summary['epochs'] * c['steps_per_epoch']
  out = {}
  for name in layers_of(summary):
    pts = np.asarray(c[f'angle/{name}'], dtype=float)
    kept = pts[pts[:, 0] >= start, 1] if tail >= 1 else pts[pts[:, 0] > start, 1]
    out[name] = float(kept.mean()) if kept.size else float('nan')
  return out


def collect(folders: list[str], epochs: float | None, tail: float) -> list[dict[str, Any]]:
  rows = []
  for folder in folders:
    for s in report.load_results(folder):
      if not layers_of(s) or (epochs is not None and abs(s['epochs'] - epochs) > 1e-6):
        continue
      rows.append({'variant': report.summary_label(s), 'seed': s['seed'],
                   'lr': s['config']['opt']['lr'], 'epochs': s['epochs'],
                   'accuracy': s['final_test_accuracy'], 'angles': run_angles(s, tail)})
  return rows


def correlations(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Per layer: Spearman ρ (and its p-value) of angle against accuracy, over the runs that
  have that layer's angle."""
  out = {}
  for name in sorted({n for r in rows for n in r['angles']}):
    pairs = [(r['angles'][name], r['accuracy']) for r in rows
             if np.isfinite(r['angles'].get(name, np.nan))]
    if len(pairs) < 3 or min(len(set(col)) for col in zip(*pairs)) < 2:
      continue  # too few runs, or the same angle (or accuracy) in each: no ranking
    rho, p = stats.spearmanr(*zip(*pairs))
    out[name] = {'rho': float(rho), 'p': float(p), 'n': len(pairs)}
  return out


def markdown(rows, corr, tail, command) -> str:
  names = list(corr)
  lines = [f'Angle between each layer\'s local update and its backprop gradient (degrees, mean '
           f'over the last {tail:.0%} of training), against final test accuracy.', '',
           f'`{command}`', '',
           '| layer | Spearman ρ (angle vs accuracy) | p | runs |', '|---|---|---|---|']
  lines += [f'| {n} | {corr[n]["rho"]:+.2f} | {corr[n]["p"]:.3f} | {corr[n]["n"]} |'
            for n in names]
  lines += ['', '| variant | lr | seed | epochs | accuracy % | ' + ' | '.join(names) + ' |',
            '|---|---|---|---|---|' + '---|' * len(names)]
  for r in sorted(rows, key=lambda r: (-r['accuracy'], r['variant'])):
    cells = [f'{r["angles"][n]:.0f}' if n in r['angles'] else '–' for n in names]
    lines.append(f'| {report.md_cell(r["variant"])} | {r["lr"]:g} | {r["seed"]} | '
                 f'{r["epochs"]:.0f} | {r["accuracy"]:.2f} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(rows, corr, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = list(corr)
  fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
  for ax, n in zip(axes.flat, names):
    pts = np.array([(r['angles'][n], r['accuracy']) for r in rows if n in r['angles']])
    ax.scatter(pts[:, 0], pts[:, 1], s=14)
    ax.set_title(f'{n} (ρ = {corr[n]["rho"]:+.2f})'); ax.set_xlabel('angle to BP (deg)')
    ax.grid(alpha=0.3)
  axes.flat[0].set_ylabel('final test accuracy (%)')
  fig.tight_layout(); fig.savefig(path, dpi=120); plt.close(fig)


def write_report(folders: list[str], *, epochs: float | None = None, tail: float = 0.5,
                 out: str | None = None) -> str:
  """The markdown (and, with `out`, the file and its plot) for the runs in `folders`; a
  ValueError with a one-line message for bad input."""
  if not folders:
    raise ValueError('--folders=FOLDER[,FOLDER...] is required.')
  if not 0 < tail <= 1:
    raise ValueError(f'--tail must be in (0, 1]; got {tail}.')
  for f in folders:
    if not os.path.isdir(f):
      raise ValueError(f'{f} is not a results folder (python -m experiments.report --export).')
  rows = collect(folders, epochs, tail)
  corr = correlations(rows)
  if not corr:
    raise ValueError('fewer than 3 local runs with angles in those folders (and --epochs).')
  command = 'python -m experiments.angles ' + ' '.join(
      f'--{k}={v}' for k, v in (('folders', ','.join(folders)), ('epochs', epochs),
                                ('tail', tail), ('out', out)) if v is not None)
  md = markdown(rows, corr, tail, command)
  if out:
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out, 'w') as f:
      f.write(md)
    plot(rows, corr, os.path.splitext(out)[0] + '.png')
  return md


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(prog='python -m experiments.angles',
                              description=__doc__.split('\n')[0])
  p.add_argument('--folders', default='', help='comma-separated folders of exported summaries')
  p.add_argument('--epochs', type=float, help='only runs of this many epochs (default: all)')
  p.add_argument('--tail', type=float, default=0.5,
                 help='share of training, at its end, whose angles are averaged')
  p.add_argument('--out', help='markdown path; the plot goes next to it (.png)')
  args = p.parse_args(argv)
  try:
    md = write_report([f for f in args.folders.split(',') if f], epochs=args.epochs,
                      tail=args.tail, out=args.out)
  except ValueError as e:
    p.error(str(e))
  print(md)
  return md


if __name__ == '__main__':
  main()
