"""Input pipeline: offline CIFAR-10 + cache, checksums, tfds (mocked), batching, augmentation."""
import hashlib
import json
import lzma
import os
import pathlib
import threading
import time

import numpy as np
import pytest

from lrdfa_jax import data

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _real_root():
  try:
    root = data.default_offline_root()
  except FileNotFoundError:
    return None
  return root if os.path.isfile(os.path.join(root, 'cifar10', 'meta.json')) else None


def _snapshot(root):
  return {(p, p.stat().st_mtime_ns, p.stat().st_size) for p in pathlib.Path(root).rglob('*')}


def _sha(array):
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- real CIFAR-10


@pytest.fixture(scope='session')
def cifar10(tmp_path_factory):
  root = _real_root()
  if root is None:
    pytest.skip('real CIFAR-10 not found (../shared/data/cifar10 or $LRDFA_DATA_DIR/cifar10)')
  cache_dir = str(tmp_path_factory.mktemp('cache'))
  before = _snapshot(root)
  start = time.perf_counter()
  ds = data.load_offline('cifar10', root, cache_dir=cache_dir)
  return dict(ds=ds, root=root, cache_dir=cache_dir, before=before,
              seconds=time.perf_counter() - start)


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

  monkeypatch.setattr(data, '_decode_file', no_decode)
  start = time.perf_counter()
  again = data.load_offline('cifar10', cifar10['root'], cache_dir=cifar10['cache_dir'])
  assert time.perf_counter() - start < 5.0
  for split in ('train', 'test'):
    for a, b in zip(again[split], cifar10['ds'][split]):
      assert a.dtype == b.dtype and np.array_equal(a, b)  # assert_array_equal is slow here.
  assert _snapshot(cifar10['root']) == cifar10['before'], 'wrote under the data root'


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
  real = data._decode_file
  monkeypatch.setattr(data, '_decode_file', lambda *a: decoded.append(a[2]) or real(*a))
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
  monkeypatch.setattr(data, '_candidate_roots', lambda: [tmp_path / 'x', tmp_path / 'y'])
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
  batches = list(data.train_batches(lazy['train'], None, batch_size=8, seed=0, epoch=0, **kw))
  assert [b['image'].shape for b in batches] == [(8, 24, 24, 3)] * 2
  labels = np.concatenate([b['label'] for b in data.eval_batches(lazy['test'], None,
                                                                  batch_size=8, **kw)])
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
  assert ds['train'][0].shape == (40, 8, 8, 3) and ds['test'][1].shape == (8,)


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


# ----------------------------------------------------------------------------- transforms


def test_normalize():
  x = np.array([[[[0, 255, 51]]]], np.uint8)
  out = data.normalize(x, (0.5, 0.5, 0.2), (0.25, 0.5, 0.1))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [-2.0, 1.0, 0.0], atol=1e-6)


def _crop_candidates(image, pad=4):
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      yield (dy, dx, False), crop
      yield (dy, dx, True), crop[:, ::-1]


def test_augment_cifar_is_padded_crop_and_flip():
  images = np.random.default_rng(0).integers(1, 256, (16, 32, 32, 3), dtype=np.uint8)
  out = data.augment_cifar(images, np.random.default_rng(1))
  assert out.shape == images.shape and out.dtype == np.uint8
  assert not np.array_equal(out, images)
  seen = set()
  for image, aug in zip(images, out):
    matches = [p for p, c in _crop_candidates(image) if np.array_equal(c, aug)]
    assert len(matches) == 1
    seen.add(matches[0][2])
  assert seen == {False, True}
  # A constant image keeps its colour; only the zero-padded border can appear.
  const = np.full((64, 32, 32, 3), 77, np.uint8)
  aug = data.augment_cifar(const, np.random.default_rng(2))
  assert set(np.unique(aug)) <= {0, 77}
  assert (aug[:, 4:28, 4:28] == 77).all()
  assert (aug == 0).any()
  # Zero padding: every zero pixel is on a full zero row or column.
  for a in aug:
    zero = (a == 0).all(-1)
    assert (zero.all(1)[:, None] | zero.all(0)[None, :])[zero].all()


