"""Test setup: 4 emulated CPU devices (for the sharding tests), set before JAX starts."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache per test session, shared with the subprocesses the tests
# start: most tests compile the same tiny train step, and a cache hit skips XLA's compile
# (4x faster for a second identical tiny run). A fresh folder each session, removed at exit.
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

import pytest  # noqa: E402


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
