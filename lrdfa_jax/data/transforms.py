"""Image transforms on ``uint8`` HWC / NHWC arrays and encoded bytes: normalisation, the CIFAR
pad-crop + flip (batched), the inception crop + flip and the resize + centre crop (per image,
also straight from JPEG bytes at a reduced DCT scale). Pure numpy and Pillow; the random draws
come from the generator the caller passes (:mod:`lrdfa_jax.data.batches` seeds them)."""
from __future__ import annotations

import importlib.util
import math

import numpy as np


def normalize(images_uint8: np.ndarray, mean, std) -> np.ndarray:
  """``(x / 255 - mean) / std`` in float32, per channel (last axis)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  scale = 1.0 / (255.0 * std)
  return np.asarray(images_uint8, np.float32) * scale - mean / std


def draw_crop_flip(rng: np.random.Generator, num: int, pad: int):
  """``num`` crop offsets in ``[0, 2·pad]²`` and left-right flips (each with probability 1/2)."""
  offsets = rng.integers(0, 2 * pad + 1, size=(num, 2))
  flips = rng.random(num) < 0.5
  return offsets, flips


def crop_flip(images_NHWC: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
              pad: int) -> np.ndarray:
  """The ``offsets``/``flips`` crops of the zero-padded batch (:func:`draw_crop_flip`)."""
  n, h, w, _ = images_NHWC.shape
  padded = np.pad(images_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows_NH = offsets[:, :1] + np.arange(h)
  cols_NW = offsets[:, 1:] + np.arange(w)
  cols_NW = np.where(flips[:, None], cols_NW[:, ::-1], cols_NW)
  return padded[np.arange(n)[:, None, None], rows_NH[:, :, None], cols_NW[:, None, :]]


def augment_cifar(images_NHWC_uint8: np.ndarray, rng: np.random.Generator,
                  pad: int = 4) -> np.ndarray:
  """Zero-pads by ``pad``, takes a random HxW crop and flips half the images left-right."""
  offsets, flips = draw_crop_flip(rng, len(images_NHWC_uint8), pad)
  return crop_flip(images_NHWC_uint8, offsets, flips, pad)


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


def inception_any(image, rng, size):
  """:func:`decode_inception` of bytes, :func:`augment_inception` of an array."""
  if isinstance(image, bytes):
    return decode_inception(image, rng, size)
  return augment_inception(image, rng, size)


def center_any(image, size):
  """:func:`decode_center_crop` of bytes, :func:`resize_center_crop` of an array."""
  if isinstance(image, bytes):
    return decode_center_crop(image, size)
  return resize_center_crop(image, size)
