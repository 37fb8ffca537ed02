"""Learning-rate tuning and probes on a held-out slice of the CIFAR-10 training set.

  python -m experiments.tune --variants=bp,svd_bp,dfa,ssa --lrs=3e-4,1e-3,3e-3
  python -m experiments.tune --model=resnet20 --variants=bp,ssa --lrs=1e-3,3e-3 --out=...
  python -m experiments.tune --variants=ssa --lrs=1e-3 --set=model.rank=0.5 --tag=rank0.5

Every run is configs/cifar10.py (``--model``: the zoo run card) with the variant's fields
(experiments/variants.py),
``--set`` overrides, ``data.validation_size`` images held out of the training set (a fixed
split), ``--epochs`` epochs and seed 0. The score is the final accuracy on the held-out slice;
the test set is evaluated too (it is in every run's summary) but never used for a choice.
Every variant gets the same grid and epochs, so the same budget. Results merge into ``--out``
(JSON), which records every run and the best learning rate per (variant, tag);
experiments.protocol reads the choice from there. A rate that diverges is recorded as
``diverged`` (never chosen) and the grid goes on; a config the library refuses stops it with one
line. ``--skip_done`` keeps a (variant, rate, probe) cell that ``--out`` already holds for the
same ``--set``, epochs and held-out size instead of training it again (for a queue that is
rerun after its run directories were lost; a run directory that still has the finished run is
reused anyway).
"""
from __future__ import annotations

import ast
import json
import os

from absl import app, flags

from experiments import report
from experiments.variants import DATASETS, MODELS, check_variants, config_for, run_or_diverge

_RUNDIR = flags.DEFINE_string('rundir', 'runs/tune', 'Where the runs live.')
_VARIANTS = flags.DEFINE_list('variants', ['bp', 'svd_bp', 'dfa', 'ssa'],
                              'Variants of experiments/variants.py.')
_LRS = flags.DEFINE_list('lrs', ['3e-4', '1e-3', '3e-3'], 'Learning-rate grid.')
_EPOCHS = flags.DEFINE_integer('epochs', 3, 'Epochs per run.')
_VAL = flags.DEFINE_integer('validation_size', 5000, 'Images held out of the training set.')
_SET = flags.DEFINE_list('set', [], 'Extra overrides, section.field=value.')
_TAG = flags.DEFINE_string('tag', '', 'Names the --set probe in run dirs and the JSON.')
_DATASET = flags.DEFINE_enum('dataset', 'cifar10', list(DATASETS),
                              'The dataset every run trains on (cifar100: the re-split copy).')
_MODEL = flags.DEFINE_enum('model', 'small_conv', list(MODELS),
                            'small_conv (configs/cifar10.py) or a zoo net (configs/zoo.py).')
_OUT = flags.DEFINE_string('out', 'results/cifar10_small_conv/tuning.json', 'Results JSON.')
_SKIP_DONE = flags.DEFINE_bool('skip_done', False,
                               'Keep the cells --out already holds (same --set, epochs and '
                               'held-out size) instead of training them again.')


def parse_set(items: list[str]) -> dict[str, object]:
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or key.count('.') != 1:
      raise ValueError(f'--set {item!r}: expected section.field=value.')
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def run_name(variant: str, lr: float, tag: str) -> str:
  return f'{variant}{"_" + tag if tag else ""}_lr{lr:g}'


# a run that diverged: recorded, never chosen
DIVERGED = {'diverged': True, 'validation_accuracy': None, 'test_accuracy': None,
            'wall_time_s': None}


def best(runs: list[dict]) -> dict[str, dict]:
  """(variant, tag) -> the run with the highest final validation accuracy (diverged runs
  are never chosen)."""
  out: dict[str, dict] = {}
  for r in runs:
    if r.get('diverged'):
      continue
    key = r['variant'] + (f'/{r["tag"]}' if r['tag'] else '')
    if key not in out or r['validation_accuracy'] > out[key]['validation_accuracy']:
      out[key] = r
  return {k: {'lr': v['lr'], 'validation_accuracy': v['validation_accuracy']}
          for k, v in sorted(out.items())}


def recorded(doc: dict, name: str, overrides: dict, *, epochs: int,
             validation_size: int) -> dict | None:
  """The run of `doc` (a tuning file, as :func:`load` reads it: every record with its own
  epochs and held-out size) named `name` with these overrides, epochs and held-out size, or
  None."""
  for r in doc.get('runs', []):
    if (r['name'] == name and r.get('set', {}) == overrides and r.get('epochs') == epochs
        and r.get('validation_size') == validation_size):
      return r
  return None


