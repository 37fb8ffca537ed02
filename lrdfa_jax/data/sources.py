"""Where images come from: offline CIFAR arrays, tfds, synthetic data, behind one interface.

:func:`load` returns ``{'train': source, 'test': source}``. A source has ``len`` and
``read(indices, example=None, pool=None) -> (uint8 NHWC images, int32 labels)``:

* :class:`ArraySource`: decoded arrays in memory (offline CIFAR, tfds CIFAR, synthetic);
* :class:`RecordSource`: records read lazily (tfds ``imagenet2012``: ``{'image': JPEG bytes,
  'label'}``), decoded per batch in a thread pool by a per-example transform that also crops
  and resizes them (:mod:`lrdfa_jax.data.transforms`).

``source.subset(indices)`` is a held-out slice of either. The readers (``load_offline``,
``load_tfds``, ``synthetic``) return what they read: arrays, or tfds' lazy sources.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import lzma
import math
import os
import pathlib
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence

import numpy as np

DATASETS = {
    # CIFAR-10 statistics: per-channel pixel mean/std of the train split (meta.json).
    'cifar10': dict(num_classes=10, image_shape=(32, 32, 3),
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    'cifar100': dict(num_classes=100, image_shape=(32, 32, 3),
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    # resized: images of any size, cropped and resized to data.image_size per batch
    'imagenet2012': dict(num_classes=1000, image_shape=(224, 224, 3),
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resized=True),
}

SOURCES = ('offline', 'tfds', 'synthetic')

# tfds split names per dataset: (train split, split used as 'test').
_TFDS_SPLITS = {'cifar10': ('train', 'test'), 'cifar100': ('train', 'test'),
                'imagenet2012': ('train', 'validation')}

_FIX_HINT = ("Set LRDFA_DATA_DIR (or --config.data.data_dir) to the folder that holds "
             "'<name>/meta.json', or use source='tfds' or source='synthetic'.")


# ----------------------------------------------------------------------------- paths


def _candidate_roots() -> list[pathlib.Path]:
  repo_root = pathlib.Path(__file__).resolve().parents[2]
  return [pathlib.Path.cwd() / '..' / 'shared' / 'data', repo_root / '..' / 'shared' / 'data']


def default_offline_root() -> str:
  """``$LRDFA_DATA_DIR``, else the first existing ``../shared/data`` (from cwd, then repo).

  Raises ``FileNotFoundError`` naming the places it looked when none exists.
  """
  env = os.environ.get('LRDFA_DATA_DIR')
  if env:
    return os.path.abspath(os.path.expanduser(env))
  candidates = _candidate_roots()
  for path in candidates:
    if path.is_dir():
      return str(path.resolve())
  looked = ', '.join(str(p.resolve()) for p in candidates)
  raise FileNotFoundError(f'No offline data root found; looked in: {looked}. {_FIX_HINT}')


def default_cache_dir() -> str:
  """``$LRDFA_CACHE_DIR``, else ``$XDG_CACHE_HOME/lrdfa_jax``, else ``~/.cache/lrdfa_jax``."""
  env = os.environ.get('LRDFA_CACHE_DIR')
  if env:
    return os.path.abspath(os.path.expanduser(env))
  xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(xdg, 'lrdfa_jax')


# ----------------------------------------------------------------------------- offline


def _cache_path(cache_dir: str, name: str, key: str, sha256: str) -> str:
  return os.path.join(cache_dir, name, f'{key}-{sha256[:16]}.npy')


def _read_cached(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
  """The cached array if it exists and has the expected shape/dtype, else None."""
  if not os.path.isfile(path):
    return None
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError):
    return None
  if array.shape != shape or array.dtype != dtype:
    return None
  return array


def _source_stamp(folder: str, spec: dict) -> dict | None:
  """Size and mtime of the source file a cache entry was decoded from (None if missing)."""
  try:
    st = os.stat(os.path.join(folder, spec['file']))
  except OSError:
    return None
  return {'file': spec['file'], 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def _stamp_matches(path: str, stamp: dict | None) -> bool:
  try:
    with open(f'{path}.source.json') as f:
      return stamp is not None and json.load(f) == stamp
  except (OSError, ValueError):
    return False


def _write_cached(path: str, array: np.ndarray) -> None:
  """Writes atomically (tmp file + rename); warns instead of failing if not writable."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}.{threading.get_ident()}'
    with open(tmp, 'wb') as f:
      np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)
  except OSError as e:
    warnings.warn(f'Could not cache decoded data at {path} ({e}); it will be decoded again '
                  'next time. Set LRDFA_CACHE_DIR to a writable folder.')


