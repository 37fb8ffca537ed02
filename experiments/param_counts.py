"""Trainable parameters of every model in its dense and its SVD form, as a markdown table.

Command (from the repository root; shapes only, nothing runs; ~1 minute on CPU)::

  python -m experiments.param_counts            # every model config
  python -m experiments.param_counts --configs='zoo:resnet20,cifar10 cifar100' --rank=0.5

For each config: ``bp``/``dfa`` train the dense model, ``svd_bp``/``ssa`` the factored one at
the config's ``model.rank`` with its ``model.overrides`` (layers kept dense are counted in
full). Trainable = everything in ``params`` (BatchNorm scale and shift included, running
statistics not). The fixed feedback is no parameter (no optimizer sees it), but it is memory:
its entries are listed for ``dfa`` (dense ``d_i × C`` per block) and ``ssa`` (structured,
``k_i (d_i + C + 1)`` per block).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lrdfa_jax import build, metrics, models, steps as steps_lib

CONFIGS = ('cifar10', *(f'zoo:{m},cifar10' for m in ('vgg13', 'resnet20', 'resnet32', 'resnet56',
                                                     'mobilenet_v1')),
           'zoo:resnet18,imagenet2012', 'zoo:resnet50,imagenet2012')


def _load(name: str):
  """``cifar10``, ``configs/cifar10.py`` or ``zoo:resnet20,cifar10`` (file:argument)."""
  path, _, arg = name.partition(':')
  module = path.removeprefix('configs/').removesuffix('.py').replace('/', '.')
  get = importlib.import_module(f'configs.{module}').get_config
  return get(arg) if arg else get()


def count(config, method: str) -> dict:
  """Trainable params and fixed-feedback entries of ``config`` under ``method`` (shapes only)."""
  c = config.copy_and_resolve_references()
  c.dfa.method = method
  info = build.dataset_info(c)
  model = build.build_model(c, info['num_classes'])
  x = jnp.zeros((1, *info['image_shape']), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  params = variables['params']
  taps = build.tap_shapes(model, info['image_shape'])
  feedback = jax.eval_shape(lambda p: build.build_feedback(c, jax.random.key(1), p, taps,
                                                           info['num_classes']), params)
  factored = method in steps_lib.FACTORED_METHODS
  overrides = build.parse_overrides(c.model.overrides) if factored else {}
  return {'params': metrics.param_count(params), 'feedback': metrics.param_count(feedback.groups),
          'unmatched': models.unmatched_overrides(params, overrides),
          'shape': info['image_shape'], 'classes': info['num_classes']}


def table(names: Sequence[str], rank: float | None = None) -> str:
  rows = ['| model | config | input, classes | dense: bp, dfa | SVD: svd_bp, ssa | SVD / dense '
          '| rank, split; kept dense | fixed feedback entries: dfa / ssa |',
          '|---|---|---|---:|---:|---:|---|---:|']
  for name in names:
    config = _load(name)
    if rank is not None:
      config.model.rank = rank
    dense, dfa = count(config, 'bp'), count(config, 'dfa')
    svd, ssa = count(config, 'svd_bp'), count(config, 'ssa')
    assert dense['params'] == dfa['params'] and svd['params'] == ssa['params']
    if svd['unmatched']:
      print(f'warning: {name}: model.overrides {svd["unmatched"]} match no layer',
            file=sys.stderr)
    h, w, _ = dense['shape']
    rows.append(
        f'| {config.model.name} | `{name}` | {h}×{w}, {dense["classes"]} '
        f'| {dense["params"]:,} | {svd["params"]:,} | {svd["params"] / dense["params"]:.2f} '
        f'| {config.model.rank:g}, {config.model.split}; `{config.model.overrides or "-"}` '
        f'| {dfa["feedback"]:,} / {ssa["feedback"]:,} |')
  return '\n'.join(rows)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--configs', default=' '.join(CONFIGS),
                      help='space separated config names (x, configs/x.py, zoo:MODEL,DATASET)')
  parser.add_argument('--rank', type=float, default=None,
                      help='override model.rank of every config')
  args = parser.parse_args(argv)
  print(table([n for n in args.configs.split() if n], args.rank))


if __name__ == '__main__':
  main()
