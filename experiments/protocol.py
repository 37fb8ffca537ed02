"""The CIFAR-10 comparison protocol: every method on one pipeline, then the report.

  python -m experiments.protocol --rundir=runs/protocol --results=results/cifar10_small_conv
  (--results is experiments.report's flag; default here results/cifar10_small_conv)
  python -m experiments.protocol ... --only=bp,ssa --seeds=0,1,2 --epochs=10
  python -m experiments.protocol --model=resnet20 --only=bp,ssa ... (configs/zoo.py's run card)

Runs (skipping those already finished in ``--rundir``; interrupted ones resume): ``bp``,
``svd_bp``, ``ssa``, ``dfa``, ``ssa`` without alignment and ``ssa`` without orthogonality for
every seed; then the feedback-delivery ablation: ``ssa`` for every seed, and
``dfa`` and both ``ssa`` ablations for the first seed, with channel-broadcast
feedback instead of configs/cifar10.py's full feature maps. All share configs/cifar10.py
(augmentation, optimizer, schedule, batch size, epochs); only the method fields differ, and the learning
rate, which is each variant's choice in ``--tuning`` (experiments.tune, held-out slice; the
ablations use their base variant's) or the config's when it has none (printed). A finished
run is reused only if its config matches (else a clear error). Then every run is
exported to ``--results`` and the table and plots are rebuilt there (experiments.report). A
run that diverges is left out of the results; the others still run, and the command then exits
non-zero naming it.
"""
from __future__ import annotations

import os

from absl import app, flags

from experiments import report
from experiments.variants import (DATASETS, MODELS, VARIANTS, applies, check_variants,
                                 chosen_lr, config_for, run_or_diverge, tuned_model)

_RUNDIR = flags.DEFINE_string('rundir', 'runs/protocol', 'Where the runs live.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'],
                            'Seeds for the all-seed variants; the others run the first.')
_EPOCHS = flags.DEFINE_integer('epochs', 10, 'Epochs for every run.')
_ONLY = flags.DEFINE_list('only', None, 'Run only these variants (experiments/variants.py).')
_DATASET = flags.DEFINE_enum('dataset', 'cifar10', list(DATASETS),
                              'The dataset every run trains on (cifar100: the re-split copy).')
_MODEL = flags.DEFINE_enum('model', 'small_conv', list(MODELS),
                            'small_conv (configs/cifar10.py) or a zoo net (configs/zoo.py).')
_TUNING = flags.DEFINE_string('tuning', 'results/cifar10_small_conv/tuning.json',
                              'experiments.tune output with the learning rate per method.')

def main(argv):
  del argv
  results_dir = report.RESULTS.value or 'results/cifar10_small_conv'  # --results, shared flag
  seeds = [int(s) for s in _SEEDS.value]
  if tuned_model(_TUNING.value) not in (None, _MODEL.value):
    raise app.UsageError(f'{_TUNING.value} tunes {tuned_model(_TUNING.value)}, not '
                         f'{_MODEL.value}: pass that model\'s experiments.tune output.')
  try:
    check_variants(_ONLY.value or (), _MODEL.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  diverged = []  # the others still run and are reported
  for variant, (_, all_seeds) in VARIANTS.items():
    if _ONLY.value and variant not in _ONLY.value or not applies(variant, _MODEL.value):
      continue
    for seed in seeds if all_seeds else seeds[:1]:
      c = config_for(variant, seed, _EPOCHS.value, _DATASET.value, _MODEL.value)
      tuned = chosen_lr(_TUNING.value, variant)
      if tuned is None:
        print(f'{variant}: no held-out choice in {_TUNING.value}; the config\'s lr {c.opt.lr:g}')
      c.opt.lr = tuned or c.opt.lr
      workdir = os.path.join(_RUNDIR.value, f'{variant}_lr{c.opt.lr:g}_seed{seed}')
      s = run_or_diverge(workdir, c)
      if s is None:
        diverged.append(f'{variant} seed {seed}')
        continue
      print(f'{variant} seed {seed}: {s["final_test_accuracy"]:.2f}% in {s["wall_time_s"]:.0f} s')
      report.export_run(workdir, results_dir)
  results = report.load_results(results_dir) if os.path.isdir(results_dir) else []
  if results:
    with open(os.path.join(results_dir, 'report.md'), 'w') as f:
      f.write(report.table(results))
    report.plot(results, results_dir)
  if diverged:
    raise SystemExit(f'error: diverged (kept out of {results_dir}): {", ".join(diverged)}.')


if __name__ == '__main__':
  report.run_cli(main)
