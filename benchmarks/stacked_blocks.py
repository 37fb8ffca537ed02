r"""The design's "vmap across layers": a stage's equal-shaped residual blocks, updated one by one
or as one ``jax.vmap`` over their stacked params.

Command (writes ``OUT.json`` and ``OUT.md``)::

  python -m benchmarks.stacked_blocks --model=resnet32 \
      --out=benchmarks/results/cpu_stacked_blocks_resnet32.json

Under the local error signal a residual block's update needs only its input and the cotangent
on its output, so the blocks of a stage that share a shape (all but the first, which changes
stride and width) could be updated together: stack their params and BN statistics and
``vmap`` one block's ``vjp`` over them. For each stage this jits both forms of that work (each
block's forward in train mode, its BN statistics, and the vjp to its params) on the same
inputs and cotangents, checks that they give the same update, and times them interleaved in
one process. It is the best case for the stacked form: in a full step the unrolled form shares
the model's forward, while the stacked one would have to run those blocks' forward again.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step import print_and_save, provenance, provenance_lines
from lrdfa_jax import models
from lrdfa_jax.models.common import scoped

MODELS = ('resnet20', 'resnet32', 'resnet56')


def stage_blocks(model) -> dict[int, list[str]]:
  """Per stage with at least two of them, the names of its blocks after the first (the model's
  param names; equal shapes within a stage)."""
  out = {}
  for s, n in enumerate(model.stage_sizes, start=1):
    if n >= 3:
      out[s] = [f'stage{s}_block{b}' for b in range(1, n)]
  return out


def stage_block(model, stage: int, name: str):
  """The residual block ``name`` of ``stage`` as a module of its own (stride 1, the model's
  convs, ranks and activation)."""
  width = models.common.scale_width(model.widths[stage - 1], model.width)
  return models.BLOCKS[model.block](width, stride=1, shortcut=model.shortcut,
                                    conv=scoped(model.conv, name), act=model.act)


def block_update_fns(block):
  """``(unrolled, stacked)``: the updates of equal-shaped blocks from their params, BN
  statistics, inputs ``x`` and output cotangents ``g`` (lists per block, or stacked on axis 0)."""

  def one(p, stats, x, g):
    def apply(q):
      h, mutated = block.apply({'params': q, 'batch_stats': stats}, x, True,
                               mutable=['batch_stats'])
      return h, mutated['batch_stats']
    _, vjp_fn, new_stats = jax.vjp(apply, p, has_aux=True)
    return vjp_fn(g)[0], new_stats

  unrolled = jax.jit(lambda ps, ss, xs, gs: [one(*a) for a in zip(ps, ss, xs, gs)])
  stacked = jax.jit(jax.vmap(one))
  return unrolled, stacked


def measure(model_name: str, rank: float, batch_size: int, steps: int, rounds: int,
            conv_kernel_grad: str = 'auto', width: float = 1.0,
            stages: Sequence[int] = ()) -> list[dict]:
  model = models.build_model(model_name, num_classes=10, rank=rank, width=width,
                             conv_kernel_grad=conv_kernel_grad)
  records = []
  for stage, names in stage_blocks(model).items():
    if stages and stage not in stages:
      continue
    side = 32 // 2 ** (stage - 1)
    channels = models.common.scale_width(model.widths[stage - 1], model.width)
    shape = (len(names), batch_size, side, side, channels)
    xs = jax.nn.relu(jax.random.normal(jax.random.key(stage), shape))
    gs = jax.random.normal(jax.random.key(100 + stage), shape) / batch_size
    block = stage_block(model, stage, names[0])
    init = jax.jit(lambda key: block.init(key, xs[0, :1], True))  # each block its own init
    vs = [init(jax.random.key(1000 * stage + b)) for b in range(len(names))]
    ps, ss = [v['params'] for v in vs], [v['batch_stats'] for v in vs]
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    unrolled, stacked = block_update_fns(block)
    args = {'unrolled': (ps, ss, list(xs), list(gs)), 'stacked': (stack(ps), stack(ss), xs, gs)}
    fns = {'unrolled': unrolled, 'stacked': stacked}
    out = {k: jax.block_until_ready(fns[k](*args[k])) for k in fns}  # compile and warm up
    ref = stack([u for u, _ in out['unrolled']]), stack([st for _, st in out['unrolled']])
    diffs = {jax.tree_util.keystr(path): float(jnp.linalg.norm(a - b) /
                                               (jnp.linalg.norm(a) + 1e-30))
             for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref),
                                     jax.tree.leaves(out['stacked']))}
    worst = max(diffs, key=diffs.get)
    times = {k: [] for k in fns}
    for r in range(rounds):
      for k in (list(fns)[r % 2:] + list(fns)[:r % 2]):  # the first form alternates
        for _ in range(steps):
          t = time.perf_counter()
          jax.block_until_ready(fns[k](*args[k]))
          times[k].append(time.perf_counter() - t)
    ms = {k: 1e3 * float(np.median(t)) for k, t in times.items()}
    records.append({'model': model_name, 'width': width, 'stage': stage, 'blocks': len(names),
                    'map': [side, side, channels], 'batch_size': batch_size, 'rank': rank,
                    'unrolled_ms': ms['unrolled'], 'stacked_ms': ms['stacked'],
                    'stacked_over_unrolled': ms['stacked'] / ms['unrolled'],
                    'max_relative_difference': diffs[worst], 'max_difference_leaf': worst})
  return records


def markdown(doc: dict) -> str:
  lines = provenance_lines(doc) + [
           'The local updates of a stage\'s equal-shaped residual blocks (all but its first): '
           'one vjp per block (`unrolled`) or one `jax.vmap` over their stacked params '
           f'(`stacked`); batch {doc["records"][0]["batch_size"]}, rank '
           f'{doc["records"][0]["rank"]}, conv kernel gradient `{doc["conv_kernel_grad"]}`, '
           'median of interleaved calls. "rel. diff": the largest relative difference of any '
           'leaf (updates and BN statistics) between the forms, and that leaf.', '',
           '| model | stage | blocks | map | unrolled ms | stacked ms | stacked ÷ unrolled | '
           'rel. diff | leaf |', '|---|---|---|---|---|---|---|---|---|']
  for r in doc['records']:
    h, w, c = r['map']
    lines.append(f'| {r["model"]} | {r["stage"]} | {r["blocks"]} | {h}×{w}×{c} | '
                 f'{r["unrolled_ms"]:.1f} | {r["stacked_ms"]:.1f} | '
                 f'{r["stacked_over_unrolled"]:.2f} | {r["max_relative_difference"]:.1e} | '
                 f'`{r.get("max_difference_leaf", "")}` |')
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog='python -m benchmarks.stacked_blocks',
                              description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet20', help=f'one of {", ".join(MODELS)}')
  p.add_argument('--rank', type=float, default=0.25)
  p.add_argument('--width', type=float, default=1.0, help='channel multiplier (tests: < 1)')
  p.add_argument('--stages', default='', help='comma-separated stages (default: all)')
  p.add_argument('--conv_kernel_grad', default='auto', help="'auto', 'gemm' or 'xla'")
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--out', help='JSON path; the markdown goes next to it (.md)')
  args = p.parse_args(argv)
  if args.model not in MODELS:
    p.error(f'--model={args.model!r}: choose one of {", ".join(MODELS)}.')
  if not 0 < args.rank <= 1 or args.width <= 0:
    p.error('--rank must be in (0, 1] and --width > 0.')
  try:
    stages = [int(x) for x in args.stages.split(',') if x]
  except ValueError:
    p.error(f'--stages={args.stages!r}: give stage numbers, e.g. 1,3')
  eligible = stage_blocks(models.build_model(args.model, num_classes=10))
  if set(stages) - set(eligible):
    p.error(f'--stages={args.stages!r}: {args.model} has stages {sorted(eligible)} with '
            'equal-shaped blocks.')
  load0 = os.getloadavg()[0]
  records = measure(args.model, args.rank, args.batch_size, args.steps, args.rounds,
                    args.conv_kernel_grad, args.width, stages)
  doc = {**provenance('benchmarks.stacked_blocks', argv, load0),
         'conv_kernel_grad': args.conv_kernel_grad, 'records': records}
  md = markdown(doc)
  print_and_save(args.out, doc, md)
  return doc


if __name__ == '__main__':
  main()