def _write_stamp(path: str, stamp: dict | None) -> None:
  try:
    with open(f'{path}.source.json', 'w') as f:
      json.dump(stamp, f)
  except OSError:
    pass  # no stamp: the next load decodes and verifies again


def _decode_file(folder: str, name: str, key: str, spec: dict, verify: bool) -> np.ndarray:
  path = os.path.join(folder, spec['file'])
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{name}: '{key}' file {path} is missing (listed in meta.json). "
                            'Re-copy the dataset folder.')
  with open(path, 'rb') as f:
    raw = f.read()
  if spec['file'].endswith('.xz'):
    try:
      raw = lzma.decompress(raw)
    except lzma.LZMAError as e:
      raise ValueError(f'{name}: {path} is not valid xz data ({e}). Re-copy the dataset '
                       'folder.') from None
  dtype = np.dtype(spec['dtype'])
  shape = tuple(spec['shape'])
  if len(raw) != math.prod(shape) * dtype.itemsize:
    raise ValueError(f'{name}: {path} decodes to {len(raw)} bytes, but meta.json says shape '
                     f'{shape} of {dtype}. Re-copy the dataset folder.')
  if verify:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec['sha256_decoded']:
      raise ValueError(f"{name}: checksum mismatch for {path}: sha256 {digest}, meta.json "
                       f"expects {spec['sha256_decoded']}. The file is corrupt or stale; "
                       're-copy the dataset folder.')
  return np.frombuffer(raw, dtype=dtype).reshape(shape)


def load_offline(name: str, root: str | None = None, *, cache_dir: str | None = None,
                 verify: bool = True) -> dict:
  """Loads ``<root>/<name>/`` (layout given by its ``meta.json``) as uint8/int32 arrays.

  The first load decodes the (xz) files, checks their sha256 against ``meta.json`` and
  caches them as ``.npy`` under ``cache_dir`` (default ``default_cache_dir()``), named
  by their sha256 so a changed ``meta.json`` misses the cache, beside a stamp of the
  source file's size and mtime; later loads read the ``.npy`` (shape/dtype checked, not
  re-hashed) while the source file's stamp is unchanged, and decode and verify it again
  when it has changed (a corrupted or replaced copy fails its checksum instead of being
  hidden by the cache). Nothing is ever written under ``root``.
  ``verify=False`` skips hashing; what it decodes is then not cached.
  """
  root = default_offline_root() if root is None else os.path.abspath(os.path.expanduser(root))
  folder = os.path.join(root, name)
  meta_path = os.path.join(folder, 'meta.json')
  if not os.path.isfile(meta_path):
    what = 'data root' if not os.path.isdir(root) else 'dataset folder'
    where = root if not os.path.isdir(root) else folder
    raise FileNotFoundError(f"Offline dataset '{name}' not found: {what} {where} does not "
                            f'exist or has no meta.json (looked for {meta_path}). '
                            + _FIX_HINT.replace('<name>', name))
  with open(meta_path) as f:
    meta = json.load(f)
  files = meta.get('files', {})
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  out = {}
  for split in ('train', 'test'):
    arrays = []
    for kind in ('images', 'labels'):
      key = f'{split}_{kind}'
      if key not in files:
        raise ValueError(f"{meta_path} has no entry '{key}' under 'files'; expected "
                         "'train_images', 'train_labels', 'test_images', 'test_labels'.")
      spec = files[key]
      path = _cache_path(cache_dir, name, key, spec['sha256_decoded'])
      stamp = _source_stamp(folder, spec)
      array = None
      if _stamp_matches(path, stamp):  # the source is unchanged since it was verified
        array = _read_cached(path, tuple(spec['shape']), np.dtype(spec['dtype']))
      if array is None:
        array = _decode_file(folder, name, key, spec, verify)
        if verify:
          _write_cached(path, array)
          _write_stamp(path, stamp)
      arrays.append(array)
    images, labels = arrays
    if images.ndim != 4 or len(images) != len(labels):
      raise ValueError(f'{meta_path}: {split} images {images.shape} and labels {labels.shape} '
                       'do not form (N, H, W, C) / (N,) arrays.')
    num_classes = len(meta.get('class_names', ())) or DATASETS.get(name, {}).get('num_classes')
    if num_classes and labels.size and int(labels.max()) >= num_classes:
      raise ValueError(f'{meta_path}: {split} label {int(labels.max())} >= {num_classes} '
                       'classes.')
    out[split] = (images, labels.astype(np.int32))
  return out


# ----------------------------------------------------------------------------- tfds


def _check_image_decoder() -> None:
  if importlib.util.find_spec('PIL') is None and importlib.util.find_spec('cv2') is None:
    raise ImportError('Decoding tfds images without TensorFlow needs Pillow (or OpenCV): '
                      '`pip install pillow`.')