def test_augment_cifar_deterministic_for_rng():
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  a = data.augment_cifar(images, np.random.default_rng(5))
  b = data.augment_cifar(images, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)


def test_inception_and_center_crop():
  image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
  rng = np.random.default_rng(0)
  outs = [data.augment_inception(image, rng, size=32) for _ in range(4)]
  assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
  assert not np.array_equal(outs[0], outs[1])
  center = data.resize_center_crop(image, size=32)
  assert center.shape == (32, 32, 3) and center.dtype == np.uint8


# ----------------------------------------------------------------------------- batching


def _ids_dataset(n=103):
  """Images whose pixels encode the example index (in the un-augmented view)."""
  ids = np.arange(n)
  images = np.zeros((n, 32, 32, 3), np.uint8)
  images[..., 0] = (ids % 256)[:, None, None]
  images[..., 1] = (ids // 256)[:, None, None]
  return images, ids.astype(np.int32)


def _batches(images, labels, **kw):
  kw = {**dict(batch_size=16, seed=0, epoch=0, mean=(0, 0, 0), std=(1, 1, 1)), **kw}
  return list(data.train_batches(images, labels, **kw))


def test_train_batches_epoch_properties():
  images, labels = _ids_dataset()
  epoch0 = _batches(images, labels, augment=False)
  assert len(epoch0) == data.num_train_batches(103, 16) == 6
  for b in epoch0:
    assert b['image'].shape == (16, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32
    # Image and label stay paired after shuffling.
    np.testing.assert_array_equal(np.rint(b['image'][:, 0, 0, 0] * 255), b['label'] % 256)
  seen = np.concatenate([b['label'] for b in epoch0])
  assert len(seen) == 96 == len(set(seen.tolist()))
  expected = np.random.default_rng((0, 0)).permutation(103)[:96]
  np.testing.assert_array_equal(seen, expected)
  assert not np.array_equal(seen, np.sort(seen))
  again = _batches(images, labels, augment=False)
  for a, b in zip(epoch0, again):
    np.testing.assert_array_equal(a['label'], b['label'])
  epoch1 = _batches(images, labels, augment=False, epoch=1)
  assert not np.array_equal(seen, np.concatenate([b['label'] for b in epoch1]))


def test_train_batches_process_slices_and_resume():
  images, labels = _ids_dataset()
  full = _batches(images, labels, augment=True)
  parts = [_batches(images, labels, augment=True, process_index=i, process_count=4)
           for i in range(4)]
  for k, batch in enumerate(full):
    assert all(p[k]['label'].shape == (4,) for p in parts)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), batch[key])
  tail = _batches(images, labels, augment=True, start_batch=2)
  assert len(tail) == len(full) - 2
  for a, b in zip(tail, full[2:]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert _batches(images, labels, start_batch=6) == []


def test_train_batches_augment_changes_images_reproducibly():
  images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(64, dtype=np.int32)
  plain = _batches(images, labels, augment=False)
  aug = _batches(images, labels, augment=True)
  aug2 = _batches(images, labels, augment=True)
  for p, a, a2 in zip(plain, aug, aug2):
    np.testing.assert_array_equal(p['label'], a['label'])
    np.testing.assert_array_equal(a['image'], a2['image'])
    assert not np.array_equal(p['image'], a['image'])


def test_train_batches_errors():
  images, labels = _ids_dataset(40)
  with pytest.raises(ValueError, match='divisible by process_count'):
    _batches(images, labels, process_count=3)
  with pytest.raises(ValueError, match='larger than'):
    _batches(images, labels, batch_size=64)
  with pytest.raises(ValueError, match='start_batch'):
    _batches(images, labels, start_batch=3)
  with pytest.raises(ValueError, match='labels'):
    _batches(images, labels[:-1])


def test_eval_batches_cover_once_with_mask():
  images, labels = _ids_dataset(37)
  kw = dict(batch_size=16, mean=(0, 0, 0), std=(1, 1, 1))
  batches = list(data.eval_batches(images, labels, **kw))
  assert len(batches) == 3
  for b in batches:
    assert b['image'].shape == (16, 32, 32, 3) and b['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  got = np.concatenate([b['label'] for b in batches])[mask == 1]
  np.testing.assert_array_equal(got, labels)
  assert mask.sum() == 37 and (mask[37:] == 0).all()
  assert (batches[-1]['image'][5:] == 0).all()
  parts = [list(data.eval_batches(images, labels, process_index=i, process_count=4, **kw))
           for i in range(4)]
  assert all(len(p) == 3 for p in parts)
  for k, b in enumerate(batches):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), b[key])


