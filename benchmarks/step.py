r"""Step time, memory and FLOPs of every method on the same model, as ratios to backprop.

Commands (run from the repository root; each writes ``OUT.json`` and ``OUT.md``)::

  # main table: every method on each model, SVD methods at 1/4 of the dense parameter count
  python -m benchmarks.step --models=small_conv,vgg13,resnet32 --methods=bp,svd_bp,dfa,ssa \
      --ranks=0.25 --batch_size=128 --steps=2 --rounds=8 --out=benchmarks/results/cpu_cifar.json
  # step time and memory against rank: dense, 1/2, 1/4, 1/8 of the parameters
  python -m benchmarks.step --sweep=rank --models=small_conv,resnet32 --steps=2 --rounds=8 \
      --out=benchmarks/results/cpu_rank_sweep.json
  # ... and against depth: ResNet-20/32/56 at 1/4 of the parameters
  python -m benchmarks.step --sweep=depth --steps=2 --rounds=8 \
      --out=benchmarks/results/cpu_depth_sweep.json
  # XLA:CPU's memory-minimising scheduler (its default favours concurrency, which keeps the
  # independent per-block backward passes of dfa/ssa alive at once and inflates their temp bytes),
  # as the training runs use it (train.xla_scheduler, per program; the default 'auto' compiles
  # the train step under both and keeps the smaller program) or for every program
  python -m benchmarks.step ... --set=train.xla_scheduler=memory
  python -m benchmarks.step ... \
      --xla_flags=--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED
  # rewrite OUT.md from OUT.json without measuring
  python -m benchmarks.step --render=benchmarks/results/cpu_cifar.json

Where the time goes: ``python -m benchmarks.profile`` (per-op times from a profiler trace).
The committed results and what they mean: ``benchmarks/results/summary.md``.

What is measured. For each (model, method, rank) the project's own jitted ``train_step`` (from
``steps.make_steps``, state donated, one device) is lowered and compiled once on a random
synthetic batch (no data loading). XLA's ``memory_analysis()`` gives argument, output, alias
and temporary bytes; ``cost_analysis()`` gives FLOPs. After ``--warmup`` steps, the variants of
one model run interleaved, round-robin, ``--rounds`` times ``--steps`` steps each (the starting
variant rotates every round), so load drift on a shared machine hits every method alike. Each
step is timed on its own, up to ``block_until_ready`` of the returned state, which is fed back.
``ratio_to_bp`` is the median step time over the median step time of ``bp`` measured in the same
process (< 1 is faster); its min/max over rounds is the spread of the ratio.

Ranks. ``--ranks`` are target fractions of the dense model's trainable parameters
(``--rank_mode=params``, the default): for each, the global ``model.rank`` (a fraction of every
factored layer's full rank) is found by bisection on the parameter count of the factored model,
which is counted whole, including layers that ``model.overrides`` keeps dense (the default
config keeps ``conv1`` and ``head`` dense; the benchmark uses the config as given).
``--rank_mode=layer`` passes the values straight to ``model.rank`` instead. Dense methods
(``bp``, ``dfa``) always have ``param_fraction`` 1.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lrdfa_jax import build, layers, metrics as metrics_lib, steps as steps_lib

DEPTH_MODELS = ('resnet20', 'resnet32', 'resnet56')
RANK_SWEEP = (0.5, 0.25, 0.125)

# Targets from the method's structure (DESIGN.md, issue 5), as step-time ratios (< 1: faster).
TARGET_LOCAL_VS_SAME_WEIGHTS = 2 / 3   # dfa vs bp, ssa vs svd_bp: no input gradients
TARGET_SSA_VS_BP_AT_QUARTER = 1 / 2    # ssa at 1/4 of the params: >= 2x faster than dense bp
TARGET_SSA_VS_SVD_BP_AT_QUARTER = 1 / 1.3  # ... and >= 1.3x faster than svd_bp
TARGET_LOCAL_SIGNAL_TEMP_VS_BP = 0.2   # local signal: ResNet-56 temporaries <= 0.2x bp's ...
TARGET_LOCAL_SIGNAL_DEPTH_GROWTH = 1.2  # ... and <= 1.2x ResNet-20's (flat in depth)


# --------------------------------------------------------------------------------- config


def load_config(path: str | None = None, sets: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """``configs/default.py`` (or ``path``, ``file.py[:arg]``) with ``a.b=value`` overrides."""
  if path is None:
    from configs import default
    config = default.get_config()
  else:
    file, _, arg = path.partition(':')
    spec = importlib.util.spec_from_file_location('_bench_config', file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  for item in sets:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--set {item!r} must look like section.field=value.')
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = parsed
  return config


def with_fields(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  """A copy with ``section__field=value`` set."""
  c = ml_collections.ConfigDict(config.to_dict())
  for k, v in fields.items():
    section, field = k.split('__')
    c[section][field] = v
  return c


def count_params(config: ml_collections.ConfigDict, image_shape, num_classes: int) -> int:
  """Trainable parameters of the model the config builds (shapes only; nothing runs)."""
  model = build.build_model(config, num_classes)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  return metrics_lib.param_count(shapes['params'])


def rank_for_fraction(config: ml_collections.ConfigDict, fraction: float, image_shape,
                      num_classes: int, iters: int = 24) -> tuple[float, float]:
  """The global ``model.rank`` whose factored model has ``fraction`` of the dense params.

  Bisection on the (monotone, stepwise) parameter count; returns ``(rank, achieved fraction)``
  for whichever neighbour of the target is closer.
  """
  dense = count_params(with_fields(config, dfa__method='bp'), image_shape, num_classes)
  cache: dict[float, float] = {}

  def frac(r: float) -> float:
    if r not in cache:
      c = with_fields(config, dfa__method='svd_bp', model__rank=r)
      cache[r] = count_params(c, image_shape, num_classes) / dense
    return cache[r]

  lo, hi = 1e-6, 1.0 - 1e-6  # fractions lie in (0, 1); 1.0 would be rank 1
  if frac(lo) > fraction:
    raise ValueError(f'{config.model.name}: {fraction} of the params is out of reach; at the '
                     f'lowest rank the factored model keeps {frac(lo):.3f} of them (layers '
                     f'kept dense by model.overrides={config.model.overrides!r} count).')
  if frac(hi) <= fraction:
    return hi, frac(hi)
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if frac(mid) <= fraction else (lo, mid)
  best = min((lo, hi), key=lambda r: abs(frac(r) - fraction))
  return round(best, 6), frac(best)


# ------------------------------------------------------------------------------ measuring


def tree_bytes(tree: Any) -> int:
  return int(sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(tree)))


def layer_ranks(params: Any, prefix: str = '') -> dict[str, int]:
  """Rank of every factored layer, by path."""
  out = {}
  for k, v in params.items():
    if layers.is_svd_layer(v):
      out[prefix + k] = int(v['s'].shape[0])
    elif isinstance(v, dict):
      out.update(layer_ranks(v, f'{prefix}{k}/'))
  return out


def compiled_stats(compiled) -> dict[str, Any]:
  """Bytes from ``memory_analysis()``, FLOPs from ``cost_analysis()``, op counts from the HLO."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # a list of per-computation dicts in older jax
    cost = cost[0] if cost else {}
  cost = dict(cost or {})
  hlo = compiled.as_text()
  peak = getattr(mem, 'peak_memory_in_bytes', 0) if mem is not None else 0
  get = lambda name: int(getattr(mem, name, 0)) if mem is not None else None  # noqa: E731
  return {
      'argument_bytes': get('argument_size_in_bytes'),
      'output_bytes': get('output_size_in_bytes'),
      'alias_bytes': get('alias_size_in_bytes'),
      'temp_bytes': get('temp_size_in_bytes'),
      'peak_bytes': int(peak) if peak else None,  # not reported by every backend
      'flops': float(cost.get('flops', 0.0)),
      'transcendentals': float(cost.get('transcendentals', 0.0)),
      'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
      'hlo_convolutions': hlo.count(' convolution('),
      'hlo_dots': hlo.count(' dot('),
  }


