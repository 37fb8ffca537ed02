"""The first batches of every source, pinned by hash: the augmentation draws (CIFAR crops per
global batch from ``(seed, epoch, tag, b)``, ImageNet crops per example from ``(…, b, pos)``),
the shuffles, the process slices, the decode and the normalisation must not change.

A failure here means batches differ from what every committed result was trained on; update
a pin only for a change meant to move them, and say so in the commit."""
import hashlib

import numpy as np

from configs import default
from lrdfa_jax import build, data
from tests.conftest import FakeRecords

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PINS = {
    'synthetic_train': '48133d9492c70105b64507a929ed83aa242808688d4be9ff47ec40c330ff69ef',
    'synthetic_eval': 'ab04dba6dcd5c02cf0da87c013df43d977edf85370457e8d2592baac2f5f0993',
    'records_train': 'e0fb062cfe7b3909e4c8b05bc8a5e213d62992ee7b885b75c686f81d69f79645',
    'records_eval': '136fcffb991f7157ebad9c49a7b7c3e78981795d915ccf2968c8d489c07c9e0a',
    'cifar10_train': '276be52381785549d162b08bb942304e6427274ca039153aadaa25036fffe9dd',
    'cifar10_eval': '81d4181f62756850c461135f02ac1f7696a121afd4341d8fd44063d4fe26fd44',
    'imagenet_train': 'f654b60cc8677a67db7e2fade427171b93f3b3e7c587c8763ba3c9f99576a76e',
    'heldout_train': '2bee92231fd67bb0ec1a133a39e3f0bcb548cb4580d7dee31157090031cdd2f7',
    'heldout_validation': '1753a7816fe23af5c32772be00d767eee7473e63feca84511c823dc5dabc4895',
    'imagenet_eval': '5e3bf536488c70592765ec157648ef30a7a366ed256eaa0fc85b0948b99b2d0a',
}


def _digest(batches) -> str:
  h = hashlib.sha256()
  for b in batches:
    for key in sorted(b):
      h.update(key.encode())
      h.update(str(b[key].dtype).encode() + str(b[key].shape).encode())
      h.update(np.ascontiguousarray(b[key]).tobytes())
  return h.hexdigest()


def _check(name, batches):
  got = _digest(batches)
  print(name, got)
  assert got == PINS[name], f'{name}: the batches changed ({got})'


def test_synthetic_batches_are_pinned():
  ds = data.synthetic(num_train=300, num_test=100, image_shape=(32, 32, 3), num_classes=10,
                      seed=5)
  kw = dict(mean=MEAN, std=STD, process_index=1, process_count=2)
  train, test = data.ArraySource(*ds['train']), data.ArraySource(*ds['test'])
  _check('synthetic_train', list(data.train_batches(train, batch_size=64, seed=1, epoch=2,
                                                    start_batch=1, **kw)))
  _check('synthetic_eval', list(data.eval_batches(test, batch_size=48, **kw)))


def test_record_batches_are_pinned():
  src = data.RecordSource(FakeRecords(21))
  kw = dict(mean=MEAN, std=STD, image_size=16, workers=3, process_index=1, process_count=2)
  _check('records_train', list(data.train_batches(src, batch_size=8, seed=3, epoch=1, **kw)))
  _check('records_eval', list(data.eval_batches(src, batch_size=8, **kw)))


def test_cifar10_first_batches_are_pinned(cifar10):
  train = data.ArraySource(*cifar10['ds']['train'])
  test = data.ArraySource(*cifar10['ds']['test'])
  info = data.DATASETS['cifar10']
  kw = dict(batch_size=128, mean=info['mean'], std=info['std'])
  _check('cifar10_train', [next(data.train_batches(train, seed=0, epoch=0, **kw))])
  _check('cifar10_eval', [next(data.eval_batches(test, **kw))])


def test_imagenet_first_batches_are_pinned(imagenet_jpegs):
  lazy = data.load('tfds', 'imagenet2012', data_dir=imagenet_jpegs)
  info = data.DATASETS['imagenet2012']
  kw = dict(batch_size=8, mean=info['mean'], std=info['std'], image_size=32, workers=2)
  _check('imagenet_train', [next(data.train_batches(lazy['train'], seed=0, epoch=0,
                                                    **kw))])
  _check('imagenet_eval', [next(data.eval_batches(lazy['test'], **kw))])


def test_held_out_split_is_pinned():
  """``data.validation_size``: the fixed split of the training set (seed-independent)."""
  c = default.get_config()
  c.data.source = 'synthetic'
  c.data.synthetic.update(num_train=200, num_test=10, image_shape=(32, 32, 3), num_classes=10)
  c.data.validation_size = 50
  splits = build.load_data(c)
  kw = dict(batch_size=32, mean=MEAN, std=STD)
  _check('heldout_train', [next(data.train_batches(splits['train'], seed=0, epoch=0, **kw))])
  _check('heldout_validation', list(data.eval_batches(splits['validation'], **kw)))
