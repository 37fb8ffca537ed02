"""The pure training steps: ``TrainState``, ``StepConfig`` and the jitted train/eval/angle steps.

``train_step`` is pure, jitted once with the state donated (:func:`make_steps`), and runs data
parallel over a ``('data',)`` mesh of all devices (params replicated, batch sharded). Nothing
here reads a ConfigDict but :meth:`StepConfig.from_config`; :mod:`lrdfa_jax.build` makes the
state, :mod:`lrdfa_jax.train` runs the loop.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lrdfa_jax import dfa, feedback as fb
from lrdfa_jax.models.common import OVERLAP

METHODS = ('bp', 'svd_bp', 'dfa', 'ssa')
LOCAL_METHODS = ('dfa', 'ssa')
FACTORED_METHODS = ('svd_bp', 'ssa')


class TrainState(train_state.TrainState):
  """Params, optimizer state, BatchNorm statistics and the feedback, in one pytree.

  The feedback is fixed unless ``dfa.learn_feedback`` is set: then ``feedback_tx`` (its own
  optax chain) updates it from ``feedback_opt_state``, both checkpointed with the rest.
  """
  batch_stats: Any = None
  feedback: fb.Feedback | None = None
  feedback_tx: optax.GradientTransformation | None = flax.struct.field(pytree_node=False,
                                                                       default=None)
  feedback_opt_state: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of a step (hashable: one jit per run)."""
  method: str
  align: str = 'none'
  align_weight: float = 0.0
  tap_order: tuple[str, ...] = ()  # forward order of the taps (align='next')
  signal: str = 'global'           # global | local | mixed (lrdfa_jax.signals)
  signal_mix: float = 0.5
  readout_norm: bool = True
  readout_temperature: float = 0.5
  sim_weight: float = 0.0
  learn_feedback: str = 'none'     # none | local (learned readouts) | global (DKP)
  recon_weight: float = 0.0        # InfoPro's reconstruction term on the readouts' decoders
  recon_size: int = 0              # side of the reconstructed image (0: the input's)
  bp_blocks: tuple[str, ...] = ()  # blocks whose update is the backprop gradient (diagnosis)
  modules: tuple[tuple[str, ...], ...] = ()  # runs of blocks trained by backprop within (DGL)
  overlap: bool = False            # LoCo: a cut's gradient also trains the block below it
  blockwise: tuple[str, ...] = ()  # blocks updated right after their forward (dfa.blockwise)
  xla_scheduler: str = 'auto'      # auto | default | memory (XLA:CPU's; :func:`scheduled_jit`)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  tap_order: tuple[str, ...] = (),
                  blockwise: tuple[str, ...] = ()) -> 'StepConfig':
    """The step of ``config`` (``tap_order``: the model's taps in forward order, for
    ``align='next'`` and the patterns of ``dfa.modules``; ``blockwise``: the blocks the model
    updates itself under ``dfa.blockwise``)."""
    d = config.dfa
    return cls(method=d.method, align=d.align, align_weight=float(d.align_weight),
               tap_order=tuple(tap_order) if d.align == 'next' else (),
               signal=d.get('signal', 'global'), signal_mix=float(d.get('signal_mix', 0.5)),
               readout_norm=bool(d.get('readout_norm', True)),
               readout_temperature=float(d.get('readout_temperature', 0.5)),
               sim_weight=float(d.get('sim_weight', 0.0)),
               recon_weight=float(d.get('recon_weight', 0.0)),
               recon_size=int(d.get('recon_size', 0)),
               learn_feedback=(d.get('learn_feedback', 'none') if d.method in LOCAL_METHODS
                               else 'none'),
               bp_blocks=(tuple(d.get('bp_blocks', ())) if d.method in LOCAL_METHODS else ()),
               modules=(parse_modules(d.get('modules', ''), tuple(tap_order))
                        if d.method in LOCAL_METHODS else ()),
               overlap=bool(d.get('overlap', False)) and d.method in LOCAL_METHODS,
               blockwise=tuple(blockwise) if d.method in LOCAL_METHODS else (),
               xla_scheduler=(config.get('train') or {}).get('xla_scheduler', 'auto'))