def print_and_save(path: str | None, doc: Any, md: str) -> None:
  """Prints ``md``; with a ``path``, also writes it and ``doc`` (:func:`save_json_and_markdown`)."""
  print(md)
  if path:
    save_json_and_markdown(path, doc, md)


def save_json_and_markdown(path: str, doc: Any, md: str) -> None:
  """Writes ``doc`` to the JSON ``path`` and ``md`` next to it (``.md``), creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(doc, f, indent=1)
  with open(os.path.splitext(path)[0] + '.md', 'w') as f:
    f.write(md)


def provenance(module: str, argv: Sequence[str] | None, load0: float) -> dict[str, Any]:
  """What a benchmark's JSON records about its run: the command, machine, time and the 1-minute
  load average at start (``load0``) and now."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return {'command': shlex.join(['python', '-m', module, *argv]), 'machine': machine_info(),
          'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'load': [load0, os.getloadavg()[0]]}


def provenance_lines(doc: dict[str, Any]) -> list[str]:
  """The markdown head of a :func:`provenance` record: the command and the machine."""
  m = doc['machine']
  return [f'Command: `{doc["command"]}`', '',
          f'Machine: {m["device_count"]}× {m["device"]} ({m["cpu"]}, {m["cpu_count"]} CPUs); '
          f'jax {m["jax_version"]}; {doc["time"]}. 1-minute load average at start → end: '
          f'{doc["load"][0]:.2f} → {doc["load"][1]:.2f}.', '']


