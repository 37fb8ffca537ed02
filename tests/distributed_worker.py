"""One process of the two-process test (tests/distributed_test.py); not collected by pytest.

``python tests/distributed_worker.py PROCESS_ID PORT WORKDIR STOP_AFTER_STEPS EPOCHS
[TRAIN_FIELD=VALUE ...]``: 2 emulated CPU devices, joined to the other process through a
coordinator at 127.0.0.1:PORT; the ``train`` fields given (``xla_scheduler=auto``,
``angle_every=0``) replace the config's.
"""
import os
import sys
import time


def config(stop_after_steps: int = 0, epochs: int = 2, **train):
  from configs import default
  c = default.get_config()
  c.data.source = 'synthetic'
  c.data.synthetic.update(num_train=256, num_test=64, image_shape=(8, 8, 3), num_classes=4,
                          cell=4)
  c.data.augment = False
  c.model.kwargs.widths = (4, 8, 8)
  c.model.kwargs.hidden = 16
  c.model.rank = 0.5
  c.model.overrides = ''
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 0
  c.train.update(**{**dict(epochs=epochs, batch_size=32, log_every=2, angle_every=3,
                           progress_bar=False, stop_after_steps=stop_after_steps), **train})
  return c


if __name__ == '__main__':
  pid, port, workdir, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
  flags = os.environ.get('XLA_FLAGS', '')  # the test's (tests/conftest.py), or none
  if 'device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count=2'.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from lrdfa_jax import build, train
  delay = int(os.environ.get('LRDFA_TEST_SLOW_SETUP_S', '0')) if pid == 1 else 0
  if delay:  # a process that sets up late (a busy host)
    load_data = build.load_data
    build.load_data = lambda c: (time.sleep(delay), load_data(c))[1]
  epochs = int(sys.argv[5])
  fields = dict(a.split('=', 1) for a in sys.argv[6:])
  fields = {k: int(v) if v.isdigit() else v for k, v in fields.items()}
  c = config(stop, epochs, **fields, distributed=True, coordinator_address=f'127.0.0.1:{port}',
             num_processes=2, process_id=pid, timeout_s=120, heartbeat_s=20 if epochs > 2 else 100)
  s = train.train_and_evaluate(c, workdir)
  import jax
  print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices: "
        f"step {s['step']} accuracy {s['final_test_accuracy']:.4f}", flush=True)
