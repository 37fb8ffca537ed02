"""Input pipeline: offline CIFAR arrays, tfds data sources, synthetic data, numpy batching.

Every loader returns ``{'train': (images_NHWC, labels_N), 'test': (images_NHWC, labels_N)}``
with ``uint8`` images and ``int32`` labels (``load_tfds('imagenet2012')`` returns lazy
sources instead, see there). Batching is plain numpy on the host: ``train_batches``
shuffles with ``np.random.default_rng((seed, epoch))``, augments and normalises;
``eval_batches`` pads the last batch and marks it with ``'mask'``. Both also take a lazy
random-access source (``labels=None``): records are decoded per batch in a thread pool,
train images get the inception crop + flip, eval images resize + centre crop. No JAX in here.

Environment variables: ``LRDFA_DATA_DIR`` (root holding ``cifar10/`` etc.),
``LRDFA_CACHE_DIR`` (where decoded arrays are cached as ``.npy``).
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
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

DATASETS = {
    # CIFAR-10 statistics: per-channel pixel mean/std of the train split (meta.json).
    'cifar10': dict(num_classes=10, image_shape=(32, 32, 3),
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    'cifar100': dict(num_classes=100, image_shape=(32, 32, 3),
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    'imagenet2012': dict(num_classes=1000, image_shape=(224, 224, 3),
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}

SOURCES = ('offline', 'tfds', 'synthetic')

# tfds split names per dataset: (train split, split used as 'test').
_TFDS_SPLITS = {'cifar10': ('train', 'test'), 'cifar100': ('train', 'test'),
                'imagenet2012': ('train', 'validation')}

# Tag mixed into augmentation seeds so they never collide with the epoch permutation
# seed: numpy's SeedSequence pads entropy with zeros, so (s, e) and (s, e, 0) are equal.
_AUG_TAG = 0x617567

_FIX_HINT = ("Set LRDFA_DATA_DIR (or --config.data.data_dir) to the folder that holds "
             "'<name>/meta.json', or use source='tfds' or source='synthetic'.")


# ----------------------------------------------------------------------------- paths


def _candidate_roots() -> list[pathlib.Path]:
  repo_root = pathlib.Path(__file__).resolve().parent.parent
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


def load(source: str, name: str, *, data_dir: str | None = None, cache_dir: str | None = None,
         **synthetic_kwargs) -> dict:
  """Dispatches to ``load_offline``, ``load_tfds`` or ``synthetic`` (``name`` unused there)."""
  if source not in SOURCES:
    raise ValueError(f"Unknown data source '{source}'; choose one of {list(SOURCES)}.")
  if synthetic_kwargs and source != 'synthetic':
    raise ValueError(f'{sorted(synthetic_kwargs)} only apply to source=\'synthetic\', '
                     f"not '{source}'.")
  if source == 'offline':
    return load_offline(name, data_dir, cache_dir=cache_dir)
  if source == 'tfds':
    return load_tfds(name, data_dir)
  return synthetic(**synthetic_kwargs)


# ----------------------------------------------------------------------------- transforms


def normalize(images_uint8: np.ndarray, mean, std) -> np.ndarray:
  """``(x / 255 - mean) / std`` in float32, per channel (last axis)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  scale = 1.0 / (255.0 * std)
  return np.asarray(images_uint8, np.float32) * scale - mean / std


def _draw_crop_flip(rng: np.random.Generator, num: int, pad: int):
  offsets = rng.integers(0, 2 * pad + 1, size=(num, 2))
  flips = rng.random(num) < 0.5
  return offsets, flips


