"""Batching on the host, for any source (:mod:`lrdfa_jax.data.sources`), and prefetch.

``train_batches`` shuffles with ``np.random.default_rng((seed, epoch))``, augments and
normalises; ``eval_batches`` pads the last batch and marks it with ``'mask'``. Decoded
sources (arrays) get the pad-4 crop + flip, drawn per global batch from ``(seed, epoch,
_AUG_TAG, b)``; record sources (ImageNet) get the inception crop + flip per example, drawn
from ``(seed, epoch, _AUG_TAG, b, position)``, or the resize + centre crop, as they are
decoded in a pool of ``workers`` threads. No JAX in here.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from lrdfa_jax.data.sources import ArraySource, RecordSource
from lrdfa_jax.data.transforms import center_any, crop_flip, draw_crop_flip, inception_any
from lrdfa_jax.data.transforms import normalize

# Tag mixed into augmentation seeds so they never collide with the epoch permutation
# seed: numpy's SeedSequence pads entropy with zeros, so (s, e) and (s, e, 0) are equal.
_AUG_TAG = 0x617567
_PAD = 4  # the CIFAR crop's zero padding


def num_train_batches(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  return num_examples // batch_size


def _local_size(batch_size: int, process_index: int, process_count: int) -> int:
  if batch_size <= 0 or process_count <= 0:
    raise ValueError(f'batch_size ({batch_size}) and process_count ({process_count}) must be '
                     'positive.')
  if batch_size % process_count:
    raise ValueError(f'Global batch_size {batch_size} is not divisible by process_count '
                     f'{process_count}; pick a multiple of {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  return batch_size // process_count


def _check_source(source) -> None:
  if not isinstance(source, (ArraySource, RecordSource)):
    raise ValueError(f'expected a data source, got {type(source).__name__}: wrap arrays as '
                     'data.ArraySource(images, labels) and records as data.RecordSource(records) '
                     '(data.load returns sources).')


def _pool(source, workers: int):
  """The decode threads of a record source (arrays need none)."""
  return contextlib.nullcontext() if source.decoded else ThreadPoolExecutor(workers)


def train_batches(source, *, batch_size: int, seed: int, epoch: int, augment: bool = True,
                  mean, std, process_index: int = 0, process_count: int = 1,
                  start_batch: int = 0, image_size: int = 224,
                  workers: int = 16) -> Iterator[dict]:
  """One shuffled epoch of ``{'image': f32 NHWC normalised, 'label': i32}`` batches.

  ``batch_size`` is global; this process gets its contiguous ``batch_size /
  process_count`` slice of each. Order from ``default_rng((seed, epoch))``, remainder
  dropped. Crops/flips are drawn per global batch from ``(seed, epoch, batch index)``,
  so they do not depend on ``start_batch`` (resume) or ``process_count``. A record source
  is decoded in a pool of ``workers`` threads, each record given the inception crop + flip
  (``augment``) or resize + centre crop, to ``image_size``.
  """
  _check_source(source)
  local = _local_size(batch_size, process_index, process_count)
  lo = process_index * local
  num_batches = num_train_batches(len(source), batch_size)
  if num_batches == 0:
    raise ValueError(f'batch_size {batch_size} is larger than the {len(source)} training '
                     'examples; use a smaller batch.')
  if not 0 <= start_batch <= num_batches:
    raise ValueError(f'start_batch {start_batch} not in [0, {num_batches}] (batches per '
                     'epoch).')
  return _train_batches(source, batch_size, seed, epoch, augment, mean, std, lo, local,
                        start_batch, num_batches, image_size, workers)


def _train_batches(source, batch_size, seed, epoch, augment, mean, std, lo, local,
                   start_batch, num_batches, size, workers):
  perm = np.random.default_rng((seed, epoch)).permutation(len(source))
  with _pool(source, workers) as pool:
    for b in range(start_batch, num_batches):
      key = (seed, epoch, _AUG_TAG, b)
      idx = perm[b * batch_size:(b + 1) * batch_size][lo:lo + local]
      if source.decoded:
        images, labels = source.read(idx)
        if augment:  # drawn for the global batch; this process takes its slice
          offsets, flips = draw_crop_flip(np.random.default_rng(key), batch_size, _PAD)
          images = crop_flip(images, offsets[lo:lo + local], flips[lo:lo + local], _PAD)
      else:
        def example(pos, image, key=key):  # from its global position in the batch
          if not augment:
            return center_any(image, size)
          return inception_any(image, np.random.default_rng((*key, lo + pos)), size)
        images, labels = source.read(idx, example, pool)
      yield {'image': normalize(images, mean, std), 'label': labels}


def eval_batches(source, *, batch_size: int, mean, std, process_index: int = 0,
                 process_count: int = 1, image_size: int = 224,
                 workers: int = 16) -> Iterator[dict]:
  """Every example once, in order, as ``{'image', 'label', 'mask'}`` batches.

  The last global batch is padded (zero image after normalisation, label 0, mask 0);
  every process yields the same number of batches. A record source is resized and
  centre-cropped to ``image_size`` (see ``train_batches``).
  """
  _check_source(source)
  local = _local_size(batch_size, process_index, process_count)
  return _eval_batches(source, batch_size, mean, std, process_index * local, local,
                       image_size, workers)


def _eval_batches(source, batch_size, mean, std, lo, local, size, workers):
  num = len(source)
  shape = source.image_shape if source.decoded else (size, size, 3)
  example = None if source.decoded else (lambda pos, image: center_any(image, size))
  with _pool(source, workers) as pool:
    for start in range(0, num, batch_size):
      begin, end = min(start + lo, num), min(start + lo + local, num)
      image = np.zeros((local, *shape), np.float32)
      label = np.zeros((local,), np.int32)
      mask = np.zeros((local,), np.float32)
      if end > begin:
        images, labels = source.read(np.arange(begin, end), example, pool)
        image[:end - begin] = normalize(images, mean, std)
        label[:end - begin] = labels
        mask[:end - begin] = 1.0
      yield {'image': image, 'label': label, 'mask': mask}


# ----------------------------------------------------------------------------- prefetch


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
  while not stop.is_set():
    try:
      q.put(item, timeout=0.05)
      return True
    except queue.Full:
      pass
  return False


def _produce(iterator: Iterator, q: queue.Queue, stop: threading.Event) -> None:
  # Holds no reference to the _Prefetcher, so dropping that one stops this thread.
  try:
    for value in iterator:
      if not _put(q, stop, ('value', value)):
        break
    else:
      _put(q, stop, ('end', None))
  except BaseException as e:  # Re-raised by the consumer.
    _put(q, stop, ('error', e))
  finally:
    if stop.is_set() and hasattr(iterator, 'close'):
      iterator.close()


class _Prefetcher:
  """Iterator fed by a daemon thread through a bounded queue."""

  def __init__(self, iterable: Iterable, size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=_produce, args=(iter(iterable), self._queue,
                                                           self._stop),
                                    name='lrdfa-prefetch', daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    kind, value = self._queue.get()
    if kind == 'value':
      return value
    self.close()
    if kind == 'error':
      raise value
    raise StopIteration

  def close(self) -> None:
    """Stops the producer thread and waits for it."""
    self._done = True
    self._stop.set()
    self._thread.join(timeout=10.0)

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self._stop.set()


def prefetch(iterator: Iterable, size: int = 2) -> _Prefetcher:
  """Produces ``size`` items ahead in a background thread; errors re-raise on ``next``.

  Call ``.close()`` (or use it as a context manager) to stop early.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}.')
  return _Prefetcher(iterator, size)
