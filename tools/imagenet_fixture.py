"""A tiny ``imagenet2012`` of real JPEGs, prepared as tfds array_record without TensorFlow.

  python -m tools.imagenet_fixture --data_dir=/tmp/in1k_fixture
  python -m experiments.main --config=configs/imagenet.py --config.data.data_dir=/tmp/in1k_fixture \\
      --config.data.image_size=64 --config.train.batch_size=8 --workdir=/tmp/in1k_run

Writes ``DATA_DIR/imagenet2012/5.1.0/`` in the layout and record format of tfds'
``imagenet2012`` (the same features: JPEG ``image``, ``label`` over its 1000 classes,
``file_name``), so ``tfds.data_source('imagenet2012', data_dir=DATA_DIR)`` and the
``configs/imagenet.py`` pipeline read it exactly as they read a real prepared copy. The images
are crops of a real photograph (matplotlib's ``grace_hopper.jpg``, installed with matplotlib)
at varied sizes and aspect ratios, with the odd files real ImageNet has: a greyscale JPEG, a
CMYK JPEG, a PNG named ``.JPEG``, and an image smaller than the crop. ``--typical`` makes
every image ImageNet's typical 500×375 (quality 90) instead, for input-throughput benchmarks.
Deterministic in ``--seed``. About a second for the default 16 + 8 images.
"""
from __future__ import annotations

import argparse
import io
import os

import numpy as np

ODD = ('greyscale', 'cmyk', 'png', 'tiny')  # the first training images of every build


def photo():
  """The source photograph (512×600 RGB JPEG shipped with matplotlib)."""
  import matplotlib
  from PIL import Image
  return Image.open(os.path.join(matplotlib.get_data_path(), 'sample_data', 'grace_hopper.jpg')
                    ).convert('RGB')


def _encode(img, fmt: str = 'JPEG') -> bytes:
  out = io.BytesIO()
  img.save(out, format=fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
  return out.getvalue()


def make_image(src, rng: np.random.Generator, kind: str = 'rgb', *, typical: bool = False,
               min_side: int = 40, max_side: int = 160) -> bytes:
  """Encoded bytes of one crop of ``src``: ``kind`` is ``'rgb'`` or one of :data:`ODD`."""
  from PIL import Image
  w, h = src.size
  cw, ch = int(rng.integers(w // 3, w + 1)), int(rng.integers(h // 3, h + 1))
  x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
  if typical:
    size = (500, 375) if rng.random() < 0.75 else (375, 500)
  elif kind == 'tiny':
    size = (int(rng.integers(12, 24)), int(rng.integers(12, 24)))
  else:  # varied sizes and aspect ratios, up to 3:1
    short = int(rng.integers(min_side, max_side // 2 + 1))
    long = int(rng.integers(short, min(max_side, 3 * short) + 1))
    size = (long, short) if rng.random() < 0.5 else (short, long)
  img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
  if kind == 'greyscale':
    return _encode(img.convert('L'))
  if kind == 'cmyk':
    return _encode(img.convert('CMYK'))
  if kind == 'png':
    return _encode(img, 'PNG')
  return _encode(img)


def build(data_dir: str, *, train_per_class: int = 4, val_per_class: int = 2,
          num_classes: int = 4, typical: bool = False, seed: int = 0) -> str:
  """Prepares the fixture under ``data_dir``; returns the dataset folder. Classes are the
  first ``num_classes`` of ImageNet's 1000 (labels ``0..num_classes-1``)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  src = photo()
  names_file = imagenet_common.label_names_file()
  with open(names_file) as f:
    synsets = f.read().split()

  def examples(split: str, per_class: int):
    rng = np.random.default_rng((seed, split == 'validation'))
    for i in range(per_class * num_classes):
      label = i % num_classes
      kind = ODD[i] if split == 'train' and i < len(ODD) and not typical else 'rgb'
      name = (f'{synsets[label]}_{i}.JPEG' if split == 'train'
              else f'ILSVRC2012_val_{i + 1:08d}.JPEG')
      yield name, {'image': make_image(src, rng, kind, typical=typical), 'label': label,
                   'file_name': name}

  class Imagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('5.1.0')  # the version tfds.data_source looks for

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, supervised_keys=('image', 'label'),
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(encoding_format='jpeg'),
              'label': tfds.features.ClassLabel(names_file=names_file),
              'file_name': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples('train', train_per_class),
              'validation': self._generate_examples('validation', val_per_class)}

    def _generate_examples(self, split, per_class):
      yield from examples(split, per_class)

  from lrdfa_jax.data.sources import _quiet_absl
  tfds.disable_progress_bar()
  with _quiet_absl():
    builder = Imagenet2012(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--data_dir', required=True)
  p.add_argument('--train_per_class', type=int, default=4)
  p.add_argument('--val_per_class', type=int, default=2)
  p.add_argument('--num_classes', type=int, default=4)
  p.add_argument('--typical', action='store_true', help='every image 500×375 (benchmarks)')
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args(argv)
  print(build(a.data_dir, train_per_class=a.train_per_class, val_per_class=a.val_per_class,
              num_classes=a.num_classes, typical=a.typical, seed=a.seed))


if __name__ == '__main__':
  main()