@contextlib.contextmanager
def _quiet_absl():
  """absl warnings off inside (unless INFO logs were asked for, e.g. ``--verbosity=0``)."""
  from absl import logging as absl_logging
  old = absl_logging.get_verbosity()
  if old < absl_logging.INFO:
    absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(old)


def load_tfds(name: str, data_dir: str | None = None) -> dict:
  """Reads a prepared tfds dataset with ``tfds.data_source`` (array_record, no TensorFlow).

  cifar10/cifar100: ``{'train': (images, labels), 'test': (images, labels)}`` arrays.
  imagenet2012: ``{'train': source, 'test': source}`` (``'test'`` is the validation split)
  of lazy random-access sources; ``source[i]`` is ``{'image': JPEG bytes, 'label': int,
  'file_name': ...}``, decoded by the batching functions with Pillow (any colour mode to RGB,
  at a reduced DCT scale where the crop allows).
  """
  if name not in _TFDS_SPLITS:
    raise ValueError(f"load_tfds supports {sorted(_TFDS_SPLITS)}, got '{name}'.")
  _check_image_decoder()
  import tensorflow_datasets as tfds  # Lazy: slow-ish import, only needed here.

  splits = _TFDS_SPLITS[name]
  try:
    with _quiet_absl():  # tfds warns about every folder it probes
      # imagenet2012: JPEG bytes, decoded per batch by decode_inception/decode_center_crop
      decoders = {'image': tfds.decode.SkipDecoding()} if name == 'imagenet2012' else None
      train, test = tfds.data_source(name, split=list(splits), data_dir=data_dir,
                                     download=False, decoders=decoders)
  except (NotImplementedError, ValueError, FileNotFoundError, AssertionError, KeyError) as e:
    # (KeyError: tfds' default data dir without the dataset; `splits['train']` is empty)
    with _quiet_absl():
      builder = tfds.builder(name, data_dir=data_dir)
      prepared = builder.is_prepared()
    root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
    if prepared:
      raise FileNotFoundError(
          f"tfds '{name}' in {builder.data_dir} is prepared in a format without random "
          f'access ({e.__class__.__name__}: {str(e).splitlines()[0]}). Rebuild it with '
          f'`tfds build {name} --data_dir={root} --file_format=array_record`.') from None
    manual = (f' For imagenet2012 first place the ILSVRC2012 train/val tar archives in '
              f'{root}/downloads/manual.' if name == 'imagenet2012' else '')
    raise FileNotFoundError(
        f"tfds dataset '{name}' is not prepared in {root} (looked for {builder.data_dir})."
        f"{manual} Prepare it with `pip install 'lrdfa_jax[tfds-prepare]'` then "
        f'`tfds build {name} --data_dir={root} --file_format=array_record`, or use '
        "source='offline'.") from None
  if name == 'imagenet2012':
    return {'train': train, 'test': test}
  return {'train': _stack_source(train, name), 'test': _stack_source(test, name)}


def _stack_source(source, name: str) -> tuple[np.ndarray, np.ndarray]:
  num = len(source)
  first = source[0] if num else None
  if first is not None and not {'image', 'label'} <= set(first):
    raise ValueError(f"tfds '{name}' records have keys {sorted(first)}, expected 'image' and "
                     "'label'.")
  shape = DATASETS[name]['image_shape'] if first is None else np.shape(first['image'])
  images_NHWC = np.empty((num, *shape), np.uint8)
  labels_N = np.empty((num,), np.int32)
  for i in range(num):
    record = first if i == 0 else source[i]
    images_NHWC[i] = record['image']
    labels_N[i] = record['label']
  return images_NHWC, labels_N


# ----------------------------------------------------------------------------- synthetic


