"""experiments.main: bad input exits non-zero with a one-line reason and writes nothing."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *flags, devices=1):
  workdir = tmp_path / 'run'
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'JAX_PLATFORMS': 'cpu'}
  p = subprocess.run([sys.executable, '-m', 'experiments.main',
                      '--config=configs/cifar10.py:smoke', f'--workdir={workdir}',
                      '--config.train.progress_bar=False', *flags],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  return p, workdir


@pytest.mark.parametrize('flags,devices,reason', [
    (['--config.dfa.method=backprop'], 1, "unknown dfa.method 'backprop'"),
    (['--config.model.name=vgg99'], 1, "unknown model.name 'vgg99'"),
    (['--config.model.rank=100'], 1, 'rank 100 is above full rank'),
    (['--config.train.batch_size=30'], 4, 'not divisible by the 4 devices'),
    (['--config.data.source=offline', '--config.data.data_dir=/nonexistent/data'], 1,
     'LRDFA_DATA_DIR'),
])
def test_bad_input_fails_cleanly(tmp_path, flags, devices, reason):
  p, workdir = _run(tmp_path, *flags, devices=devices)
  assert p.returncode != 0
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and reason in last, p.stderr[-2000:]
  assert 'Traceback' not in p.stderr
  assert not workdir.exists()


def test_smoke_run_trains_and_writes(tmp_path):
  p, workdir = _run(tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'final test accuracy' in p.stdout
  assert (workdir / 'summary.json').exists() and (workdir / 'checkpoints').is_dir()
