"""Sources: offline CIFAR + cache and checksums, tfds (mocked, real JPEGs), synthetic, load."""
import hashlib
import json
import lzma
import os
import pathlib
import time

import numpy as np
import pytest

from lrdfa_jax import data
from lrdfa_jax.data import sources
from tests.conftest import snapshot

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _sha(array):
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- real CIFAR-10


def test_real_cifar10_arrays_and_checksums(cifar10):
  ds, root = cifar10['ds'], cifar10['root']
  meta = json.load(open(os.path.join(root, 'cifar10', 'meta.json')))
  for split, num in (('train', 50_000), ('test', 10_000)):
    images, labels = ds[split]
    assert images.shape == (num, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (num,) and labels.dtype == np.int32
    assert _sha(images) == meta['files'][f'{split}_images']['sha256_decoded']
    assert _sha(labels.astype(np.uint8)) == meta['files'][f'{split}_labels']['sha256_decoded']
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [num // 10] * 10)
  mean = ds['train'][0].reshape(-1, 3).mean(0) / 255
  np.testing.assert_allclose(mean, data.DATASETS['cifar10']['mean'], atol=1e-3)


def test_real_cifar10_second_load_hits_cache(cifar10, monkeypatch):
  cache = pathlib.Path(cifar10['cache_dir'])
  names = sorted(p.name.split('-')[0] for p in cache.rglob('*.npy'))
  assert names == ['test_images', 'test_labels', 'train_images', 'train_labels']

  def no_decode(*args, **kwargs):
    raise AssertionError('decoded again instead of reading the cache')

  monkeypatch.setattr(sources, '_decode_file', no_decode)
  start = time.perf_counter()
  again = data.load_offline('cifar10', cifar10['root'], cache_dir=cifar10['cache_dir'])
  assert time.perf_counter() - start < 5.0
  for split in ('train', 'test'):
    for a, b in zip(again[split], cifar10['ds'][split]):
      assert a.dtype == b.dtype and np.array_equal(a, b)  # assert_array_equal is slow here.
  assert snapshot(cifar10['root']) == cifar10['before'], 'wrote under the data root'


# ----------------------------------------------------------------------------- fake offline


def _write_fake(root, name='fake', n_train=20, n_test=8, seed=0):
  rng = np.random.default_rng(seed)
  folder = pathlib.Path(root) / name
  folder.mkdir(parents=True, exist_ok=True)
  files = {}
  for split, n in (('train', n_train), ('test', n_test)):
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    labels = (np.arange(n) % 3).astype(np.uint8)
    (folder / f'{split}_images.u8.xz').write_bytes(lzma.compress(images.tobytes()))
    (folder / f'{split}_labels.u8').write_bytes(labels.tobytes())
    files[f'{split}_images'] = dict(file=f'{split}_images.u8.xz', dtype='uint8',
                                    shape=list(images.shape), sha256_decoded=_sha(images))
    files[f'{split}_labels'] = dict(file=f'{split}_labels.u8', dtype='uint8', shape=[n],
                                    sha256_decoded=_sha(labels))
  meta = dict(class_names=['a', 'b', 'c'], files=files)
  (folder / 'meta.json').write_text(json.dumps(meta))
  return folder, meta


def test_fake_offline_roundtrip_and_cache_invalidation(tmp_path):
  folder, _ = _write_fake(tmp_path / 'data')
  cache = tmp_path / 'cache'
  ds = data.load_offline('fake', str(tmp_path / 'data'), cache_dir=str(cache))
  assert ds['train'][0].shape == (20, 4, 4, 3) and ds['test'][1].dtype == np.int32
  assert len(list(cache.rglob('*.npy'))) == 4
  assert not list(folder.glob('*.npy'))
  # A changed source (new bytes + new sha in meta.json) must not be served from the cache.
  _write_fake(tmp_path / 'data', seed=1)
  ds2 = data.load_offline('fake', str(tmp_path / 'data'), cache_dir=str(cache))
  assert not np.array_equal(ds['train'][0], ds2['train'][0])
  assert len(list(cache.rglob('*.npy'))) == 6  # Labels are unchanged, so still shared.


def test_checksum_mismatch_raises(tmp_path):
  folder, _ = _write_fake(tmp_path)
  raw = bytearray(lzma.decompress((folder / 'train_images.u8.xz').read_bytes()))
  raw[5] ^= 0xFF
  (folder / 'train_images.u8.xz').write_bytes(lzma.compress(bytes(raw)))
  with pytest.raises(ValueError, match='checksum mismatch'):
    data.load_offline('fake', str(tmp_path), cache_dir=str(tmp_path / 'cache'))
  # verify=False skips the check and caches nothing.
  ds = data.load_offline('fake', str(tmp_path), cache_dir=str(tmp_path / 'c2'), verify=False)
  assert ds['train'][0].shape == (20, 4, 4, 3)
  assert not (tmp_path / 'c2' / 'fake').exists()


def test_warm_cache_does_not_hide_a_corrupted_source(tmp_path, monkeypatch):
  folder, _ = _write_fake(tmp_path / 'data')
  root, cache = str(tmp_path / 'data'), str(tmp_path / 'cache')
  data.load_offline('fake', root, cache_dir=cache)  # decodes, verifies, caches
  decoded = []
  real = sources._decode_file
  monkeypatch.setattr(sources, '_decode_file', lambda *a: decoded.append(a[2]) or real(*a))
  data.load_offline('fake', root, cache_dir=cache)
  assert decoded == []  # an unchanged source is served from the cache
  # the source file is damaged in place; meta.json (and so the cache key) is unchanged
  raw = bytearray(lzma.decompress((folder / 'train_images.u8.xz').read_bytes()))
  raw[5] ^= 0xFF
  (folder / 'train_images.u8.xz').write_bytes(lzma.compress(bytes(raw)))
  with pytest.raises(ValueError, match='checksum mismatch'):
    data.load_offline('fake', root, cache_dir=cache)
  assert decoded == ['train_images']


def test_wrong_size_raises(tmp_path):
  folder, _ = _write_fake(tmp_path)
  (folder / 'test_labels.u8').write_bytes(b'\x00' * 3)
  with pytest.raises(ValueError, match='decodes to 3 bytes'):
    data.load_offline('fake', str(tmp_path), cache_dir=str(tmp_path / 'cache'))


def test_missing_dir_raises_helpful(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.load_offline('cifar10', str(tmp_path / 'nowhere'), cache_dir=str(tmp_path / 'c'))
  msg = str(e.value)
  assert str(tmp_path / 'nowhere') in msg and 'LRDFA_DATA_DIR' in msg and 'tfds' in msg
  with pytest.raises(FileNotFoundError, match='dataset folder'):
    data.load_offline('cifar100', str(tmp_path), cache_dir=str(tmp_path / 'c'))


def test_default_dirs_follow_env(tmp_path, monkeypatch):
  monkeypatch.setenv('LRDFA_DATA_DIR', str(tmp_path / 'd'))
  assert data.default_offline_root() == str(tmp_path / 'd')
  monkeypatch.delenv('LRDFA_DATA_DIR')
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sources, '_candidate_roots', lambda: [tmp_path / 'x', tmp_path / 'y'])
  with pytest.raises(FileNotFoundError, match='looked in'):
    data.default_offline_root()
  (tmp_path / 'y').mkdir()
  assert data.default_offline_root() == str(tmp_path / 'y')

  monkeypatch.setenv('LRDFA_CACHE_DIR', str(tmp_path / 'c'))
  assert data.default_cache_dir() == str(tmp_path / 'c')
  monkeypatch.delenv('LRDFA_CACHE_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert data.default_cache_dir() == str(tmp_path / 'xdg' / 'lrdfa_jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert data.default_cache_dir().endswith(os.path.join('.cache', 'lrdfa_jax'))


# ----------------------------------------------------------------------------- tfds


def test_tfds_mock_cifar10(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_tfds('cifar10', str(tmp_path))
  for split in ('train', 'test'):
    images, labels = ds[split]
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10


def test_imagenet_jpegs_decode_to_rgb_like_the_array_path(imagenet_jpegs):
  """Real JPEGs in the tfds imagenet2012 format: every colour mode decodes to RGB, and the
  bytes transforms (reduced-scale decode) match the array transforms with the same draws."""
  import io

  from PIL import Image
  lazy = data.load_tfds('imagenet2012', imagenet_jpegs)
  assert len(lazy['train']) == 16 and len(lazy['test']) == 8
  modes = set()
  for i in range(len(lazy['train'])):
    record = lazy['train'][i]
    assert isinstance(record['image'], bytes) and 0 <= record['label'] < 4
    img = Image.open(io.BytesIO(record['image']))
    modes.add((img.format, img.mode))
    full = data.decode_image(record['image'])
    assert full.dtype == np.uint8 and full.shape == (img.size[1], img.size[0], 3)
    if img.mode == 'L':
      assert (full[..., 0] == full[..., 2]).all()
    for size in (32, 64):
      a = data.decode_inception(record['image'], np.random.default_rng(i), size)
      b = data.augment_inception(full, np.random.default_rng(i), size)
      assert a.shape == b.shape == (size, size, 3) and a.dtype == np.uint8
      assert np.abs(a.astype(int) - b).mean() < 8, (i, size)  # the same crop and flip
      c = data.decode_center_crop(record['image'], size)
      d = data.resize_center_crop(full, size)
      assert c.shape == (size, size, 3) and np.abs(c.astype(int) - d).mean() < 8, (i, size)
  assert {('JPEG', 'L'), ('JPEG', 'CMYK'), ('PNG', 'RGB'), ('JPEG', 'RGB')} <= modes
  kw = dict(mean=MEAN, std=STD, image_size=24, workers=2)
  batches = list(data.train_batches(data.RecordSource(lazy['train']), batch_size=8, seed=0,
                                    epoch=0, **kw))
  assert [b['image'].shape for b in batches] == [(8, 24, 24, 3)] * 2
  test = data.RecordSource(lazy['test'])
  labels = np.concatenate([b['label'] for b in data.eval_batches(test, batch_size=8, **kw)])
  assert sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_tfds_not_prepared_raises_helpful(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(FileNotFoundError) as e:
    data.load_tfds('cifar10', str(tmp_path))
  msg = str(e.value)
  assert "lrdfa_jax[tfds-prepare]" in msg and f'tfds build cifar10 --data_dir={tmp_path}' in msg
  with pytest.raises(FileNotFoundError, match='downloads/manual'):
    data.load_tfds('imagenet2012', str(tmp_path))
  with pytest.raises(ValueError, match='supports'):
    data.load_tfds('mnist', str(tmp_path))


# ----------------------------------------------------------------------------- load / synthetic


def test_load_dispatch():
  with pytest.raises(ValueError, match="'offline', 'tfds', 'synthetic'"):
    data.load('hdf5', 'cifar10')
  with pytest.raises(ValueError, match='synthetic'):
    data.load('offline', 'cifar10', num_train=3)
  ds = data.load('synthetic', 'synthetic', num_train=40, num_test=8)
  assert isinstance(ds['train'], data.ArraySource) and len(ds['test']) == 8
  assert ds['train'].images.shape == (40, 8, 8, 3) and ds['test'].labels.shape == (8,)


def test_synthetic_cells_make_a_coarse_pattern():
  (x, y), _ = data.synthetic(num_train=2000, image_shape=(16, 16, 3), num_classes=2, cell=8).values()
  mean = x[y == 0].astype(np.float32).mean(0) - 128.0  # the class pattern, noise averaged out
  cells = mean.reshape(2, 8, 2, 8, 3)
  assert np.abs(cells - cells.mean((1, 3), keepdims=True)).max() < 8.0  # constant per cell
  assert np.abs(cells.mean((1, 3))).min() > 24.0  # ±32 (a little less after clipping)
  # cell=1 (the default) draws exactly the per-pixel images of before cells existed
  images = data.synthetic(seed=3, cell=1)['train'][0]
  assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == '9823c0261dc3dad5'
  with pytest.raises(ValueError, match='cell side'):
    data.synthetic(cell=0)


def test_synthetic_deterministic_and_separable():
  a = data.synthetic(seed=3)
  b = data.synthetic(seed=3)
  c = data.synthetic(seed=4)
  for split in ('train', 'test'):
    for x, y in zip(a[split], b[split]):
      np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a['train'][0], c['train'][0])
  (xtr, ytr), (xte, yte) = a['train'], a['test']
  assert xtr.dtype == np.uint8 and ytr.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ytr), [128] * 4)
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32)
  means = np.stack([flat(xtr)[ytr == k].mean(0) for k in range(4)])
  pred = np.argmin(((flat(xte)[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == yte).mean() > 0.9
