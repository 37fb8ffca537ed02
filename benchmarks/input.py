r"""ImageNet input throughput: decoded + augmented images/s, per thread count, on real JPEGs.

  python -m benchmarks.input --images=96 --threads=1,2 --out=benchmarks/results/cpu_input_imagenet.json

What is measured. ``--images`` real JPEGs at ImageNet's typical 500×375 (quality 90; crops of
a photograph, tools/imagenet_fixture.py ``--typical``) are prepared once in the tfds
``imagenet2012`` format and read back through ``lrdfa_jax.data`` exactly as a training run
reads them, then each path below runs ``--rounds`` times over all images (best round kept):

- ``train``: ``data.train_batches`` (JPEG bytes -> inception crop + flip at ``--size``,
  normalised float32 batches), with ``workers`` = each ``--threads`` value;
- ``eval``: ``data.eval_batches`` (resize + centre crop);
- ``train_full_decode``: the same crops from fully decoded arrays (``decode_image`` then
  ``augment_inception``: what the pipeline did before it decoded JPEGs at reduced scale and
  cropped inside Pillow), one thread, for the gain;
- ``train_bytes_transform``: ``decode_inception`` alone (the train path without batching and
  normalisation), one thread;
- ``decode_only``: ``decode_image`` at full size, one thread.

Reported: images/s, images/s per thread, and "threads per GPU": how many such threads one
accelerator would need at the ResNet-50 training rate of the flax ImageNet example
(``--gpu_images_per_s``, default 1,034/s: v100_x8_mixed_precision, 100 epochs of 1.28 M images
in 4.3 h over 8 GPUs, flax/examples/imagenet/README.md; fp32 on V100 is 337/s).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

from lrdfa_jax import data

FLAX_RESNET50_V100_MIXED = 128.1e6 / (4.3 * 3600) / 8  # images/s per GPU, ~1,034


def _rate(fn, n: int, rounds: int) -> float:
  best = float('inf')
  for _ in range(rounds):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return n / best


def measure(source, *, threads, size: int, batch_size: int, rounds: int) -> dict:
  info = data.DATASETS['imagenet2012']
  kw = dict(mean=info['mean'], std=info['std'], image_size=size)
  n_train = data.num_train_batches(len(source), batch_size) * batch_size
  out = {'train': {}, 'eval': {}}
  records = data.RecordSource(source)
  for t in threads:
    out['train'][t] = _rate(lambda: list(data.train_batches(
        records, batch_size=batch_size, seed=0, epoch=0, workers=t, **kw)), n_train, rounds)
    out['eval'][t] = _rate(lambda: list(data.eval_batches(
        records, batch_size=batch_size, workers=t, **kw)), len(source), rounds)
  blobs = [source[i]['image'] for i in range(len(source))]

  def full_decode():
    for i, b in enumerate(blobs):
      data.augment_inception(data.decode_image(b), np.random.default_rng(i), size)

  def crop_bytes():
    for i, b in enumerate(blobs):
      data.decode_inception(b, np.random.default_rng(i), size)

  out['train_full_decode'] = {1: _rate(full_decode, len(blobs), rounds)}
  out['train_bytes_transform'] = {1: _rate(crop_bytes, len(blobs), rounds)}
  out['decode_only'] = {1: _rate(lambda: [data.decode_image(b) for b in blobs], len(blobs),
                                 rounds)}
  return out


def markdown(record: dict) -> str:
  rows = ['| path | threads | images/s | images/s per thread | threads per GPU* |',
          '|---|---:|---:|---:|---:|']
  for path, by_threads in record['images_per_s'].items():
    for t, r in by_threads.items():
      rows.append(f'| {path} | {t} | {r:,.0f} | {r / int(t):,.0f} | '
                  f'{record["gpu_images_per_s"] / (r / int(t)):.1f} |')
  return ('\n'.join(rows) + f'\n\n{record["images"]} JPEGs of 500×375, crops to '
          f'{record["size"]}×{record["size"]}, best of {record["rounds"]} rounds; '
          f'{record["cpu"]} ({record["cpu_count"]} cores), Pillow {record["pillow"]}.\n'
          f'*at {record["gpu_images_per_s"]:,.0f} images/s per GPU (ResNet-50, flax '
          'ImageNet example, V100 mixed precision).\n')


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--images', type=int, default=96)
  p.add_argument('--threads', default='1,2', help='comma separated worker-thread counts')
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--gpu_images_per_s', type=float, default=FLAX_RESNET50_V100_MIXED)
  p.add_argument('--data_dir', default=None, help='reuse (or keep) the prepared JPEGs here')
  p.add_argument('--out', default=None, help='JSON path (a .md beside it)')
  a = p.parse_args(argv)
  threads = [int(t) for t in a.threads.split(',')]
  from PIL import __version__ as pillow

  from benchmarks.step import machine_info, print_and_save
  from tools import imagenet_fixture
  with tempfile.TemporaryDirectory() as tmp:
    root = a.data_dir or tmp
    if not os.path.isdir(os.path.join(root, 'imagenet2012')):
      imagenet_fixture.build(root, train_per_class=-(-a.images // 4), val_per_class=1,
                             num_classes=4, typical=True)
    source = data.load_tfds('imagenet2012', root)['train']
    rates = measure(source, threads=threads, size=a.size, batch_size=a.batch_size,
                    rounds=a.rounds)
  m = machine_info()
  record = {'images': len(source), 'size': a.size, 'batch_size': a.batch_size,
            'rounds': a.rounds, 'images_per_s': rates, 'gpu_images_per_s': a.gpu_images_per_s,
            'cpu': m['cpu'], 'cpu_count': m['cpu_count'], 'pillow': pillow,
            'python': platform.python_version(),
            'command': 'python -m benchmarks.input ' + ' '.join(sys.argv[1:] if argv is None
                                                                else argv)}
  md = markdown(record)
  print_and_save(a.out, record, md)
  return record


if __name__ == '__main__':
  main()
