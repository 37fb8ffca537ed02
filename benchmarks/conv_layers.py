r"""Every factored conv of a model, run as two thin convs or as its rebuilt kernel, per shape.

Command (writes ``OUT.json`` and ``OUT.md``)::

  python -m benchmarks.conv_layers --models=small_conv,resnet32,vgg13 --ranks=0.25 \
      --out=benchmarks/results/cpu_conv_layers.json

For each model, at the global ``model.rank`` that keeps ``--ranks`` of the dense parameters
(as in :mod:`benchmarks.step`), the model is traced once to list its
:class:`~lrdfa_jax.layers.SVDConv` calls (input map, channels, stride, rank); equal calls are
measured once and counted. Each is jitted as a training step's conv work (forward, the input
gradient and the gradients of ``u``, ``s``, ``v``, bias) under ``execution='factored'`` and
``'kernel'``, with the model's own conv forms (im2col on tiny maps, GEMM kernel gradients on
CPU); the two run interleaved, ``--rounds`` × ``--steps`` calls each after a warm-up, and the
medians are compared in one process. The ``auto`` column is what
``model.conv_execution='auto'`` (:func:`lrdfa_jax.layers.pick_conv_execution`) picks for the
shape, and the per-model totals weigh each shape by its count: the conv time of a step under
each execution, and under the per-shape best.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step import (load_config, print_and_save, provenance, provenance_lines,
                             rank_for_fraction, with_fields)
from lrdfa_jax import build, layers

EXECUTIONS = ('factored', 'kernel')


def svd_conv_calls(config, image_shape, num_classes: int) -> list[dict]:
  """The model's SVDConv calls in forward order: the unbound module and its input shape."""
  model = build.build_model(config, num_classes)
  calls = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.SVDConv) and context.method_name == '__call__':
      calls.append({'module': context.module.clone(parent=None, name=None),
                    'x_shape': tuple(args[0].shape), 'name': context.module.name})
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                      train=False))
  return calls


def shape_key(call: dict) -> tuple:
  m, (_, h, w, cin) = call['module'], call['x_shape']
  r = layers.resolve_rank(m.rank, layers.conv_full_rank((*m.kernel_size, cin, m.features),
                                                        m.split))
  return (h, w, cin, m.features, tuple(m.kernel_size), tuple(m.strides), m.split, r)


def _step(module: layers.SVDConv, execution: str):
  mod = module.clone(execution=execution)

  def loss(params, x):
    y = mod.apply({'params': params}, x)
    return jnp.sum(y * y)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure(call: dict, batch_size: int, steps: int, rounds: int) -> dict:
  module = call['module']
  x = jax.random.normal(jax.random.key(0), (batch_size, *call['x_shape'][1:]))
  params = module.init(jax.random.key(1), x[:1])['params']
  fns = {e: _step(module, e) for e in EXECUTIONS}
  for f in fns.values():
    jax.block_until_ready(f(params, x))  # compile and warm up
  times = {e: [] for e in EXECUTIONS}
  for r in range(rounds):
    for e in (EXECUTIONS if r % 2 == 0 else EXECUTIONS[::-1]):
      for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fns[e](params, x))
        times[e].append(time.perf_counter() - t)
  h, w, cin, cout, (kh, kw), (sh, sw), split, r = shape_key(call)
  return {'map': [h, w, cin], 'features': cout, 'kernel_size': [kh, kw], 'strides': [sh, sw],
          'split': split, 'rank': r, 'batch_size': batch_size,
          **{f'{e}_ms': 1e3 * float(np.median(times[e])) for e in EXECUTIONS},
          'auto': layers.pick_conv_execution((kh, kw, cin, cout))}


