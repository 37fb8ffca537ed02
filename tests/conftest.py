"""Test setup: 4 emulated CPU devices (for the sharding tests), set before JAX starts."""
import os

# The tests' programs are tiny, so XLA's LLVM optimisation at its default level is most of their
# time: at level 1 a tiny model's init compiles ~20x faster on this CPU (flax turned it down for
# its slowest tests too, google/flax#741). Not level 0 (also set by jax_disable_most_optimizations):
# there one fused dfa step (train_test's mixed signal with BatchNorm) computed NaN that level 1,
# the default and op-by-op execution do not. A level in the caller's XLA_FLAGS wins. The
# subprocesses and notebook kernels the tests start inherit XLA_FLAGS; training runs outside the
# tests keep XLA's default.
_FLAGS = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]  # set below, per process
if not any(f.startswith('--xla_backend_optimization_level') for f in _FLAGS):
  _FLAGS.append('--xla_backend_optimization_level=1')


def xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` for a process with ``devices`` emulated CPU devices and the tests' flags."""
  return ' '.join(_FLAGS + [f'--xla_force_host_platform_device_count={devices}'])


os.environ['XLA_FLAGS'] = xla_flags(4)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache per test session, shared with pytest-xdist's workers and the
# subprocesses the tests start: most tests compile the same tiny train step, and a cache hit
# skips XLA's compile (4x faster for a second identical tiny run). A fresh folder each session,
# removed at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix='lrdfa-jax-test-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

import pathlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lrdfa_jax import data  # noqa: E402


@pytest.fixture(scope='session')
def imagenet_jpegs(tmp_path_factory):
  """A tiny prepared ``imagenet2012`` of real JPEGs (tools/imagenet_fixture.py): 16 train
  images over 4 classes (a greyscale, a CMYK, a PNG-as-JPEG and a tiny one first) and 8
  validation images; returns its ``data_dir``."""
  pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('PIL')
  from tools import imagenet_fixture
  root = tmp_path_factory.mktemp('imagenet_jpegs')
  imagenet_fixture.build(str(root))
  return str(root)


def real_root():
  try:
    root = data.default_offline_root()
  except FileNotFoundError:
    return None
  return root if os.path.isfile(os.path.join(root, 'cifar10', 'meta.json')) else None


def snapshot(root):
  return {(p, p.stat().st_mtime_ns, p.stat().st_size) for p in pathlib.Path(root).rglob('*')}


@pytest.fixture(scope='session')
def cifar10(tmp_path_factory):
  root = real_root()
  if root is None:
    pytest.skip('real CIFAR-10 not found (../shared/data/cifar10 or $LRDFA_DATA_DIR/cifar10)')
  cache_dir = str(tmp_path_factory.mktemp('cache'))
  before = snapshot(root)
  start = time.perf_counter()
  ds = data.load_offline('cifar10', root, cache_dir=cache_dir)
  return dict(ds=ds, root=root, cache_dir=cache_dir, before=before,
              seconds=time.perf_counter() - start)


class FakeRecords:
  """Random-access records as a tfds source read without SkipDecoding gives them: arrays of
  varied sizes (record 3 greyscale), label = index; counts its reads."""

  def __init__(self, num):
    rng = np.random.default_rng(1)
    self.records = []
    for i in range(num):
      shape = (int(rng.integers(20, 48)), int(rng.integers(20, 48))) + (() if i == 3 else (3,))
      self.records.append({'image': rng.integers(0, 256, shape, dtype=np.uint8), 'label': i})
    self.reads = 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads += 1
    return self.records[i]