def markdown(doc: dict) -> str:
  model, dataset = doc.get('model', 'small_conv'), doc.get('dataset', 'cifar10')

  def per_run(key):  # one value, or each value the runs have ("or": see each run in the JSON)
    values = sorted({r.get(key, doc[key]) for r in doc['runs']} or {doc[key]})
    return ' or '.join(map(str, values))
  lines = [f'Held-out tuning of {model} on {dataset}: {per_run("validation_size")} training '
           f'images held out, '
           f'{per_run("epochs")} epochs per run, seed 0 (`python -m experiments.tune`).', '',
           '| variant | probe | lr | held-out acc % | test acc % | wall s |',
           '|---|---|---|---|---|---|']
  for r in sorted(doc['runs'], key=lambda r: (r['variant'], r['tag'], r['lr'])):
    scores = ('diverged | – | –' if r.get('diverged') else
              f'{r["validation_accuracy"]:.2f} | {r["test_accuracy"]:.2f} | '
              f'{r["wall_time_s"]:.0f}')
    lines.append(f'| {r["variant"]} | {r["tag"] or "–"} | {r["lr"]:g} | {scores} |')
  lines += ['', '| variant/probe | chosen lr | held-out acc % |', '|---|---|---|']
  lines += [f'| {k} | {v["lr"]:g} | {v["validation_accuracy"]:.2f} |'
            for k, v in doc['best'].items()]
  return '\n'.join(lines) + '\n'


def load(path, *, dataset, model):
  """The tuning file at `path` (empty if new); refuses one that holds another dataset's or model's
  runs. Files from before those keys hold CIFAR-10 SmallConv runs."""
  if not os.path.exists(path):
    return {'runs': []}
  with open(path) as f:
    doc = json.load(f)
  for key, default, want in (('dataset', 'cifar10', dataset), ('model', 'small_conv', model)):
    if doc.get(key, default) != want:
      raise app.UsageError(f'{path} holds {doc.get(key, default)} runs; pass another '
                           f'--out for {want}.')
  for r in doc['runs']:  # records from before per-run epochs: the file's, kept with the record
    for key in ('epochs', 'validation_size'):
      if key not in r and key in doc:
        r[key] = doc[key]
  return doc


def main(argv):
  del argv
  overrides = parse_set(_SET.value)
  if overrides and not _TAG.value:
    raise app.UsageError('--set needs a --tag to name the probe.')
  try:
    check_variants(_VARIANTS.value, _MODEL.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  doc = load(_OUT.value, dataset=_DATASET.value, model=_MODEL.value)
  held = set()
  if _SKIP_DONE.value:
    held = {r['name'] for r in doc['runs'] if recorded(
        doc, r['name'], overrides, epochs=_EPOCHS.value, validation_size=_VAL.value)}
  doc.update(epochs=_EPOCHS.value, validation_size=_VAL.value, dataset=_DATASET.value,
             model=_MODEL.value)
  for variant in _VARIANTS.value:
    for lr in (float(x) for x in _LRS.value):
      c = config_for(variant, seed=0, epochs=_EPOCHS.value, dataset=_DATASET.value,
                     model=_MODEL.value)
      c.opt.lr = lr
      c.data.validation_size = _VAL.value
      for key, value in overrides.items():
        section, field = key.split('.')
        c[section][field] = value
      name = run_name(variant, lr, _TAG.value)
      if name in held:
        print(f'{name}: kept from {_OUT.value} (--skip_done)')
        continue
      workdir = os.path.join(_RUNDIR.value, name)
      s = run_or_diverge(workdir, c)
      if s is not None:
        print(f'{name}: held-out {s["final_validation_accuracy"]:.2f}%')
      if os.path.exists(_OUT.value):  # merge with runs other invocations wrote meanwhile
        doc['runs'] = load(_OUT.value, dataset=_DATASET.value, model=_MODEL.value)['runs']
      runs = doc['runs']
      runs = [r for r in runs if r['name'] != name] + [{
          'name': name, 'variant': variant, 'tag': _TAG.value, 'lr': lr, 'set': overrides,
          'epochs': _EPOCHS.value, 'validation_size': _VAL.value,
          **(DIVERGED if s is None else {
              'validation_accuracy': s['final_validation_accuracy'],
              'test_accuracy': s['final_test_accuracy'], 'wall_time_s': s['wall_time_s'],
              'machine': s['machine']})}]
      doc['runs'] = runs
      doc['best'] = best(runs)
      os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
      with open(_OUT.value, 'w') as f:
        json.dump(doc, f, indent=2)
      with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
        f.write(markdown(doc))


if __name__ == '__main__':
  report.run_cli(main)
