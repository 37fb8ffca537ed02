"""Batching: shuffles, process slices, resume, augmentation draws, padding, records, prefetch."""
import threading

import numpy as np
import pytest

from lrdfa_jax import data
from tests.conftest import FakeRecords

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


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
  return list(data.train_batches(data.ArraySource(images, labels), **kw))


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
  source = data.ArraySource(images, labels)
  batches = list(data.eval_batches(source, **kw))
  assert len(batches) == 3
  for b in batches:
    assert b['image'].shape == (16, 32, 32, 3) and b['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  got = np.concatenate([b['label'] for b in batches])[mask == 1]
  np.testing.assert_array_equal(got, labels)
  assert mask.sum() == 37 and (mask[37:] == 0).all()
  assert (batches[-1]['image'][5:] == 0).all()
  parts = [list(data.eval_batches(source, process_index=i, process_count=4, **kw))
           for i in range(4)]
  assert all(len(p) == 3 for p in parts)
  for k, b in enumerate(batches):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), b[key])


def test_lazy_source_train_batches():
  recs = FakeRecords(21)
  src = data.RecordSource(recs)
  kw = dict(batch_size=8, seed=3, epoch=1, mean=MEAN, std=STD, image_size=16, workers=3)
  batches = list(data.train_batches(src, **kw))
  assert len(batches) == 2 and recs.reads == 16  # remainder dropped, nothing read twice
  for b in batches:
    assert b['image'].shape == (8, 16, 16, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32
  perm = np.random.default_rng((3, 1)).permutation(21)  # the same order as for arrays
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), perm[:16])
  again = list(data.train_batches(src, **kw))
  np.testing.assert_array_equal(again[1]['image'], batches[1]['image'])
  other = list(data.train_batches(src, **{**kw, 'epoch': 2}))
  assert not np.array_equal(other[0]['label'], batches[0]['label'])
  # process slices and resume see the same crops as the global batch
  parts = [list(data.train_batches(src, process_index=i, process_count=2, **kw))
           for i in range(2)]
  for k in range(2):
    np.testing.assert_array_equal(np.concatenate([p[k]['image'] for p in parts]),
                                  batches[k]['image'])
  resumed = list(data.train_batches(src, start_batch=1, **kw))
  np.testing.assert_array_equal(resumed[0]['image'], batches[1]['image'])
  # no augmentation: exactly the eval transform
  plain = next(data.train_batches(src, **{**kw, 'augment': False}))
  first = recs.records[int(perm[0])]['image']
  want = data.normalize(data.resize_center_crop(first, 16), MEAN, STD)
  np.testing.assert_allclose(plain['image'][0], want, atol=1e-6)
  with pytest.raises(ValueError, match='expected a data source'):
    list(data.train_batches(np.zeros((8, 4, 4, 3), np.uint8), **kw))
  with pytest.raises(ValueError, match='random-access'):
    data.RecordSource(np.zeros((8, 4, 4, 3), np.uint8))


def test_lazy_source_eval_batches_cover_once():
  recs = FakeRecords(10)
  src = data.RecordSource(recs)
  kw = dict(batch_size=4, mean=MEAN, std=STD, image_size=12, workers=2)
  batches = list(data.eval_batches(src, **kw))
  assert len(batches) == 3 and all(b['image'].shape == (4, 12, 12, 3) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[mask == 1],
                                np.arange(10))
  assert mask.sum() == 10 and (batches[-1]['image'][2:] == 0).all()
  gray = data.normalize(data.resize_center_crop(np.repeat(recs.records[3]['image'][..., None], 3,
                                                          axis=2), 12), MEAN, STD)
  np.testing.assert_allclose(batches[0]['image'][3], gray, atol=1e-6)
  parts = [list(data.eval_batches(src, process_index=i, process_count=2, **kw))
           for i in range(2)]
  for k, b in enumerate(batches):
    np.testing.assert_array_equal(np.concatenate([p[k]['image'] for p in parts]), b['image'])
  sub = src.subset([7, 2]).subset([1])  # a held-out slice of a slice
  assert len(sub) == 1
  assert next(data.eval_batches(sub, **kw))['label'][0] == 2


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


def test_array_source_reads_and_maps_each_image():
  images, labels = _ids_dataset(10)
  src = data.ArraySource(images, labels)
  got, lab = src.read([3, 1], example=lambda pos, im: im[:4, :4] + pos)
  assert got.shape == (2, 4, 4, 3) and got.dtype == np.uint8 and lab.dtype == np.int32
  np.testing.assert_array_equal(got[1], images[1, :4, :4] + 1)
  np.testing.assert_array_equal(lab, [3, 1])
  assert len(src.subset([9, 0])) == 2 and src.subset([9, 0]).read([0])[1][0] == 9