def parse_modules(text: str, order: tuple[str, ...] = ()) -> tuple[tuple[str, ...], ...]:
  """``dfa.modules`` (``'conv1+conv2,conv3+fc1+head'``) as ``(('conv1', 'conv2'), ...)``.

  Each module is a run of consecutive blocks in forward order (``head``: the classifier). A
  name may be an fnmatch pattern (``'conv1+stage1_*,stage2_*,stage3_*+head'``: one module per
  ResNet stage), expanded over ``order``, the model's taps in forward order;
  :func:`lrdfa_jax.build.check_modules` checks the result against the model.
  """
  blocks = (*order, 'head')
  out = []
  for item in filter(None, (t.strip() for t in text.split(','))):
    names: list[str] = []
    for part in (n.strip() for n in item.split('+')):
      if not any(ch in part for ch in '*?['):
        names.append(part)
        continue
      if not order:
        raise ValueError(f'dfa.modules pattern {part!r} needs the model\'s blocks: build the '
                         'step with lrdfa_jax.build.step_config.')
      hits = [b for b in blocks if fnmatch.fnmatchcase(b, part)]
      if not hits:
        raise ValueError(f'dfa.modules pattern {part!r} matches no block; the blocks in '
                         f'forward order are {list(blocks)}.')
      names += hits
    if len(names) < 2 or not all(names):
      raise ValueError(f'dfa.modules item {item!r} must join two or more blocks with +, '
                       "e.g. 'conv3+fc1+head'.")
    out.append(tuple(names))
  return tuple(out)


def joined_blocks(modules: tuple[tuple[str, ...], ...]) -> frozenset[str]:
  """The blocks whose input stays joined to the block below: every module member but its first."""
  return frozenset(n for m in modules for n in m[1:])


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
  v = {'params': params}
  if state.batch_stats:
    v['batch_stats'] = state.batch_stats
  return v


def in_blocks(name: str, blocks: tuple[str, ...]) -> bool:
  """Whether the top-level param ``name`` belongs to one of ``blocks``: it is one, or is named
  ``<block>_...`` (SmallConv's ``conv1_bn`` belongs to ``conv1``)."""
  return any(name == b or name.startswith(b + '_') for b in blocks)


def compute_updates(cfg: StepConfig, state: TrainState, batch: dict[str, Any]):
  """``(updates, aux)`` of the configured method: local (DFA/SSA) or backprop.

  With ``cfg.bp_blocks`` (a local method), the params of those blocks (:func:`in_blocks`) take
  the backprop gradient of the output loss through the whole net instead of their local update,
  and the rest keep theirs: the diagnosis "which block's local rule costs most".

  With ``cfg.modules`` the blocks of a module backprop into each other: only the first one's
  input is cut, and the module learns from its last block's signal (its readout, its
  feedback, or with ``head`` the output loss); the feedback has no entry for the other blocks.

  With ``cfg.overlap`` (LoCo, Xiong et al. 2020) the gradient that reaches a cut block input
  also trains the block below the cut, and stops at that block's input
  (:data:`lrdfa_jax.models.common.OVERLAP`).
  """
  local = cfg.method in LOCAL_METHODS
  if local and (cfg.modules or cfg.overlap):
    local = joined_blocks(cfg.modules) | ({OVERLAP} if cfg.overlap else set())

  def forward(params, local=local, local_step=None):
    variables = _variables(state, params)
    if local_step is not None:  # dfa.blockwise: the model returns the blocks' updates too
      out, mutated = state.apply_fn(variables, batch['image'], train=True, local=local,
                                    local_step=local_step,
                                    mutable=['batch_stats', 'local_grads'])
      return out, mutated.get('batch_stats', state.batch_stats), mutated['local_grads']['blocks']
    if state.batch_stats:
      out, mutated = state.apply_fn(variables, batch['image'], train=True, local=local,
                                    mutable=['batch_stats'])
      return out, mutated['batch_stats']
    return state.apply_fn(variables, batch['image'], train=True, local=local), state.batch_stats

  if cfg.method in LOCAL_METHODS:
    grads, aux = dfa.local_grads(forward, state.params, state.feedback, batch['label'],
                                 align=cfg.align, align_weight=cfg.align_weight,
                                 tap_order=cfg.tap_order, signal=cfg.signal,
                                 signal_mix=cfg.signal_mix, readout_norm=cfg.readout_norm,
                                 readout_temperature=cfg.readout_temperature,
                                 sim_weight=cfg.sim_weight,
                                 learn_feedback=cfg.learn_feedback,
                                 recon_weight=cfg.recon_weight, recon_size=cfg.recon_size,
                                 images=batch['image'], blockwise=cfg.blockwise)
    if cfg.bp_blocks:
      bp, _ = dfa.bp_grads(functools.partial(forward, local=False), state.params,
                           batch['label'])
      grads = {k: bp[k] if in_blocks(k, cfg.bp_blocks) else v for k, v in grads.items()}
  else:
    grads, aux = dfa.bp_grads(forward, state.params, batch['label'])
  return grads, aux


