r"""A conv as XLA's convolution, with GEMM kernel gradients, or as im2col + one matmul, per shape.

Command (writes ``OUT.json`` and ``OUT.md``)::

  python -m benchmarks.conv --out=benchmarks/results/cpu_conv.json

For each ``HxWxC`` map (batch ``--batch_size``, a 3×3 stride-1 SAME conv from C to C channels;
``HxWxC:O`` for C to O channels, as in a factored conv's first, rank-r half)
the forward and both gradients (input and kernel: one training step's conv work) are jitted
in four forms: ``lax.conv_general_dilated``; the same with the kernel gradient as ``kh·kw``
GEMMs (``layers.conv_general_dilated(kernel_grad='gemm')``); the im2col form (forced with
``max_positions``); and im2col's forward with the GEMM kernel gradient (``'im2col_gemm'``, the
form of a stem under ``kernel_grad='auto'``). They run interleaved,
``--rounds`` × ``--steps`` calls each after a warm-up, and the median times are compared in the
same process. ``model.im2col_positions`` (default ``layers.TINY_MAP``) sends a conv to im2col
when its output has at most that many positions; the table marks the default's pick per shape.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step import print_and_save, provenance, provenance_lines
from lrdfa_jax import layers

DN = ('NHWC', 'HWIO', 'NHWC')
# VGG-13's five stages at width 1 (32×32×64 ... 2×2×512) and the ResNets' 16-channel stage
SHAPES = '2x2x512,4x4x512,8x8x256,16x16x128,32x32x64,32x32x16'


FORMS = ('lax', 'gemm', 'im2col', 'im2col_gemm')


def _step(form: str, positions: int):
  def loss(x, k):
    if form == 'lax':
      y = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=DN)
    elif form == 'gemm':  # XLA's conv and input gradient, the kernel gradient as GEMMs
      y = layers.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=DN,
                                      max_positions=0, kernel_grad='gemm')
    elif form == 'im2col_gemm':  # the im2col forward, GEMM kernel gradient, XLA's input gradient
      y = layers.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=DN,
                                      max_positions=0, kernel_grad='im2col_gemm')
    else:  # the im2col form, forced for this map
      y = layers.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=DN,
                                      max_positions=positions)
    return jnp.sum(y * y)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure(shape: tuple[int, ...], batch_size: int, steps: int, rounds: int) -> dict:
  h, w, c, o = shape
  x = jax.random.normal(jax.random.key(0), (batch_size, h, w, c))
  k = jax.random.normal(jax.random.key(1), (3, 3, c, o)) / np.sqrt(9 * c)
  fns = {form: _step(form, h * w) for form in FORMS}
  for f in fns.values():
    jax.block_until_ready(f(x, k))  # compile and warm up
  times = {name: [] for name in fns}
  for r in range(rounds):
    for name in (list(fns)[r % len(FORMS):] + list(fns)[:r % len(FORMS)]):  # the first rotates
      for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fns[name](x, k))
        times[name].append(time.perf_counter() - t)
  ms = {n: 1e3 * float(np.median(t)) for n, t in times.items()}
  flops = 3 * 2 * batch_size * h * w * 9 * c * o  # forward, input and kernel gradient
  return {'shape': [h, w, c], 'features': o, 'batch_size': batch_size,
          **{f'{f}_ms': ms[f] for f in FORMS},
          **{f'{f}_over_lax': ms[f] / ms['lax'] for f in FORMS if f != 'lax'},
          **{f'{f}_gflops': flops / ms[f] / 1e6 for f in FORMS},
          'library_form': layers.conv_form((3, 3, c, o), h * w)}


def markdown(doc: dict) -> str:
  lines = provenance_lines(doc) + [
           f'3×3 stride-1 SAME conv, C → O channels, batch {doc["records"][0]["batch_size"]}: '
           'forward + input gradient + kernel gradient, median of interleaved calls. '
           f'The library runs a conv as im2col when its output has ≤ {doc["tiny_map"]} '
           'positions (`model.im2col_positions`, default `layers.TINY_MAP`).', '',
           'Forms: `lax` is XLA\'s conv with its own gradients; `gemm` the same conv and input '
           'gradient with the kernel gradient as 9 shifted GEMMs (`model.conv_kernel_grad=gemm`); '
           '`im2col` one matmul on the stacked shifted maps, its gradients those of the matmul; '
           '`im2col_gemm` the im2col forward with the GEMM kernel gradient and XLA\'s input '
           'gradient, keeping only the input for the backward (the stems\' form). "library '
           'picks": the default config\'s form (`model.conv_kernel_grad=auto`, '
           '`layers.pick_conv_form`).', '',
           '| map | out | ' + ' | '.join(f'{f} ms' for f in FORMS) + ' | '
           + ' | '.join(f'{f} ÷ lax' for f in FORMS[1:]) + ' | '
           + ' | '.join(f'{f} GFLOP/s' for f in FORMS) + ' | library picks |',
           '|---|---|' + '---|' * (3 * len(FORMS) - 1) + '---|']
  for r in doc['records']:
    h, w, c = r['shape']
    lines.append(f'| {h}×{w}×{c} | {r.get("features", c)} | '
                 + ' | '.join(f'{r[f + "_ms"]:.1f}' for f in FORMS) + ' | '
                 + ' | '.join(f'{r[f + "_over_lax"]:.2f}' for f in FORMS[1:]) + ' | '
                 + ' | '.join(f'{r[f + "_gflops"]:.1f}' for f in FORMS) + f' | {r["library_form"]} |')
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shapes', default=SHAPES,
                 help='comma-separated HxWxC maps (C -> C) or HxWxC:O (C -> O channels)')
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--out', help='JSON path; the markdown goes next to it (.md)')
  p.add_argument('--render', help='a JSON this script wrote: rewrite its .md, measure nothing')
  args = p.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      doc = json.load(f)
    print_and_save(args.render, doc, markdown(doc))
    return doc
  try:
    shapes = []
    for item in args.shapes.split(','):
      hwc, _, o = item.partition(':')
      dims = [int(d) for d in hwc.split('x')]
      shapes.append((*dims, int(o) if o else dims[-1]))
      if len(shapes[-1]) != 4 or min(shapes[-1]) < 1:
        raise ValueError
  except ValueError:
    p.error(f'--shapes={args.shapes!r}: give HxWxC maps (or HxWxC:O), e.g. 2x2x512,8x8x64:16.')
  load0 = os.getloadavg()[0]
  records = [measure(s, args.batch_size, args.steps, args.rounds) for s in shapes]
  doc = {**provenance('benchmarks.conv', argv, load0), 'tiny_map': layers.TINY_MAP,
         'records': records}
  md = markdown(doc)
  print_and_save(args.out, doc, md)
  return doc


if __name__ == '__main__':
  main()
