"""Input pipeline: sources (offline CIFAR, tfds, synthetic), transforms, numpy batching.

``data.load(source, name)`` gives ``{'train': source, 'test': source}``; ``train_batches`` and
``eval_batches`` turn any source into normalised float32 batches on the host. Modules:
:mod:`~lrdfa_jax.data.sources` (readers, the checksummed offline cache, ``ArraySource`` /
``RecordSource``), :mod:`~lrdfa_jax.data.transforms` (crops, flips, resizes, JPEG decode),
:mod:`~lrdfa_jax.data.batches` (shuffling, process slices, augmentation draws, prefetch).

Environment variables: ``LRDFA_DATA_DIR`` (root holding ``cifar10/`` etc.),
``LRDFA_CACHE_DIR`` (where decoded arrays are cached as ``.npy``).
"""
from lrdfa_jax.data.batches import eval_batches, num_train_batches, prefetch, train_batches
from lrdfa_jax.data.sources import (DATASETS, SOURCES, ArraySource, RecordSource, as_source,
                                    default_cache_dir, default_offline_root, load, load_offline,
                                    load_tfds, synthetic)
from lrdfa_jax.data.transforms import (augment_cifar, augment_inception, crop_flip,
                                       decode_center_crop, decode_image, decode_inception,
                                       draw_crop_flip, inception_box, normalize,
                                       resize_center_crop)

__all__ = ['DATASETS', 'SOURCES', 'ArraySource', 'RecordSource', 'as_source', 'augment_cifar',
           'augment_inception', 'crop_flip', 'decode_center_crop', 'decode_image',
           'decode_inception', 'default_cache_dir', 'default_offline_root', 'draw_crop_flip',
           'eval_batches', 'inception_box', 'load', 'load_offline', 'load_tfds', 'normalize',
           'num_train_batches', 'prefetch', 'resize_center_crop', 'synthetic', 'train_batches']
