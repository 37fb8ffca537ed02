"""Where a train step's time goes: per-HLO-op times from a ``jax.profiler`` trace.

  python -m benchmarks.profile --model=vgg13 --method=bp --batch_size=32 \
      --out=benchmarks/results/profile_vgg13_bp.md

Builds and compiles the step exactly as ``benchmarks.step`` does (``--rank`` is a target
parameter fraction for ``svd_bp``/``ssa``), runs ``--steps`` steps under
``jax.profiler.trace(create_perfetto_trace=True)``, and sums the trace's events per HLO
instruction. Each row names the instruction, its share of the summed op time, its output
shape and the JAX op it came from (``transpose(jvp(...))`` marks the backward pass).
Independent ops can run concurrently on XLA:CPU, so the summed op time can exceed the wall
time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import step as bench
from lrdfa_jax import steps as steps_lib

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(')
_OPNAME = re.compile(r'op_name="([^"]*)"')
_SKIP = ('$', 'Thunk', 'Slinky', 'PjitFunction', 'CommonPjRt', 'ParseArguments')


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """Instruction name -> output type, opcode and JAX op name, from optimized HLO text."""
  out = {}
  for line in hlo_text.split('\n'):
    m = _INSTR.match(line)
    if m:
      op = _OPNAME.search(line)
      out[m.group(1)] = {'type': m.group(2), 'opcode': m.group(3),
                         'op_name': op.group(1) if op else ''}
  return out


def op_times(trace_dir: str, steps: int) -> dict[str, float]:
  """Summed duration (seconds per step) of each traced op in a perfetto trace."""
  files = glob.glob(os.path.join(trace_dir, '**', '*.json.gz'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no perfetto trace under {trace_dir}.')
  with gzip.open(files[0]) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  agg: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get('ph') == 'X' and not e['name'].startswith(_SKIP):
      agg[e['name']] += e.get('dur', 0) / 1e6 / steps
  return dict(agg)


def profile(config, *, method: str, fraction: float, batch_size: int, steps: int = 2,
            image_shape=(32, 32, 3), num_classes: int = 10) -> dict[str, Any]:
  """Compiles the step like :func:`benchmarks.step.benchmark`, traces it, returns op times."""
  rank = None
  if method in steps_lib.FACTORED_METHODS:
    rank = bench.rank_for_fraction(config, fraction, image_shape, num_classes)[0]
  cfg = bench.with_fields(config, dfa__method=method,
                          **({'model__rank': rank} if rank is not None else {}))
  v = bench.Variant(method, fraction if rank else None, rank, cfg)
  mesh = steps_lib.make_mesh(1)
  batch = bench.synthetic_batch(mesh, batch_size, image_shape, num_classes)
  dense = bench.count_params(bench.with_fields(config, dfa__method='bp'), image_shape, num_classes)
  bench.prepare_step(v, batch, mesh, image_shape, num_classes, dense, 0)
  bench.time_steps(v, batch, 1)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      wall = bench.time_steps(v, batch, steps)
    times = op_times(d, steps)
  return {'record': v.record, 'rank': rank, 'wall_s': float(np.median(wall)), 'op_times': times,
          'hlo': hlo_instructions(v.compiled.as_text()), 'config': cfg}


def report(result: dict[str, Any], *, model: str, method: str, batch_size: int, top: int,
           command: str) -> str:
  times, hlo = result['op_times'], result['hlo']
  total = sum(times.values())
  by_kind: dict[str, float] = collections.defaultdict(float)
  rows = []
  for name, t in sorted(times.items(), key=lambda x: -x[1]):
    info = hlo.get(name, {})
    op_name = info.get('op_name', '')
    phase = 'bwd ' if 'transpose(' in op_name else 'fwd ' if op_name else '? '
    by_kind[phase + re.sub(r'[._]?\d+$', '', name)] += t
    rows.append((name, t, info.get('type', '?'), op_name))
  r = result['record']
  lines = [
      f'Command: `{command}`', '',
      f'{model} / {method}' + (f' at rank {result["rank"]:g} '
                               f'({r["param_fraction"]:.3f} of the params)' if result['rank']
                               else '') +
      f', batch {batch_size}: step {result["wall_s"] * 1e3:.0f} ms wall, '
      f'{total * 1e3:.0f} ms summed op time, {r["flops"] / 1e9:.2f} GFLOP '
      f'({r["flops"] / result["wall_s"] / 1e9:.1f} GFLOP/s overall). Machine: '
      f'{bench.machine_info()["cpu"]}, {os.cpu_count()} CPUs, jax {jax.__version__}; '
      f'load average {os.getloadavg()[0]:.2f}.', '',
      'By kind (bwd: the JAX op name is under `transpose(jvp(...))`; fwd: it is not; ?: XLA '
      'gave the op no name):', '',
      '| kind | ms | share |', '|---|---|---|']
  for k, t in sorted(by_kind.items(), key=lambda x: -x[1])[:12]:
    lines.append(f'| {k} | {t * 1e3:.1f} | {t / total:.1%} |')
  lines += ['', f'Top {top} ops:', '', '| op | ms | share | output | JAX op |',
            '|---|---|---|---|---|']
  for name, t, typ, op_name in rows[:top]:
    lines.append(f'| {name} | {t * 1e3:.1f} | {t / total:.1%} | `{typ}` | '
                 f'`{op_name.replace("jit(train_step)/", "")}` |')
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(prog='python -m benchmarks.profile', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='small_conv')
  p.add_argument('--method', default='bp', choices=steps_lib.METHODS)
  p.add_argument('--rank', type=float, default=0.25, help='target parameter fraction')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--top', type=int, default=15)
  p.add_argument('--config', default=None)
  p.add_argument('--set', action='append', default=[], metavar='SECTION.FIELD=VALUE')
  p.add_argument('--xla_flags', default='')
  p.add_argument('--out', default=None, help='markdown path (default: print only)')
  args = p.parse_args(argv)
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {args.xla_flags}'.strip()
  config = bench.with_fields(bench.load_config(args.config, args.set), model__name=args.model)
  result = profile(config, method=args.method, fraction=args.rank, batch_size=args.batch_size,
                   steps=args.steps)
  command = 'python -m benchmarks.profile ' + shlex.join(sys.argv[1:] if argv is None else argv)
  text = report(result, model=args.model, method=args.method, batch_size=args.batch_size,
                top=args.top, command=command)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(text)
  return text


if __name__ == '__main__':
  main()