def measure_model(config, fraction: float, image_shape, num_classes: int, batch_size: int,
                  steps: int, rounds: int) -> dict:
  rank, achieved = rank_for_fraction(config, fraction, image_shape, num_classes)
  config = with_fields(config, dfa__method='svd_bp', model__rank=rank)
  groups: dict[tuple, dict] = {}
  for call in svd_conv_calls(config, image_shape, num_classes):
    g = groups.setdefault(shape_key(call), {'call': call, 'layers': []})
    g['layers'].append(call['name'])
  records = []
  for g in groups.values():
    rec = measure(g['call'], batch_size, steps, rounds)
    records.append({**rec, 'count': len(g['layers']), 'layers': g['layers']})
  total = {e: sum(r['count'] * r[f'{e}_ms'] for r in records) for e in EXECUTIONS}
  total['auto'] = sum(r['count'] * r[f'{r["auto"]}_ms'] for r in records)
  total['best'] = sum(r['count'] * min(r[f'{e}_ms'] for e in EXECUTIONS) for r in records)
  return {'model': config.model.name, 'target_param_fraction': fraction,
          'param_fraction': achieved, 'model_rank': rank, 'shapes': records, 'total_ms': total}


def markdown(doc: dict) -> str:
  lines = provenance_lines(doc) + [
      'Each factored conv of the model (equal shapes measured once, `n` = how many), batch '
      f'{doc["batch_size"]}: forward + input gradient + factor gradients, median of interleaved '
      'calls. `factored`: the two thin convs (`model.conv_execution=\'factored\'`); `kernel`: '
      'the dense kernel `V diag(s) Uᵀ` rebuilt each call and run as one conv. `auto`: what '
      '`model.conv_execution=\'auto\'` picks (`layers.pick_conv_execution`). Totals weigh each '
      'shape by `n`.', '']
  for m in doc['models']:
    t = m['total_ms']
    lines += [f'**{m["model"]}** at {m["param_fraction"]:.3f} of the dense params '
              f'(`model.rank={m["model_rank"]:g}`): conv time per step, factored '
              f'{t["factored"]:.0f} ms, kernel {t["kernel"]:.0f} ms, auto {t["auto"]:.0f} ms '
              f'(per-shape best {t["best"]:.0f} ms); auto ÷ factored '
              f'{t["auto"] / t["factored"]:.2f}.', '',
              '| map in | out | stride | rank | n | factored ms | kernel ms | kernel ÷ factored '
              '| auto |', '|---|---|---|---|---|---|---|---|---|']
    for r in m['shapes']:
      h, w, c = r['map']
      lines.append(f'| {h}×{w}×{c} | {r["features"]} | {r["strides"][0]} | {r["rank"]} | '
                   f'{r["count"]} | {r["factored_ms"]:.1f} | {r["kernel_ms"]:.1f} | '
                   f'{r["kernel_ms"] / r["factored_ms"]:.2f} | {r["auto"]} |')
    lines.append('')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog='python -m benchmarks.conv_layers',
                              description=__doc__.split('\n')[0])
  p.add_argument('--models', default='small_conv,resnet32,vgg13')
  p.add_argument('--ranks', type=float, default=0.25,
                 help='fraction of the dense parameters the factored model keeps')
  p.add_argument('--dataset', default='cifar10', help='shapes only: cifar10 | cifar100 | ...')
  p.add_argument('--config', default=None, help='config file[:arg] (default configs/default.py)')
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--out', help='JSON path; the markdown goes next to it (.md)')
  args = p.parse_args(argv)
  if not 0.0 < args.ranks < 1.0:
    p.error(f'--ranks={args.ranks}: give a fraction of the dense parameters in (0, 1).')
  from lrdfa_jax import data as data_lib
  if args.dataset not in data_lib.DATASETS:
    p.error(f'--dataset={args.dataset!r}: choose one of {sorted(data_lib.DATASETS)}.')
  info = data_lib.DATASETS[args.dataset]
  load0 = os.getloadavg()[0]
  base = load_config(args.config)
  models = [measure_model(with_fields(base, model__name=name, data__name=args.dataset),
                          args.ranks, info['image_shape'], info['num_classes'], args.batch_size,
                          args.steps, args.rounds)
            for name in filter(None, args.models.split(','))]
  doc = {**provenance('benchmarks.conv_layers', argv, load0), 'batch_size': args.batch_size,
         'models': models}
  md = markdown(doc)
  print_and_save(args.out, doc, md)
  return doc


if __name__ == '__main__':
  main()
