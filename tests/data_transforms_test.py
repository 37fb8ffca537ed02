"""Transforms: normalisation, CIFAR crop + flip, inception crop, resize + centre crop."""

import numpy as np

from lrdfa_jax import data

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


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
