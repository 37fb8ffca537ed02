"""Two processes joined by jax.distributed (2 emulated CPU devices each, loopback only) train,
checkpoint through orbax from both, resume, and end where one process with 4 devices ends."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from lrdfa_jax import train
from tests import distributed_worker
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir: str, stop: int, epochs: int = 2, slow_setup_s: int = 0,
           **fields) -> list[subprocess.Popen]:
  """The two processes; ``fields`` replace the worker's config's ``train`` fields (the
  scheduler is 'default' unless given: 'auto' compiles each program twice)."""
  fields = {'xla_scheduler': 'default', **fields}
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': xla_flags(2), 'PYTHONUNBUFFERED': '1',
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'LRDFA_TEST_SLOW_SETUP_S': str(slow_setup_s)}  # process 1 loads its data this late
  # one compilation cache per process id, which a resume of the same workdir reuses (one cache
  # for both processes could clash: two processes writing one entry at once)
  return [subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'distributed_worker.py'),
                            str(pid), str(port), workdir, str(stop), str(epochs),
                            *(f'{k}={v}' for k, v in fields.items())], cwd=ROOT,
                           env={**env, 'JAX_COMPILATION_CACHE_DIR': f'{workdir}-cache{pid}'},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for pid in (0, 1)]


def _two_processes(workdir: str, stop: int, **kw) -> list[str]:
  procs = _start(workdir, stop, **kw)
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=300)
      outs.append(out)
  finally:
    for p in procs:  # both always end
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_processes_train_checkpoint_resume_like_one_process_with_four_devices(tmp_path):
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  # stop mid-epoch, checkpoint at step 5; under the 'auto' scheduler, whose choice process 0
  # makes for both (no angle step here: its two programs would compile twice each too)
  first = _two_processes(two, stop=5, xla_scheduler='auto', angle_every=0)
  for pid, out in enumerate(first):
    assert f'process {pid} of 2, 4 devices: step 5 ' in out, out[-2000:]
  assert train.restore_checkpoint(distributed_worker.config(), two).step == 5
  # resume to the end (16 steps), process 1 setting up 35 s after process 0: beyond the 30 s
  # gloo gives a process to join a collective, so the processes must meet at a barrier first
  # (train.wait_for_all_processes; a loaded CI host once skewed them that much)
  rest = _two_processes(two, stop=0, slow_setup_s=35)
  assert all('2, 4 devices: step 16 ' in o for o in rest)
  assert sorted(os.listdir(os.path.join(two, 'checkpoints'))) == ['16', '8']
  # the files are written once, by process 0
  rows = [json.loads(l) for l in open(os.path.join(two, 'metrics.jsonl'))]
  pairs = [(r['step'], k) for r in rows for k in r if k != 'step']
  assert len(pairs) == len(set(pairs))

  assert jax.device_count() == 4
  single = train.train_and_evaluate(
      distributed_worker.config(num_devices=4, xla_scheduler='default'), one)
  summary = json.load(open(os.path.join(two, 'summary.json')))
  assert summary['step'] == single['step'] == 16
  assert summary['final_test_accuracy'] == single['final_test_accuracy']
  np.testing.assert_allclose(summary['final_test_loss'], single['final_test_loss'], rtol=1e-4)
  sa = train.restore_checkpoint(distributed_worker.config(), two)
  sb = train.restore_checkpoint(distributed_worker.config(), one)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               (sa.params, sa.opt_state), (sb.params, sb.opt_state))


def test_a_killed_process_makes_the_other_fail_fast(tmp_path):
  procs = _start(str(tmp_path / 'run'), stop=0, epochs=1000, angle_every=0)
  try:
    for line in procs[0].stdout:  # wait until the run is training (its first eval)
      if line.startswith('epoch 1.00'):
        break
    assert procs[0].poll() is None and procs[1].poll() is None
    procs[1].kill()
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=120)  # heartbeat_s=20: not the 1000 epochs
    assert procs[0].returncode != 0
    assert time.time() - t0 < 90
    assert 'another task died' in out, out[-2000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