def train_step(state: TrainState, batch: dict[str, Any], cfg: StepConfig):
  """One update; pure. Returns ``(new_state, metrics)``."""
  grads, aux = compute_updates(cfg, state, batch)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=aux['extra'])
  if aux.get('feedback_grads') is not None:
    f_updates, f_opt_state = state.feedback_tx.update(aux['feedback_grads'],
                                                      state.feedback_opt_state, state.feedback)
    new_state = new_state.replace(feedback=optax.apply_updates(state.feedback, f_updates),
                                  feedback_opt_state=f_opt_state)
  metrics = {
      'loss': aux['loss'],
      'accuracy': 100.0 * jnp.mean(jnp.argmax(aux['logits'], -1) == batch['label']),  # %
      'update_norm': optax.global_norm(grads),
      'align_loss': aux['align_loss'],
      'local_loss': aux['local_loss'],
      'recon_loss': aux['recon_loss'],
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, Any]) -> dict[str, jax.Array]:
  """Sums over the real (``mask``) examples: loss, top-1 and top-5 hits, count."""
  logits, _ = state.apply_fn(_variables(state, state.params), batch['image'], train=False)
  mask = batch['mask']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  return {
      'loss_sum': jnp.sum(ce * mask),
      'top1_sum': jnp.sum((topk[:, 0] == batch['label']) * mask),
      'top5_sum': jnp.sum(jnp.any(topk == batch['label'][:, None], -1) * mask),
      'count': jnp.sum(mask),
  }


def backprop_reference(cfg: StepConfig) -> StepConfig:
  """The step whose update the angles compare against: ``cfg`` with the true BP gradient."""
  return dataclasses.replace(cfg, method='bp', bp_blocks=(), modules=(), overlap=False)


def angle_step(cfg: StepConfig, state: TrainState, batch: dict[str, Any]) -> dict[str, jax.Array]:
  """Per-layer angle (degrees) between the method's update and the true BP gradient."""
  local, _ = compute_updates(cfg, state, batch)
  bp, _ = compute_updates(backprop_reference(cfg), state, batch)
  return dfa.update_angles(local, bp)


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  devices = jax.devices()
  if num_devices:
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), ('data',))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