class _FakeSource:
  """A lazy random-access source: records of varied sizes (one grayscale), label = index."""

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


def test_lazy_source_train_batches():
  src = _FakeSource(21)
  kw = dict(batch_size=8, seed=3, epoch=1, mean=MEAN, std=STD, image_size=16, workers=3)
  batches = list(data.train_batches(src, None, **kw))
  assert len(batches) == 2 and src.reads == 16  # remainder dropped, nothing read twice
  for b in batches:
    assert b['image'].shape == (8, 16, 16, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32
  perm = np.random.default_rng((3, 1)).permutation(21)  # the same order as for arrays
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), perm[:16])
  again = list(data.train_batches(src, None, **kw))
  np.testing.assert_array_equal(again[1]['image'], batches[1]['image'])
  other = list(data.train_batches(src, None, **{**kw, 'epoch': 2}))
  assert not np.array_equal(other[0]['label'], batches[0]['label'])
  # process slices and resume see the same crops as the global batch
  parts = [list(data.train_batches(src, None, process_index=i, process_count=2, **kw))
           for i in range(2)]
  for k in range(2):
    np.testing.assert_array_equal(np.concatenate([p[k]['image'] for p in parts]),
                                  batches[k]['image'])
  resumed = list(data.train_batches(src, None, start_batch=1, **kw))
  np.testing.assert_array_equal(resumed[0]['image'], batches[1]['image'])
  # no augmentation: exactly the eval transform
  plain = next(data.train_batches(src, None, **{**kw, 'augment': False}))
  first = src.records[int(perm[0])]['image']
  want = data.normalize(data.resize_center_crop(first, 16), MEAN, STD)
  np.testing.assert_allclose(plain['image'][0], want, atol=1e-6)
  with pytest.raises(ValueError, match='lazy random-access source'):
    list(data.train_batches(np.zeros((8, 4, 4, 3), np.uint8), None, **kw))


def test_lazy_source_eval_batches_cover_once():
  src = _FakeSource(10)
  kw = dict(batch_size=4, mean=MEAN, std=STD, image_size=12, workers=2)
  batches = list(data.eval_batches(src, None, **kw))
  assert len(batches) == 3 and all(b['image'].shape == (4, 12, 12, 3) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[mask == 1],
                                np.arange(10))
  assert mask.sum() == 10 and (batches[-1]['image'][2:] == 0).all()
  gray = data.normalize(data.resize_center_crop(np.repeat(src.records[3]['image'][..., None], 3,
                                                          axis=2), 12), MEAN, STD)
  np.testing.assert_allclose(batches[0]['image'][3], gray, atol=1e-6)
  parts = [list(data.eval_batches(src, None, process_index=i, process_count=2, **kw))
           for i in range(2)]
  for k, b in enumerate(batches):
    np.testing.assert_array_equal(np.concatenate([p[k]['image'] for p in parts]), b['image'])
  sub = data.Subset(src, [7, 2])
  assert len(sub) == 2 and sub[1]['label'] == 2


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_yields_in_order_and_reraises():
  assert list(data.prefetch(iter(range(10)), size=3)) == list(range(10))

  def broken():
    yield 1
    raise RuntimeError('boom')

  it = data.prefetch(broken())
  assert next(it) == 1
  with pytest.raises(RuntimeError, match='boom'):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_prefetch_close_stops_producer():
  closed = threading.Event()

  def endless():
    try:
      i = 0
      while True:
        yield i
        i += 1
    finally:
      closed.set()

  with data.prefetch(endless(), size=2) as it:
    assert [next(it) for _ in range(5)] == list(range(5))
  assert closed.wait(5.0)
  assert not any(t.name == 'lrdfa-prefetch' and t.is_alive() for t in threading.enumerate())
