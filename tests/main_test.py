"""experiments.main: a quiet run that proves the install, and one-line errors for bad input."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_LOG = re.compile(r'^[IWEF]\d{4} ', re.M)  # an absl log line (I1202 04:15:18.69 ...)


def _run(tmp_path, *flags, devices=1, config='configs/cifar10.py:smoke', env=None, name='run'):
  workdir = tmp_path / name
  env = {**os.environ, 'XLA_FLAGS': xla_flags(devices),
         'JAX_PLATFORMS': 'cpu', **(env or {})}
  p = subprocess.run([sys.executable, '-m', 'experiments.main', f'--config={config}',
                      f'--workdir={workdir}', '--config.train.progress_bar=False', *flags],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  return p, workdir


def _one_line_error(p, reason):
  assert p.returncode != 0
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and reason in lines[0], p.stderr[-2000:]


@pytest.mark.parametrize('flags,devices,reason', [
    (['--config.dfa.method=backprop'], 1, "unknown dfa.method 'backprop'"),
    (['--config.model.name=vgg99'], 1, "unknown model.name 'vgg99'"),
    (['--config.model.rank=100'], 1, 'rank 100 is above full rank'),
    (['--config.train.batch_size=30'], 4, 'not divisible by the 4 devices'),
    (['--config.data.source=offline', '--config.data.data_dir=/nonexistent/data'], 1,
     'LRDFA_DATA_DIR'),
    (['--config.train.epocs=3'], 1, "unknown config field 'train.epocs'; did you mean 'epochs'?"),
    (['--config.opt.lr=-1'], 1, 'opt.lr=-1.0: the learning rate must be positive'),
    (['--config.train.epochs=0'], 1, 'train.epochs=0: give at least 1 epoch'),
    (['--config.train.batch_size=0'], 1, 'give a positive batch size'),
    (['--config.model.overrides=conv9:dense'], 1, "['conv9'] match no layer of small_conv"),
    (['--config.train.epochs=abc'], 1, '--config.train.epochs=abc'),
])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, flags, devices, reason):
  p, workdir = _run(tmp_path, *flags, devices=devices)
  _one_line_error(p, reason)
  assert not workdir.exists()


@pytest.mark.parametrize('config,reason', [
    ('configs/cifar11.py', "no config file 'configs/cifar11.py'; the configs are in configs/"),
    ('configs/cifar10.py:smok', "unknown config argument 'smok'; known: smoke."),
])
def test_bad_config_file_or_argument_fails_in_one_line(tmp_path, config, reason):
  p, workdir = _run(tmp_path, config=config)
  _one_line_error(p, reason)
  assert not workdir.exists()


def test_imagenet_without_data_in_the_default_tfds_dir_says_how_to_prepare_it(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  p, workdir = _run(tmp_path, config='configs/imagenet.py',
                    env={'TFDS_DATA_DIR': str(tmp_path / 'tfds')})
  _one_line_error(p, "tfds dataset 'imagenet2012' is not prepared")
  assert 'tfds build imagenet2012' in p.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('method', ['bp', 'ssa'])
def test_smoke_run_learns_quietly_and_writes(tmp_path, method):
  """The smoke run proves the install: it learns its synthetic task, and prints one line per
  eval and the result, no library logs."""
  p, workdir = _run(tmp_path, f'--config.dfa.method={method}')
  assert p.returncode == 0, p.stderr[-2000:]
  assert not ABSL_LOG.search(p.stderr + p.stdout), (p.stderr + p.stdout)[:2000]
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 7 and all(l.startswith('epoch ') for l in lines[:6]), p.stdout
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['final_test_accuracy'] >= 90.0, summary['final_test_accuracy']
  assert lines[-1].startswith(f"final test accuracy: {summary['final_test_accuracy']:.2f}%")
  assert (workdir / 'checkpoints').is_dir()
  # the same workdir with another config is refused in one line, and left as it was
  before = sorted((f, os.path.getmtime(os.path.join(r, f))) for r, _, fs in os.walk(workdir)
                  for f in fs)
  p2, _ = _run(tmp_path, '--config.dfa.method=svd_bp', '--config.opt.lr=0.01')
  _one_line_error(p2, f"holds a run with another config (dfa.method: '{method}' -> 'svd_bp'; "
                      'opt.lr: 0.001 -> 0.01); use a new --workdir')
  after = sorted((f, os.path.getmtime(os.path.join(r, f))) for r, _, fs in os.walk(workdir)
                 for f in fs)
  assert after == before


def test_verbosity_flag_turns_library_logs_back_on(tmp_path):
  p, _ = _run(tmp_path, '--verbosity=0', '--config.train.stop_after_steps=1')
  assert p.returncode == 0, p.stderr[-2000:]
  assert ABSL_LOG.search(p.stderr)
