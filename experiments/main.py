"""Entry point: ``python -m experiments.main --config=configs/cifar10.py [--workdir=DIR]``.

Flags only; the work is :func:`lrdfa_jax.train.train_and_evaluate`. Without ``--workdir``
nothing is written. Bad input (flags, config fields, data, a workdir holding another run)
exits non-zero with one line ``error: ...`` on stderr, never a traceback. Library INFO logs
(orbax, jax) are off; ``--verbosity=0`` turns them on.
"""
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lrdfa_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics); '
                               'rerun with the same one to resume. Unset: write nothing.')
_ALLOW_CHANGED = flags.DEFINE_bool(
    'allow_changed_config', False, 'Resume a workdir whose config.json differs from this '
    'config (e.g. more epochs); the model and optimizer must still match its checkpoint.')


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _chain(e: BaseException) -> list[BaseException]:
  out = [e]
  while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and len(out) < 20:
    out.append(nxt)
  return out


def flag_error(e: BaseException, argv: list[str]) -> str:
  """One line for a flag-parsing failure: an unknown config field, a bad value, a config
  file that fails to load."""
  chain = _chain(e)
  if isinstance(chain[-1], KeyError):  # ml_collections: an unknown field
    key = str(chain[-1].args[0]).strip("'\"") if chain[-1].args else '?'
    given = [a.split('=', 1)[0].lstrip('-') for a in argv if re.match(r'-{1,2}config\.', a)]
    field = next((g[len('config.'):] for g in given if re.search(rf'(^|\.){re.escape(key)}($|\.)',
                                                                 g[len('config.'):])), key)
    hint = next((m.group(1) for c in chain
                 if (m := re.search(r'Did you mean \\*"(\w+)\\*"', str(c)))), None)
    return (f'unknown config field {field!r}' + (f'; did you mean {hint!r}?' if hint else '.')
            + ' The fields and their meaning are in configs/default.py.')
  text = str(e)
  if 'Error whilst parsing config file' in text:  # the config file's own error
    config = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), 'config')
    return f'{config}: {str(chain[-1]).strip().splitlines()[0]}'
  return text.strip().splitlines()[0]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with every failure turned into one ``error:`` line."""
  for a in argv[1:]:
    if a.startswith('--config='):
      path = a.split('=', 1)[1].split(':', 1)[0]
      if not os.path.isfile(path):
        here = sorted(f for f in os.listdir('configs') if f.endswith('.py') and f[0] != '_') \
            if os.path.isdir('configs') else []
        _fail(f'no config file {path!r}' + (f'; the configs are in configs/: {", ".join(here)}.'
                                            if here else '; give the path of a configs/*.py.'))
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (absl's own errors and the config file's)
    _fail(flag_error(e, argv))


def main(argv):
  if not flags.FLAGS['verbosity'].present:  # library INFO logs off; --verbosity=0 shows them
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}; flags look like --name=value.')
  try:
    config = _CONFIG.value
  except Exception as e:  # noqa: BLE001 (a config file that fails when first read)
    _fail(flag_error(e, sys.argv))
  try:
    summary = train.train_and_evaluate(config, _WORKDIR.value,
                                       allow_changed_config=_ALLOW_CHANGED.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    _fail(str(e))
  acc = summary['final_test_accuracy']
  print(f"final test accuracy: {acc:.2f}% ({summary['method']}, {summary['model']}, "
        f"{summary['epochs']:.2f} epochs, {summary['wall_time_s']:.0f} s)")


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)
