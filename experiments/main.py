"""Entry point: ``python -m experiments.main --config=configs/cifar10.py [--workdir=DIR]``.

Flags only; the work is :func:`lrdfa_jax.train.train_and_evaluate`. Without ``--workdir``
nothing is written. Bad input exits non-zero with a one-line reason.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from lrdfa_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics); '
                               'rerun with the same one to resume. Unset: write nothing.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  acc = summary['final_test_accuracy']
  print(f"final test accuracy: {acc:.2f}% ({summary['method']}, {summary['model']}, "
        f"{summary['epochs']:.2f} epochs, {summary['wall_time_s']:.0f} s)")


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