def _crop_flip(images_NHWC: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
               pad: int) -> np.ndarray:
  n, h, w, _ = images_NHWC.shape
  padded = np.pad(images_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows_NH = offsets[:, :1] + np.arange(h)
  cols_NW = offsets[:, 1:] + np.arange(w)
  cols_NW = np.where(flips[:, None], cols_NW[:, ::-1], cols_NW)
  return padded[np.arange(n)[:, None, None], rows_NH[:, :, None], cols_NW[:, None, :]]


def augment_cifar(images_NHWC_uint8: np.ndarray, rng: np.random.Generator,
                  pad: int = 4) -> np.ndarray:
  """Zero-pads by ``pad``, takes a random HxW crop and flips half the images left-right."""
  offsets, flips = _draw_crop_flip(rng, len(images_NHWC_uint8), pad)
  return _crop_flip(images_NHWC_uint8, offsets, flips, pad)


def _resize(image_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear with Pillow if installed, else nearest neighbour in numpy."""
  if importlib.util.find_spec('PIL') is not None:
    from PIL import Image
    return np.asarray(Image.fromarray(image_HWC).resize((width, height), Image.BILINEAR))
  rows = (np.arange(height) * image_HWC.shape[0]) // height
  cols = (np.arange(width) * image_HWC.shape[1]) // width
  return image_HWC[rows[:, None], cols[None, :]]


def inception_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """The inception crop ``(y, x, crop_h, crop_w)`` of an ``h``×``w`` image: 8-100 % of the
  area, aspect 3/4-4/3, 10 tries, else the central square."""
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  side = min(h, w)
  return (h - side) // 2, (w - side) // 2, side, side


def augment_inception(image_HWC_uint8: np.ndarray, rng: np.random.Generator,
                      size: int = 224) -> np.ndarray:
  """Inception crop (:func:`inception_box`), resize to ``size``x``size``, random left-right
  flip."""
  y, x, ch, cw = inception_box(*image_HWC_uint8.shape[:2], rng)
  out = _resize(np.ascontiguousarray(image_HWC_uint8[y:y + ch, x:x + cw]), size, size)
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def _center_shape(h: int, w: int, size: int, crop_fraction: float) -> tuple[int, int]:
  short = round(size / crop_fraction)
  return max(size, round(h * short / min(h, w))), max(size, round(w * short / min(h, w)))


def resize_center_crop(image_HWC_uint8: np.ndarray, size: int = 224,
                       crop_fraction: float = 0.875) -> np.ndarray:
  """ImageNet eval: resize the short side to ``size / crop_fraction``, crop the centre."""
  nh, nw = _center_shape(*image_HWC_uint8.shape[:2], size, crop_fraction)
  resized = _resize(image_HWC_uint8, nh, nw)
  y, x = (nh - size) // 2, (nw - size) // 2
  return np.ascontiguousarray(resized[y:y + size, x:x + size])


# Encoded images (JPEG bytes from a tfds source read with SkipDecoding): decoded with Pillow
# straight to RGB, whatever the file holds (greyscale, CMYK, palette or RGBA, a PNG named
# .JPEG, as real ImageNet has), and, for JPEGs larger than the crop needs, at a reduced DCT
# scale (Pillow's draft mode: 1/2, 1/4 or 1/8), which skips most of the decoding work.

def _open(data: bytes):
  import io

  from PIL import Image
  return Image.open(io.BytesIO(data))


def _rgb(img, want_w: float, want_h: float):
  """``(image, scale)``: ``img`` decoded to RGB at the smallest JPEG scale (1, 1/2, 1/4 or
  1/8) keeping at least ``want_w``×``want_h`` pixels of the full image (always 1 for other
  formats). A reduced image's last row and column may cover only part of a block, so
  coordinates map by ``scale``, not by the ratio of sizes."""
  w = img.size[0]
  if img.format == 'JPEG':
    img.draft('RGB', (max(1, math.ceil(want_w)), max(1, math.ceil(want_h))))
  scale = 1.0 / max(1, round(w / img.size[0]))
  return (img if img.mode == 'RGB' else img.convert('RGB')), scale


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> ``uint8`` HWC RGB (full size)."""
  img = _open(data)
  return np.asarray(_rgb(img, *img.size)[0])


def decode_inception(data: bytes, rng: np.random.Generator, size: int = 224) -> np.ndarray:
  """:func:`augment_inception` of encoded bytes, with the same draws; the crop is taken
  from a reduced-scale decode when that still gives it at least ``size`` pixels a side."""
  from PIL import Image
  img = _open(data)
  w, h = img.size
  y, x, ch, cw = inception_box(h, w, rng)
  f = min(1.0, max(size / cw, size / ch))
  img, k = _rgb(img, w * f, h * f)
  out = img.resize((size, size), Image.BILINEAR, box=(x * k, y * k, (x + cw) * k, (y + ch) * k))
  out = np.asarray(out)
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def decode_center_crop(data: bytes, size: int = 224, crop_fraction: float = 0.875
                       ) -> np.ndarray:
  """:func:`resize_center_crop` of encoded bytes (reduced-scale decode where it can)."""
  from PIL import Image
  img = _open(data)
  w, h = img.size
  nh, nw = _center_shape(h, w, size, crop_fraction)
  img, k = _rgb(img, nw, nh)
  resized = np.asarray(img.resize((nw, nh), Image.BILINEAR, box=(0, 0, w * k, h * k)))
  y, x = (nh - size) // 2, (nw - size) // 2
  return np.ascontiguousarray(resized[y:y + size, x:x + size])


def _inception_any(image, rng, size):
  if isinstance(image, bytes):
    return decode_inception(image, rng, size)
  return augment_inception(image, rng, size)


def _center_any(image, size):
  if isinstance(image, bytes):
    return decode_center_crop(image, size)
  return resize_center_crop(image, size)


# ----------------------------------------------------------------------------- batching


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


def _check_pair(images, labels) -> None:
  if labels is None:
    if isinstance(images, np.ndarray) or not hasattr(images, '__getitem__'):
      raise ValueError('labels=None means a lazy random-access source of {image, label} '
                       f'records; got {type(images).__name__}. Pass labels with arrays.')
    return
  if len(images) != len(labels):
    raise ValueError(f'{len(images)} images but {len(labels)} labels.')


class Subset:
  """Some records of a random-access source, e.g. a held-out slice of a lazy train split."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def _decode_batch(pool: ThreadPoolExecutor, source, indices, transform) -> tuple:
  """Reads and transforms records in the pool: (uint8 NHWC images, int32 labels)."""
  def one(pos_index):
    pos, index = pos_index
    record = source[int(index)]
    image = record['image']
    if not isinstance(image, bytes):  # a decoded array (a source read without SkipDecoding)
      image = np.asarray(image)
      if image.ndim == 2:  # grayscale JPEGs
        image = np.repeat(image[:, :, None], 3, axis=2)
    return transform(pos, image), record['label']
  out = list(pool.map(one, enumerate(indices)))
  return (np.stack([o[0] for o in out]).astype(np.uint8),
          np.asarray([o[1] for o in out], np.int32))


def train_batches(images, labels: np.ndarray | None, *, batch_size: int, seed: int,
                  epoch: int, augment: bool = True, mean, std, process_index: int = 0,
                  process_count: int = 1, start_batch: int = 0, image_size: int = 224,
                  workers: int = 16) -> Iterator[dict]:
  """One shuffled epoch of ``{'image': f32 NHWC normalised, 'label': i32}`` batches.

  ``batch_size`` is global; this process gets its contiguous ``batch_size /
  process_count`` slice of each. Order from ``default_rng((seed, epoch))``, remainder
  dropped. Crops/flips are drawn per global batch from ``(seed, epoch, batch index)``,
  so they do not depend on ``start_batch`` (resume) or ``process_count``.

  With ``labels=None``, ``images`` is a lazy source (``len`` and ``source[i] -> {'image',
  'label'}``): each record is decoded in a pool of ``workers`` threads and given the
  inception crop + flip (``augment``) or resize + centre crop, to ``image_size``.
  """
  _check_pair(images, labels)
  local = _local_size(batch_size, process_index, process_count)
  num_batches = num_train_batches(len(images), batch_size)
  if num_batches == 0:
    raise ValueError(f'batch_size {batch_size} is larger than the {len(images)} training '
                     'examples; use a smaller batch.')
  if not 0 <= start_batch <= num_batches:
    raise ValueError(f'start_batch {start_batch} not in [0, {num_batches}] (batches per '
                     'epoch).')
  if labels is None:
    return _source_train_batches(images, batch_size, seed, epoch, augment, mean, std,
                                 process_index * local, local, start_batch, num_batches,
                                 image_size, workers)
  return _train_batches(images, labels, batch_size, seed, epoch, augment, mean, std,
                        process_index * local, local, start_batch, num_batches)


def _source_train_batches(source, batch_size, seed, epoch, augment, mean, std, lo, local,
                          start_batch, num_batches, size, workers):
  perm = np.random.default_rng((seed, epoch)).permutation(len(source))
  with ThreadPoolExecutor(workers) as pool:
    for b in range(start_batch, num_batches):
      def transform(pos, image, b=b):  # per example, from its global position in the batch
        if not augment:
          return _center_any(image, size)
        return _inception_any(image, np.random.default_rng((seed, epoch, _AUG_TAG, b,
                                                            lo + pos)), size)
      idx = perm[b * batch_size:(b + 1) * batch_size][lo:lo + local]
      batch_images, batch_labels = _decode_batch(pool, source, idx, transform)
      yield {'image': normalize(batch_images, mean, std), 'label': batch_labels}


def _train_batches(images, labels, batch_size, seed, epoch, augment, mean, std, lo, local,
                   start_batch, num_batches):
  perm = np.random.default_rng((seed, epoch)).permutation(len(images))
  for b in range(start_batch, num_batches):
    idx = perm[b * batch_size:(b + 1) * batch_size][lo:lo + local]
    batch_images = np.asarray(images[idx])
    if augment:
      rng = np.random.default_rng((seed, epoch, _AUG_TAG, b))
      offsets, flips = _draw_crop_flip(rng, batch_size, 4)
      batch_images = _crop_flip(batch_images, offsets[lo:lo + local], flips[lo:lo + local], 4)
    yield {'image': normalize(batch_images, mean, std),
           'label': np.asarray(labels[idx], np.int32)}


def eval_batches(images, labels: np.ndarray | None, *, batch_size: int, mean, std,
                 process_index: int = 0, process_count: int = 1, image_size: int = 224,
                 workers: int = 16) -> Iterator[dict]:
  """Every example once, in order, as ``{'image', 'label', 'mask'}`` batches.

  The last global batch is padded (zero image after normalisation, label 0, mask 0);
  every process yields the same number of batches. ``labels=None``: ``images`` is a lazy
  source, resized and centre-cropped to ``image_size`` (see ``train_batches``).
  """
  _check_pair(images, labels)
  local = _local_size(batch_size, process_index, process_count)
  if labels is None:
    return _source_eval_batches(images, batch_size, mean, std, process_index * local, local,
                                image_size, workers)
  return _eval_batches(images, labels, batch_size, mean, std, process_index * local, local)


def _source_eval_batches(source, batch_size, mean, std, lo, local, size, workers):
  num = len(source)
  with ThreadPoolExecutor(workers) as pool:
    for start in range(0, num, batch_size):
      begin, end = min(start + lo, num), min(start + lo + local, num)
      image = np.zeros((local, size, size, 3), np.float32)
      label = np.zeros((local,), np.int32)
      mask = np.zeros((local,), np.float32)
      if end > begin:
        images, labels = _decode_batch(pool, source, range(begin, end),
                                       lambda pos, im: _center_any(im, size))
        image[:end - begin] = normalize(images, mean, std)
        label[:end - begin] = labels
        mask[:end - begin] = 1.0
      yield {'image': image, 'label': label, 'mask': mask}


def _eval_batches(images, labels, batch_size, mean, std, lo, local):
  num = len(images)
  for start in range(0, num, batch_size):
    begin = min(start + lo, num)
    end = min(start + lo + local, num)
    real = end - begin
    image = np.zeros((local, *images.shape[1:]), np.float32)
    label = np.zeros((local,), np.int32)
    mask = np.zeros((local,), np.float32)
    image[:real] = normalize(images[begin:end], mean, std)
    label[:real] = labels[begin:end]
    mask[:real] = 1.0
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