def machine_info() -> dict[str, Any]:
  dev = jax.devices()[0]
  import jaxlib
  return {'device': getattr(dev, 'device_kind', dev.platform), 'platform': dev.platform,
          'device_count': jax.device_count(), 'cpu': metrics_lib.cpu_model(),
          'cpu_count': os.cpu_count(),
          'jax_version': jax.__version__, 'jaxlib_version': jaxlib.__version__,
          'python': platform.python_version(), 'xla_flags': os.environ.get('XLA_FLAGS', '')}


@dataclasses.dataclass
class Variant:
  """One (method, rank) of a model: its config, compiled step, live state and timings."""
  method: str
  target_fraction: float | None
  rank: float | None
  config: ml_collections.ConfigDict
  record: dict[str, Any] = dataclasses.field(default_factory=dict)
  compiled: Any = None
  state: Any = None
  times: list[list[float]] = dataclasses.field(default_factory=list)


def synthetic_batch(mesh, batch_size: int, image_shape, num_classes: int, seed: int = 0):
  """A random normal image batch with random labels, on the mesh."""
  rng = np.random.default_rng(seed)
  return steps_lib.shard_batch({
      'image': rng.normal(size=(batch_size, *image_shape)).astype(np.float32),
      'label': rng.integers(0, num_classes, batch_size).astype(np.int32)}, mesh)


def prepare_step(v: Variant, batch, mesh, image_shape, num_classes, dense_params, seed) -> None:
  """Builds ``v``'s state and compiles the project's jitted train step; fills ``v.record``."""
  config = v.config
  model = build.build_model(config, num_classes)
  tx, _ = build.build_tx(config, total_steps=1000)
  state = build.create_train_state(config, model, tx, image_shape, num_classes,
                                   jax.random.key(seed))
  cfg = build.step_config(config, model, image_shape)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  train_fn = steps_lib.make_steps(cfg, mesh, state)[0]
  t0 = time.perf_counter()
  v.compiled = train_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  n_params = metrics_lib.param_count(state.params)
  v.state = state
  v.record.update({
      'param_fraction': n_params / dense_params,
      'target_param_fraction': v.target_fraction,
      'rank': v.rank,
      'layer_ranks': (layer_ranks(jax.device_get(state.params))
                      if v.method in steps_lib.FACTORED_METHODS else {}),
      'trainable_params': n_params,
      'dense_params': dense_params,
      'param_bytes': tree_bytes(state.params),
      'opt_state_bytes': tree_bytes(state.opt_state),
      'batch_stats_bytes': tree_bytes(state.batch_stats),
      'feedback_bytes': tree_bytes(state.feedback),
      'compile_s': compile_s,
      'xla_scheduler_used': (train_fn.chosen if isinstance(train_fn, steps_lib.SmallerProgram)
                             else cfg.xla_scheduler),  # auto on CPU: the measured choice
      **compiled_stats(v.compiled),
  })