_CPU_SCHEDULER_TYPES = {'default': None, 'memory': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
XLA_SCHEDULERS = ('auto', *_CPU_SCHEDULER_TYPES)


def temp_bytes(compiled) -> float:
  """A compiled program's temporary bytes (``memory_analysis()``; inf where XLA gives none)."""
  analysis = compiled.memory_analysis()
  return float('inf') if analysis is None else analysis.temp_size_in_bytes


class SmallerProgram:
  """A jitted function compiled under both XLA:CPU schedulers, run as the program with fewer
  temporary bytes (``train.xla_scheduler='auto'`` on CPU).

  Each new input signature (tree structure, avals, shardings) lowers once and compiles twice,
  once a scheduler, and keeps the program that ``measure`` (``(scheduler, compiled) ->
  number``, default: :func:`temp_bytes`) rates lower (ties: the default scheduler); later calls
  with that signature run it. Both programs compute the same update (a scheduler orders the
  ops, it does not change them), so only memory and compile time depend on the choice. In a
  multi-process run process 0's choice is taken by every process, so that all run one program
  (one order of collectives). Why a rule does not do: under the local signal XLA:CPU's default
  scheduler frees each block's activations right after its backward and keeps a ResNet's
  temporaries flat in depth (ResNet-56 ssa 211 MiB against 719 under the memory scheduler),
  while on the BN SmallConv, whose first block dominates, the memory scheduler halves them
  (57.9 against 121.5 MiB); every other step takes the memory one (``docs/benchmarks.md``).

  Not a drop-in ``jax.jit``: positional arguments only, not callable under a transformation. A
  global ``XLA_FLAGS=--xla_cpu_scheduler_type=...`` overrides both programs' scheduler, and then
  ``chosen`` names one that did not run. ``chosen``: the scheduler kept for the last signature
  compiled (``None`` before the first call).
  """

  def __init__(self, fn, platform: str, measure=None, **jit_kwargs):
    self._jits = {s: jax.jit(fn, compiler_options=compiler_options(s, platform), **jit_kwargs)
                  for s in _CPU_SCHEDULER_TYPES}
    self._measure = measure or (lambda scheduler, compiled: temp_bytes(compiled))
    self._programs: dict[Any, tuple[str, Any]] = {}
    self.chosen: str | None = None

  @staticmethod
  def _signature(args) -> Any:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((jax.typeof(x), getattr(x, 'sharding', None)) for x in leaves)

  def program(self, *args) -> tuple[str, Any]:
    """The scheduler kept for ``args``' signature and its compiled program (both compiled
    and measured here the first time)."""
    key = self._signature(args)
    if key not in self._programs:
      lowered = {s: j.lower(*args) for s, j in self._jits.items()}
      with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:  # XLA frees the GIL
        compiled = dict(zip(lowered, pool.map(lambda l: l.compile(), lowered.values())))
      names = list(compiled)
      best = min(names, key=lambda s: self._measure(s, compiled[s]))
      if jax.process_count() > 1:  # one program everywhere
        best = names[int(multihost_utils.broadcast_one_to_all(np.int32(names.index(best))))]
      self._programs[key] = best, compiled[best]
      self.chosen = best
    return self._programs[key]

  def _cache_size(self) -> int:
    """How many input signatures are compiled (as ``jax.jit``'s)."""
    return len(self._programs)

  def lower(self, *args):
    """The kept scheduler's ``jax.stages.Lowered`` for ``args`` (as ``jax.jit(...).lower``;
    measuring compiles both first)."""
    return self._jits[self.program(*args)[0]].lower(*args)

  def __call__(self, *args):
    return self.program(*args)[1](*args)


def compiler_options(scheduler: str, platform: str) -> dict[str, str] | None:
  """The per-program XLA options for a ``train.xla_scheduler`` of ``'default'`` or
  ``'memory'`` on a device ``platform`` (``'auto'`` is :class:`SmallerProgram`'s).

  ``'memory'`` compiles with XLA:CPU's memory-minimising scheduler instead of its default.
  It changes the order of the ops, not the ops: the update is the same. Other platforms
  have their own schedulers, so there it is a no-op.
  """
  if scheduler not in _CPU_SCHEDULER_TYPES:
    raise ValueError(f'unknown train.xla_scheduler {scheduler!r} here; choose one of '
                     f'{", ".join(_CPU_SCHEDULER_TYPES)} (auto: SmallerProgram).')
  if _CPU_SCHEDULER_TYPES[scheduler] is None or platform != 'cpu':
    return None
  return {'xla_cpu_scheduler_type': _CPU_SCHEDULER_TYPES[scheduler]}


def scheduled_jit(fn, scheduler: str, platform: str, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)`` under a ``train.xla_scheduler``: a :class:`SmallerProgram`
  for ``'auto'`` on CPU, else the named scheduler's program (``'auto'`` elsewhere: the
  platform's own)."""
  if scheduler == 'auto':
    if platform == 'cpu':
      return SmallerProgram(fn, platform, **jit_kwargs)
    scheduler = 'default'
  return jax.jit(fn, compiler_options=compiler_options(scheduler, platform), **jit_kwargs)


def make_steps(cfg: StepConfig, mesh, state: TrainState):
  """The jitted train, eval and angle steps for a mesh: state replicated, batch sharded.

  The angle step (:func:`angle_step`) runs as two programs, the method's update and backprop's,
  and a third for the angles: one program holding both would need the local step's and
  backprop's temporaries at once, which makes a local run's peak memory exceed a bp run's (a
  ResNet-56 ssa run under the local signal: 1.18× bp's peak RSS with one program, 1.12× split,
  0.86× with no angle step; the rest is bp's own working set; ``docs/benchmarks.md``).
  The train step and the angle step's two updates compile under ``train.xla_scheduler``
  (:func:`scheduled_jit`; ``'auto'`` on CPU: both schedulers, the smaller program).
  """
  repl = NamedSharding(mesh, P())
  state_sharding = jax.tree.map(lambda _: repl, state)
  platform = mesh.devices.flat[0].platform
  train = scheduled_jit(functools.partial(train_step, cfg=cfg), cfg.xla_scheduler, platform,
                        donate_argnums=0, out_shardings=(state_sharding, repl))
  evaluate = jax.jit(eval_step, out_shardings=repl)
  method_updates, bp_updates = (
      scheduled_jit(lambda state, batch, c=c: compute_updates(c, state, batch)[0],
                    cfg.xla_scheduler, platform, out_shardings=repl)
      for c in (cfg, backprop_reference(cfg)))
  between = jax.jit(dfa.update_angles, out_shardings=repl)

  def angles(state, batch):
    return between(method_updates(state, batch), bp_updates(state, batch))
  return train, evaluate, angles
