"""Results table and plots from run directories or exported summaries.

Export finished runs (one JSON each, with accuracy, train and angle curves) and rebuild the report:
  python -m experiments.report --runs='runs/c10/*' --export=results/cifar10_small_conv
  python -m experiments.report --results=results/cifar10_small_conv
The second command writes ``report.md`` (mean ± std over seeds per variant) and
``accuracy.png`` / ``angles.png`` into the results folder, from the committed JSON alone
(and ``params.png``, final accuracy against trainable parameters, when a method ran at
several sizes: fixed ranks, or rank reduction during training).
The headline number is the final test accuracy, never the best epoch.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys

import numpy as np
from absl import app, flags

from configs import default
from lrdfa_jax.steps import FACTORED_METHODS
from lrdfa_jax.writers import read_jsonl

DEFAULT_RANK = default.get_config().model.rank  # left unmarked in labels
DEFAULT_READOUT = default.get_config().dfa.readout_dim  # LLS's 512, left unmarked
READOUT_LR = 1e-3  # the learned readouts' rate in experiments/variants.py, left unmarked
_RUNS = flags.DEFINE_string('runs', None, 'Glob of run directories to export.')
_EXPORT = flags.DEFINE_string('export', None, 'Folder to write one summary JSON per run into.')
RESULTS = flags.DEFINE_string('results', None, 'Folder of exported summaries to report on.')


def variant(summary: dict) -> str:
  """A short label: the method plus what differs from its defaults (for the ablation).

  Only the dfa fields are read (method, align, orth_weight, delivery, signal, readout_dim,
  readout_layers, sim_weight, recon_weight and recon_size, learn_feedback and its feedback_lr,
  bp_blocks, modules, overlap); runs that differ in model or training settings share a label, so keep
  such runs in separate result folders.
  Channel-broadcast feedback is marked because configs/cifar10.py delivers full maps. For
  the factored methods the rank is marked when it is not the default 1/4, with the rank
  reduction schedule (``rank.*``), the Hoyer weight and ``opt.factor_lr_scale`` when they are on.
  """
  d = summary['config']['dfa']
  label = summary['method']
  if label == 'ssa':
    if d['align'] == 'none' or not d['align_weight']:
      label += ' −align'
    elif d['align'] != 'subspace':
      label += f' ({d["align"]} align)'
    if not d['orth_weight']:
      label += ' −orth'
  signal = d.get('signal', 'global') if label.split()[0] in ('dfa', 'ssa') else 'global'
  if signal != 'global':  # the readout replaces the feedback: its delivery does not apply
    label += f' + {signal} error'
    if d.get('readout_dim', DEFAULT_READOUT) != DEFAULT_READOUT:
      label += f' (readout ≤ {d["readout_dim"]})'
    if d.get('readout_layers'):
      label += f' (readout MLP, {d["readout_layers"]} hidden)'
  elif d.get('delivery', 'channel') == 'channel' and label.split()[0] in ('dfa', 'ssa'):
    label += ' (channel-broadcast feedback)'  # configs/cifar10.py delivers full feature maps
  if d.get('sim_weight') and label.split()[0] in ('dfa', 'ssa'):
    label += ' + sim'
  if d.get('recon_weight') and label.split()[0] in ('dfa', 'ssa'):
    label += f' + reconstruction {d["recon_weight"]:g}'
    if d.get('recon_size'):
      label += f' (to {d["recon_size"]}×{d["recon_size"]})'
  learn = d.get('learn_feedback', 'none') if label.split()[0] in ('dfa', 'ssa') else 'none'
  if learn != 'none':
    label += ' + learned readout' if learn == 'local' else ' + DKP feedback'
    if learn == 'local' and d.get('feedback_lr', READOUT_LR) != READOUT_LR:
      label += f' (readout lr {d["feedback_lr"]:g})'
  if d.get('bp_blocks') and label.split()[0] in ('dfa', 'ssa'):
    label += f' (backprop on {", ".join(d["bp_blocks"])})'
  if d.get('modules') and label.split()[0] in ('dfa', 'ssa'):
    label += f' (modules {", ".join(m.strip() for m in d["modules"].split(",") if m.strip())})'
  if d.get('overlap') and label.split()[0] in ('dfa', 'ssa'):
    label += ' + overlap'
  m = summary['config'].get('model', {})
  if summary['method'] in FACTORED_METHODS:  # the rank: marked when not configs/default.py's 1/4
    reduce = summary['config'].get('rank', {})
    if reduce.get('epochs'):
      epochs = ', '.join(str(e) for e in reduce['epochs'])
      label += f' rank {m.get("rank")} reduced at epochs {epochs} (energy {reduce["energy"]:g})'
    elif m.get('rank') != DEFAULT_RANK:
      label += f' rank {m.get("rank")}'
    if d.get('hoyer_weight'):
      label += f' + Hoyer {d["hoyer_weight"]:g}'
    scale = summary['config'].get('opt', {}).get('factor_lr_scale', 1.0)
    if scale != 1.0:
      label += f' (factor lr ×{scale:g})'
  if (m.get('kwargs') or {}).get('norm') == 'batch':
    label += f' (BN, {m.get("act")})'
  return label


def file_stem(summary: dict) -> str:
  """The exported summary's file name (no extension): model, variant label and seed, in ASCII
  without glob characters (a module pattern's ``*`` reads ``all``)."""
  return (f"{summary['model']}_{summary['variant']}_seed{summary['seed']}"
          .replace(' + ', ' ').replace(',', '').replace('≤ ', 'max').replace(' ', '_')
          .replace('−', 'no-').replace('(', '').replace(')', '')
          .replace('*', 'all').replace('?', 'any').replace('[', '').replace(']', ''))


def by_step(recs: list[dict], key: str) -> dict[int, float]:
  """``step -> value`` of ``key`` in step order. A step logged twice (a run resumed from a
  checkpoint older than its last log) keeps its last record: the one the run went on from."""
  return dict(sorted({r['step']: r[key] for r in recs if key in r}.items()))


def train_curves(recs: list[dict], steps_per_epoch: float) -> dict[str, list]:
  """``train/accuracy`` and ``train/loss`` per epoch: the mean of the records logged in it
  (every ``train.log_every`` steps, one training batch each: train mode, augmented), at the
  epoch's last step. A test curve that falls while this one rises is a fall in evaluation
  (e.g. BatchNorm's running statistics), not in learning."""
  out = {}
  for key in ('train/accuracy', 'train/loss'):
    by_epoch = collections.defaultdict(list)
    for step, v in by_step(recs, key).items():
      if step > 0:
        by_epoch[int(np.ceil(step / steps_per_epoch - 1e-9))].append(v)
    if by_epoch:
      out[key] = [[round(e * steps_per_epoch), float(np.mean(v))]
                  for e, v in sorted(by_epoch.items())]
  return out


def export_run(run_dir: str, out_dir: str) -> str:
  """Writes ``summary.json`` of a run plus its curves to ``out_dir``; returns the path."""
  with open(os.path.join(run_dir, 'summary.json')) as f:
    summary = json.load(f)
  recs = read_jsonl(os.path.join(run_dir, 'metrics.jsonl'))
  keys = {k for r in recs for k in r
          if k.startswith(('test/accuracy', 'validation/accuracy', 'angle/'))}
  curves = {k: [[step, v] for step, v in by_step(recs, k).items()] for k in sorted(keys)}
  steps_per_epoch = summary['step'] / summary['epochs'] if summary['epochs'] else 1
  summary['curves'] = {'steps_per_epoch': steps_per_epoch, **curves,
                       **train_curves(recs, steps_per_epoch)}
  summary['variant'] = variant(summary)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, file_stem(summary) + '.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=1)
  return path


def summary_label(summary: dict) -> str:
  """The summary's recorded label (exported runs carry it), else :func:`variant` of it."""
  return summary.get('variant') or variant(summary)


def load_results(folder: str) -> list[dict]:
  out = []
  for p in sorted(glob.glob(os.path.join(folder, '*.json'))):
    with open(p) as f:
      s = json.load(f)
    if 'final_test_accuracy' in s:
      out.append(s)
  return out


def md_cell(text: str) -> str:
  """``text`` as a markdown table cell: a module pattern's ``*`` is no emphasis, ``|`` no
  column break."""
  return text.replace('\\', '\\\\').replace('*', r'\*').replace('|', r'\|')


def wall_time(runs: list[dict]) -> str:
  """The runs' mean wall time in s, as ``≥ t`` when one of them counts only from a resume
  (its time before was not logged: ``wall_time_since_step``)."""
  partial = any(s.get('wall_time_since_step') for s in runs)
  return ('≥ ' if partial else '') + f'{np.mean([s["wall_time_s"] for s in runs]):.0f}'


def table(results: list[dict]) -> str:
  """Markdown: one row per variant, mean ± std (sample std) of the final test accuracy."""
  groups = collections.defaultdict(list)
  for s in results:
    groups[summary_label(s)].append(s)
  rows = ['| variant | seeds | final test accuracy (%) | trainable params | lr | epochs | '
          'wall time / run (s) |', '|---|---|---|---|---|---|---|']
  order = sorted(groups, key=lambda v: -np.mean([s['final_test_accuracy'] for s in groups[v]]))
  for v in order:
    accs = np.array([s['final_test_accuracy'] for s in groups[v]])
    std = f' ± {accs.std(ddof=1):.2f}' if len(accs) > 1 else ''
    g = groups[v]
    lrs = sorted({s['config']['opt']['lr'] for s in g})
    sizes = sorted({s['trainable_params'] for s in g})  # reduced runs may end at other sizes
    size = f'{sizes[0]:,}' + (f'–{sizes[-1]:,}' if len(sizes) > 1 else '')
    rows.append(f'| {md_cell(v)} | {len(accs)} | {accs.mean():.2f}{std} | {size} | '
                f'{", ".join(f"{lr:g}" for lr in lrs)} | {g[0]["epochs"]:g} | '
                f'{wall_time(g)} |')
  machines = sorted({s['machine'] for s in results})
  return '\n'.join(rows) + f'\n\nMachine: {"; ".join(machines)}\n'


def plot(results: list[dict], folder: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  fig, ax = plt.subplots(figsize=(8.5, 4))
  colors = {}
  for s in results:
    c = s['curves']
    pts = np.array(c.get('test/accuracy', []))
    if not len(pts):
      continue
    v = summary_label(s)
    line, = ax.plot(pts[:, 0] / c['steps_per_epoch'], pts[:, 1], marker='o', ms=3,
                    ls='--' if 'channel-broadcast' in v else '-',
                    color=colors.get(v), label=None if v in colors else v)
    colors.setdefault(v, line.get_color())
  ax.set_xlabel('epoch'); ax.set_ylabel('test accuracy (%)'); ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  paths.append(os.path.join(folder, 'accuracy.png'))
  fig.tight_layout(); fig.savefig(paths[-1], dpi=120); plt.close(fig)

  local = [s for s in results if any(k.startswith('angle/') for k in s['curves'])]
  if local:
    shown = {}
    for s in local:
      shown.setdefault(summary_label(s), s)  # first seed of each variant
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
      ax.axis('off')
    for ax, (v, s) in zip(axes.flat, sorted(shown.items())):
      c = s['curves']
      for k in sorted(k for k in c if k.startswith('angle/')):
        pts = np.array(c[k])
        ax.plot(pts[:, 0] / c['steps_per_epoch'], pts[:, 1], label=k.split('/', 1)[1])
      ax.axhline(90, color='gray', lw=0.5)
      ax.set_title(v); ax.set_xlabel('epoch'); ax.set_ylabel('angle to BP gradient (deg)')
      ax.set_ylim(0, 180); ax.grid(alpha=0.3); ax.legend(fontsize=7)
    paths.append(os.path.join(folder, 'angles.png'))
    fig.tight_layout(); fig.savefig(paths[-1], dpi=120); plt.close(fig)

  if len({(s['method'], s['trainable_params']) for s in results}) > \
     len({s['method'] for s in results}):  # a method at several sizes: accuracy vs params
    fig, ax = plt.subplots(figsize=(8.5, 4))
    colors = {}
    for s in sorted(results, key=summary_label):
      v = summary_label(s)
      x, y = s['trainable_params'], s['final_test_accuracy']
      pts = ax.plot([x], [y], marker='o', ls='', color=colors.get(v),
                    label=None if v in colors else v)
      colors.setdefault(v, pts[0].get_color())
      if 'initial_trainable_params' in s:  # a reduced run: from its starting size
        ax.annotate('', (x, y), (s['initial_trainable_params'], y),
                    arrowprops=dict(arrowstyle='->', color=colors[v], alpha=0.5))
    ax.set_xscale('log'); ax.grid(alpha=0.3, which='both')
    ax.set_xlabel('trainable parameters at the end (arrow: from the start)')
    ax.set_ylabel('final test accuracy (%)')
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    paths.append(os.path.join(folder, 'params.png'))
    fig.tight_layout(); fig.savefig(paths[-1], dpi=120); plt.close(fig)
  return paths


def run_cli(main) -> None:
  """``app.run(main)`` for the experiments' commands, with bad input (``app.UsageError``) as one
  line ``error: ...`` on stderr and exit status 2, not absl's page of usage text."""
  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  app.run(guarded)


def main(argv):
  del argv
  if _RUNS.value:
    if not _EXPORT.value:
      raise app.UsageError('--runs needs --export=FOLDER.')
    for d in sorted(glob.glob(_RUNS.value)):
      if os.path.exists(os.path.join(d, 'summary.json')):
        print('exported', export_run(d, _EXPORT.value))
  folder = RESULTS.value or _EXPORT.value
  if folder:
    results = load_results(folder)
    if not results:
      raise app.UsageError(f'no run summaries in {folder}.')
    md = table(results)
    with open(os.path.join(folder, 'report.md'), 'w') as f:
      f.write(md)
    print(md)
    for p in plot(results, folder):
      print('wrote', p)


if __name__ == '__main__':
  run_cli(main)