def time_steps(v: Variant, batch, n: int) -> list[float]:
  """Runs ``n`` steps, feeding the donated state back; the wall time of each."""
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    v.state, metrics = v.compiled(v.state, batch)
    jax.block_until_ready((v.state, metrics))
    out.append(time.perf_counter() - t0)
  return out


def benchmark(config: ml_collections.ConfigDict, methods: Sequence[str] = steps_lib.METHODS,
              fractions: Sequence[float] = (0.25,), *, batch_size: int = 128, steps: int = 10,
              rounds: int = 3, warmup: int = 2, rank_mode: str = 'params',
              image_shape: Sequence[int] | None = None, num_classes: int | None = None,
              seed: int = 0, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Benchmarks every method on ``config.model``; one record per (method, rank).

  ``fractions`` are target parameter fractions (``rank_mode='params'``) or ``model.rank``
  values (``'layer'``) for the factored methods; dense methods run once at fraction 1.
  """
  for m in methods:
    if m not in steps_lib.METHODS:
      raise ValueError(f'unknown method {m!r}; choose from {steps_lib.METHODS}.')
  if rank_mode not in ('params', 'layer'):
    raise ValueError(f"rank_mode must be 'params' or 'layer', got {rank_mode!r}.")
  if image_shape is None or num_classes is None:
    info = build.dataset_info(config)
    image_shape = tuple(image_shape or info['image_shape'])
    num_classes = num_classes or info['num_classes']
  image_shape = tuple(image_shape)
  name = config.model.name
  loadavg_start = os.getloadavg()
  dense_params = count_params(with_fields(config, dfa__method='bp'), image_shape, num_classes)

  ranks = {}
  if any(m in steps_lib.FACTORED_METHODS for m in methods):
    for f in fractions:
      ranks[f] = (rank_for_fraction(config, f, image_shape, num_classes)[0]
                  if rank_mode == 'params' else f)
  variants = []
  for method in sorted(methods, key=lambda m: m != 'bp'):  # bp first
    if method not in steps_lib.FACTORED_METHODS:
      variants.append(Variant(method, None, None, with_fields(config, dfa__method=method)))
      continue
    for f in fractions:
      variants.append(Variant(method, f if rank_mode == 'params' else None, ranks[f],
                               with_fields(config, dfa__method=method, model__rank=ranks[f])))

  mesh = steps_lib.make_mesh(1)
  batch = synthetic_batch(mesh, batch_size, image_shape, num_classes, seed)
  for v in variants:
    prepare_step(v, batch, mesh, image_shape, num_classes, dense_params, seed)
    log(f'{name}/{v.method} rank={v.rank}: compiled in {v.record["compile_s"]:.1f}s, '
        f'{v.record["flops"] / 1e9:.2f} GFLOP, temp {v.record["temp_bytes"] / 2**20:.1f} MiB')
    time_steps(v, batch, warmup)
  for r in range(rounds):
    k = r % len(variants)
    for v in variants[k:] + variants[:k]:
      v.times.append(time_steps(v, batch, steps))
      log(f'round {r + 1}/{rounds} {name}/{v.method} rank={v.rank}: '
          f'median {np.median(v.times[-1]) * 1e3:.1f} ms')
  loadavg_end = os.getloadavg()

  def median(v: Variant) -> float:
    return float(np.median(np.concatenate(v.times)))

  bp = next((v for v in variants if v.method == 'bp'), None)
  svd_bp = {v.target_fraction if rank_mode == 'params' else v.rank: v
            for v in variants if v.method == 'svd_bp'}
  machine = machine_info()
  stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  records = []
  for v in variants:
    t = np.concatenate(v.times)
    med = median(v)
    rec = {
        'model': name, 'method': v.method, 'batch_size': batch_size,
        'image_shape': list(image_shape), 'num_classes': num_classes, **machine,
        'step_time_median_s': med,
        'step_time_p25_s': float(np.percentile(t, 25)),
        'step_time_p75_s': float(np.percentile(t, 75)),
        'step_time_min_s': float(t.min()), 'step_time_max_s': float(t.max()),
        'step_time_round_medians_s': [float(np.median(x)) for x in v.times],
        'images_per_s': batch_size / med,
        **v.record,
    }
    for key, base in (('bp', bp), ('svd_bp', svd_bp.get(
        v.target_fraction if rank_mode == 'params' else v.rank)
        if v.method in steps_lib.FACTORED_METHODS else None)):
      if base is None:
        rec[f'ratio_to_{key}'] = None
        continue
      per_round = [np.median(a) / np.median(b) for a, b in zip(v.times, base.times)]
      rec[f'ratio_to_{key}'] = med / median(base)
      # the fastest step of each: the least load-sensitive statistic on a shared machine
      rec[f'ratio_to_{key}_of_min'] = float(t.min() / np.concatenate(base.times).min())
      rec[f'ratio_to_{key}_round_min'] = float(min(per_round))
      rec[f'ratio_to_{key}_round_max'] = float(max(per_round))
      rec[f'flops_ratio_to_{key}'] = v.record['flops'] / base.record['flops']
      rec[f'temp_ratio_to_{key}'] = (v.record['temp_bytes'] / base.record['temp_bytes']
                                     if base.record['temp_bytes'] else None)
    rec.update({
        'steps': steps, 'rounds': rounds, 'warmup': warmup, 'rank_mode': rank_mode,
        'loadavg_start': list(loadavg_start), 'loadavg_end': list(loadavg_end),
        'timestamp': stamp,
        'config': {'act': config.model.act, 'split': config.model.split,
                   'overrides': config.model.overrides, 'optimizer': config.opt.name,
                   'align': config.dfa.align, 'align_weight': config.dfa.align_weight,
                   'orth_weight': config.dfa.orth_weight, 'feedback': config.dfa.feedback,
                   'delivery': config.dfa.delivery, 'kwargs': config.model.kwargs.to_dict(),
                   'signal': config.dfa.get('signal', 'global'),
                   'blockwise': bool(config.dfa.get('blockwise', False)),
                   'xla_scheduler': config.train.get('xla_scheduler', 'auto')},
    })
    records.append(rec)
  for v in variants:  # free device buffers before the next model
    v.state = v.compiled = None
  return records


# ------------------------------------------------------------------------------- reports


def _mib(x) -> str:
  return '–' if x is None else f'{x / 2**20:.1f}'


def _x(x) -> str:
  return '–' if x is None else f'{x:.2f}'


def _fraction(r) -> str:
  if r['method'] not in steps_lib.FACTORED_METHODS:
    return '1 (dense)'
  return f'{r["param_fraction"]:.3f} (rank {r["rank"]:g})'


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
  """One row per record: time, throughput, ratios, FLOPs and memory."""
  head = ('| model | method | params (fraction) | step ms, median [p25–p75] | img/s | time ×bp '
          '[round min–max] | min time ×bp | time ×svd_bp | GFLOP | FLOP ×bp | temp MiB '
          '| temp ×bp | args MiB | params MiB | opt MiB |')
  lines = [head, '|' + '---|' * head.count(' | ') + '---|']
  for r in records:
    ratio = '–' if r.get('ratio_to_bp') is None else (
        f'{r["ratio_to_bp"]:.2f} [{r["ratio_to_bp_round_min"]:.2f}–'
        f'{r["ratio_to_bp_round_max"]:.2f}]')
    lines.append(
        f'| {r["model"]} | {r["method"]} | {_fraction(r)} | '
        f'{r["step_time_median_s"] * 1e3:.1f} [{r["step_time_p25_s"] * 1e3:.1f}–'
        f'{r["step_time_p75_s"] * 1e3:.1f}] | {r["images_per_s"]:.0f} | {ratio} | '
        f'{_x(r.get("ratio_to_bp_of_min"))} | '
        f'{_x(r.get("ratio_to_svd_bp"))} | {r["flops"] / 1e9:.2f} | '
        f'{_x(r.get("flops_ratio_to_bp"))} | {_mib(r["temp_bytes"])} | '
        f'{_x(r.get("temp_ratio_to_bp"))} | {_mib(r["argument_bytes"])} | '
        f'{_mib(r["param_bytes"])} | {_mib(r["opt_state_bytes"])} |')
  return '\n'.join(lines)


def sweep_table(records: Sequence[dict[str, Any]]) -> str:
  """Compact view for sweeps: one row per (model, parameter fraction); time ratios to ``bp``."""
  lines = ['| model | params | method: step ms (×bp) | temp MiB |', '|---|---|---|---|']
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in records:
    dense = r['method'] not in steps_lib.FACTORED_METHODS
    key = (r['model'], '1 (dense)' if dense else f'{r["param_fraction"]:.3f}')
    groups.setdefault(key, []).append(r)
  for (model, frac), rs in groups.items():
    times = ', '.join(f'{r["method"]} {r["step_time_median_s"] * 1e3:.0f} '
                      f'({_x(r.get("ratio_to_bp"))})' for r in rs)
    temps = ', '.join(f'{r["method"]} {_mib(r["temp_bytes"])}' for r in rs)
    lines.append(f'| {model} | {frac} | {times} | {temps} |')
  return '\n'.join(lines)


def target_table(records: Sequence[dict[str, Any]]) -> str:
  """The issue's targets, per model and rank, with the measured ratios (time; < 1 is faster)."""
  lines = ['| model | check | measured | target | met |', '|---|---|---|---|---|']

  def row(model, check, value, target, lower=True):
    if value is None:
      return
    met = value <= target if lower else value >= target
    lines.append(f'| {model} | {check} | {value:.2f} | {"≤" if lower else "≥"} {target:.2f} | '
                 f'{"yes" if met else "**no**"} |')

  for r in records:
    m, frac = r['model'], r.get('target_param_fraction')
    if r['method'] == 'dfa':
      row(m, 'dfa time / bp time (same weights)', r.get('ratio_to_bp'),
          TARGET_LOCAL_VS_SAME_WEIGHTS)
      row(m, 'dfa FLOPs / bp FLOPs', r.get('flops_ratio_to_bp'), TARGET_LOCAL_VS_SAME_WEIGHTS)
    if r['method'] != 'ssa':
      continue
    at = f' at {r["param_fraction"]:.3f} of params'
    row(m, f'ssa time / svd_bp time (same weights){at}', r.get('ratio_to_svd_bp'),
        TARGET_LOCAL_VS_SAME_WEIGHTS)
    row(m, f'ssa FLOPs / svd_bp FLOPs{at}', r.get('flops_ratio_to_svd_bp'),
        TARGET_LOCAL_VS_SAME_WEIGHTS)
    if frac is not None and abs(frac - 0.25) < 1e-9:
      row(m, f'ssa time / dense bp time{at}', r.get('ratio_to_bp'), TARGET_SSA_VS_BP_AT_QUARTER)
      row(m, f'ssa time / svd_bp time{at}', r.get('ratio_to_svd_bp'),
          TARGET_SSA_VS_SVD_BP_AT_QUARTER)
      row(m, f'ssa temp bytes / bp temp bytes{at}', r.get('temp_ratio_to_bp'), 1.0)
      row(m, f'ssa temp bytes / svd_bp temp bytes{at}', r.get('temp_ratio_to_svd_bp'), 1.0)
  # under the local signal, memory flat in depth: ResNet-56 against bp and against ResNet-20
  ssa = {r['model']: r for r in records if r['method'] == 'ssa'
         and (r.get('config') or {}).get('signal') == 'local'}
  if 'resnet56' in ssa:
    row('resnet56', 'ssa temp bytes / bp temp bytes, local signal',
        ssa['resnet56'].get('temp_ratio_to_bp'), TARGET_LOCAL_SIGNAL_TEMP_VS_BP)
    if 'resnet20' in ssa:
      row('resnet56', 'ssa temp bytes / ResNet-20 ssa temp bytes, local signal',
          ssa['resnet56']['temp_bytes'] / ssa['resnet20']['temp_bytes'],
          TARGET_LOCAL_SIGNAL_DEPTH_GROWTH)
  return '\n'.join(lines)


def markdown_report(records: Sequence[dict[str, Any]], command: str) -> str:
  r0 = records[0]
  loads = sorted({(tuple(r['loadavg_start']), tuple(r['loadavg_end'])) for r in records})
  load_text = '; '.join(f'{a[0]:.2f} → {b[0]:.2f}' for a, b in loads)
  return '\n'.join([
      f'Command: `{command}`', '',
      f'Machine: {r0["device_count"]}× {r0["device"]} ({r0["cpu"]}, {r0["cpu_count"]} CPUs); '
      f'jax {r0["jax_version"]}, jaxlib {r0["jaxlib_version"]}, Python {r0["python"]}; '
      f'{r0["timestamp"]}. 1-minute load average at start → end of each model\'s run: '
      f'{load_text}. XLA_FLAGS: `{r0["xla_flags"] or "(none)"}`.', '',
      f'Batch {r0["batch_size"]} of shape {tuple(r0["image_shape"])}, {r0["num_classes"]} '
      f'classes, random data; {r0["rounds"]} interleaved rounds × {r0["steps"]} timed steps per '
      f'variant after {r0["warmup"]} warm-up steps. Ratios are step-time ratios (< 1: faster). '
      'Memory and FLOPs from XLA\'s compiled `memory_analysis()` / `cost_analysis()`; temp = '
      'temporaries (activations and workspace), args = donated state + batch; "min time ×bp" '
      'compares the fastest step of each method (least sensitive to other load).', '',
      markdown_table(records), '', 'By model and parameter fraction:', '', sweep_table(records),
      '', 'Targets:', '', target_table(records), ''])


# ---------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(prog='python -m benchmarks.step', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default=None,
                 help='comma separated model names (default small_conv; depth sweep: '
                      + ','.join(DEPTH_MODELS) + ')')
  p.add_argument('--methods', default=','.join(steps_lib.METHODS))
  p.add_argument('--ranks', default=None,
                 help='comma separated; parameter fractions (--rank_mode=params) or model.rank '
                      'values (--rank_mode=layer) for svd_bp/ssa (default 0.25; rank sweep: '
                      + ','.join(map(str, RANK_SWEEP)) + ')')
  p.add_argument('--rank_mode', choices=('params', 'layer'), default='params')
  p.add_argument('--sweep', choices=('none', 'rank', 'depth'), default='none')
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dataset', default='cifar10', help='shapes only: cifar10 | cifar100 | ...')
  p.add_argument('--config', default=None, help='config file[:arg] (default configs/default.py)')
  p.add_argument('--set', action='append', default=[], metavar='SECTION.FIELD=VALUE',
                 help='config override, repeatable, e.g. --set model.act=relu')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--xla_flags', default='',
                 help='appended to $XLA_FLAGS before JAX starts, e.g. '
                      '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED')
  p.add_argument('--out', help='JSON path; the markdown goes next to it (.md)')
  p.add_argument('--render', metavar='JSON', help='measure nothing: rewrite JSON\'s .md from it')
  p.add_argument('--command', help='with --render: the command to quote, when the JSON lacks it')
  args = p.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      records = json.load(f)
    _write_markdown(records, records[0].get('command') or args.command or '(not recorded)',
                    args.render)
    return records
  if not args.out:
    p.error('--out is required (or --render).')
  if args.xla_flags:  # read when the backend starts, i.e. at the first computation below
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {args.xla_flags}'.strip()

  models = args.models or (','.join(DEPTH_MODELS) if args.sweep == 'depth' else 'small_conv')
  ranks = args.ranks or (','.join(map(str, RANK_SWEEP)) if args.sweep == 'rank' else '0.25')
  from lrdfa_jax import data as data_lib
  info = data_lib.DATASETS[args.dataset]
  base = load_config(args.config, args.set)
  records = []
  for name in filter(None, models.split(',')):
    config = with_fields(base, model__name=name, data__name=args.dataset)
    records += benchmark(config, [m for m in args.methods.split(',') if m],
                         [float(r) for r in ranks.split(',') if r], batch_size=args.batch_size,
                         steps=args.steps, rounds=args.rounds, warmup=args.warmup,
                         rank_mode=args.rank_mode, image_shape=info['image_shape'],
                         num_classes=info['num_classes'], seed=args.seed)
  command = 'python -m benchmarks.step ' + shlex.join(sys.argv[1:] if argv is None else argv)
  for r in records:
    r['command'] = command
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(records, f, indent=1)
  _write_markdown(records, command, args.out)
  return records


def _write_markdown(records: Sequence[dict[str, Any]], command: str, json_path: str) -> None:
  md = os.path.splitext(json_path)[0] + '.md'
  text = markdown_report(records, command)
  with open(md, 'w') as f:
    f.write(text)
  print(text)
  print(f'wrote {json_path} and {md}')


if __name__ == '__main__':
  main()