def synthetic(num_train: int = 512, num_test: int = 128, image_shape=(8, 8, 3),
              num_classes: int = 4, seed: int = 0, cell: int = 1) -> dict:
  """Class-balanced uint8 images: a per-class ±32 pattern around 128 plus N(0, 40²) noise.

  The pattern is constant on ``cell``×``cell`` squares (1: a pattern per pixel); coarse cells
  are what a conv net trained by a local rule picks up in a few steps. Separable by a
  nearest-class-mean (linear) classifier; deterministic for ``seed``. Pixels have mean ≈ 0.5
  and std ≈ 0.2 in [0, 1] units.
  """
  if cell < 1:
    raise ValueError(f'synthetic cell={cell}: give a cell side of at least 1 pixel.')
  rng = np.random.default_rng(seed)
  h, w, c = image_shape
  coarse = rng.choice(np.array([-32.0, 32.0]),
                      size=(num_classes, -(-h // cell), -(-w // cell), c))
  patterns = coarse.repeat(cell, 1).repeat(cell, 2)[:, :h, :w]

  def make(num):
    labels = rng.permutation(np.arange(num) % num_classes).astype(np.int32)
    noise = rng.normal(0.0, 40.0, size=(num, *image_shape))
    images = np.clip(np.rint(128.0 + patterns[labels] + noise), 0, 255).astype(np.uint8)
    return images, labels

  return {'train': make(num_train), 'test': make(num_test)}


# ----------------------------------------------------------------------------- sources


Example = Callable[[int, np.ndarray | bytes], np.ndarray]  # (position in batch, image) -> HWC


class ArraySource:
  """Decoded ``uint8`` NHWC images and their labels, in memory."""

  decoded = True  # batches crop and flip the whole batch (lrdfa_jax.data.transforms.crop_flip)

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} images but {len(labels)} labels.')
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  def read(self, indices: Sequence[int], example: Example | None = None,
           pool: ThreadPoolExecutor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images, int32 labels)`` at ``indices``; ``example`` maps each image."""
    idx = np.asarray(indices)
    images = np.asarray(self.images[idx])
    if example is not None:
      images = np.stack([example(pos, im) for pos, im in enumerate(images)]).astype(np.uint8)
    return images, np.asarray(self.labels[idx], np.int32)

  def subset(self, indices: Sequence[int]) -> 'ArraySource':
    idx = np.asarray(indices)
    return ArraySource(self.images[idx], self.labels[idx])


class RecordSource:
  """Records read one at a time: ``records[i] -> {'image': encoded bytes or an array,
  'label': int}`` (tfds ``imagenet2012``), decoded and transformed per batch."""

  decoded = False  # batches transform each record as it is decoded (an Example)

  def __init__(self, records, indices: Sequence[int] | None = None):
    if isinstance(records, np.ndarray) or not hasattr(records, '__getitem__'):
      raise ValueError('RecordSource reads random-access {image, label} records; got '
                       f'{type(records).__name__}. Use ArraySource(images, labels) for arrays.')
    self.records = records
    self.indices = None if indices is None else np.asarray(indices)

  def __len__(self) -> int:
    return len(self.records) if self.indices is None else len(self.indices)

  def _record(self, i: int) -> dict:
    return self.records[int(i if self.indices is None else self.indices[i])]

  def read(self, indices: Sequence[int], example: Example | None = None,
           pool: ThreadPoolExecutor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images, int32 labels)``: each record decoded by ``example`` (required:
    records differ in size), in ``pool`` when given."""
    if example is None:
      raise ValueError('a RecordSource needs a per-example transform to decode its records.')

    def one(pos_index):
      pos, index = pos_index
      record = self._record(index)
      image = record['image']
      if not isinstance(image, bytes):  # a decoded array (a source read without SkipDecoding)
        image = np.asarray(image)
        if image.ndim == 2:  # grayscale JPEGs
          image = np.repeat(image[:, :, None], 3, axis=2)
      return example(pos, image), record['label']
    out = list((pool.map if pool is not None else map)(one, enumerate(indices)))
    return (np.stack([o[0] for o in out]).astype(np.uint8),
            np.asarray([o[1] for o in out], np.int32))

  def subset(self, indices: Sequence[int]) -> 'RecordSource':
    idx = np.asarray(indices)
    return RecordSource(self.records, idx if self.indices is None else self.indices[idx])


def as_source(data) -> ArraySource | RecordSource:
  """``data`` as a source: a source as it is, an ``(images, labels)`` pair as an ArraySource,
  random-access records as a RecordSource."""
  if isinstance(data, (ArraySource, RecordSource)):
    return data
  if isinstance(data, tuple) and len(data) == 2:
    return ArraySource(*data)
  return RecordSource(data)


def load(source: str, name: str, *, data_dir: str | None = None, cache_dir: str | None = None,
         **synthetic_kwargs) -> dict:
  """``{'train': source, 'test': source}`` from ``load_offline``, ``load_tfds`` or
  ``synthetic`` (``name`` unused there)."""
  if source not in SOURCES:
    raise ValueError(f"Unknown data source '{source}'; choose one of {list(SOURCES)}.")
  if synthetic_kwargs and source != 'synthetic':
    raise ValueError(f'{sorted(synthetic_kwargs)} only apply to source=\'synthetic\', '
                     f"not '{source}'.")
  if source == 'offline':
    splits = load_offline(name, data_dir, cache_dir=cache_dir)
  elif source == 'tfds':
    splits = load_tfds(name, data_dir)
  else:
    splits = synthetic(**synthetic_kwargs)
  return {k: as_source(v) for k, v in splits.items()}

