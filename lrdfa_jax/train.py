"""Training system: TrainState, the pure steps, and ``train_and_evaluate``.

Only this module (and the small builders it calls) reads the ConfigDict; the library below
takes explicit arguments. ``train_step`` is pure, jitted once with the state donated, and runs
data parallel over a ``('data',)`` mesh of all devices (params replicated, batch sharded).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import platform
import time
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from lrdfa_jax import alignment
from lrdfa_jax import data as data_lib
from lrdfa_jax import dfa, feedback as fb, layers, losses, models, optim, signals
from lrdfa_jax import rank as rank_lib

METHODS = ('bp', 'svd_bp', 'dfa', 'ssa')
LOCAL_METHODS = ('dfa', 'ssa')
FACTORED_METHODS = ('svd_bp', 'ssa')
LAZY_DATASETS = ('imagenet2012',)  # streamed from tfds sources, decoded per batch


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

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  tap_order: tuple[str, ...] = ()) -> 'StepConfig':
    """The step of ``config`` (``tap_order``: the model's taps in forward order, for
    ``align='next'``)."""
    d = config.dfa
    return cls(method=d.method, align=d.align, align_weight=float(d.align_weight),
               tap_order=tuple(tap_order) if d.align == 'next' else (),
               signal=d.get('signal', 'global'), signal_mix=float(d.get('signal_mix', 0.5)),
               readout_norm=bool(d.get('readout_norm', True)),
               readout_temperature=float(d.get('readout_temperature', 0.5)),
               sim_weight=float(d.get('sim_weight', 0.0)),
               learn_feedback=(d.get('learn_feedback', 'none') if d.method in LOCAL_METHODS
                               else 'none'))


# ---------------------------------------------------------------------------------- steps


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
  v = {'params': params}
  if state.batch_stats:
    v['batch_stats'] = state.batch_stats
  return v


def compute_updates(cfg: StepConfig, state: TrainState, batch: dict[str, Any]):
  """``(updates, aux)`` of the configured method: local (DFA/SSA) or backprop."""
  local = cfg.method in LOCAL_METHODS

  def forward(params):
    variables = _variables(state, params)
    if state.batch_stats:
      out, mutated = state.apply_fn(variables, batch['image'], train=True, local=local,
                                    mutable=['batch_stats'])
      return out, mutated['batch_stats']
    return state.apply_fn(variables, batch['image'], train=True, local=local), state.batch_stats

  if local:
    grads, aux = dfa.local_grads(forward, state.params, state.feedback, batch['label'],
                                 align=cfg.align, align_weight=cfg.align_weight,
                                 tap_order=cfg.tap_order, signal=cfg.signal,
                                 signal_mix=cfg.signal_mix, readout_norm=cfg.readout_norm,
                                 readout_temperature=cfg.readout_temperature,
                                 sim_weight=cfg.sim_weight,
                                 learn_feedback=cfg.learn_feedback)
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


def angle_step(cfg: StepConfig, state: TrainState, batch: dict[str, Any]) -> dict[str, jax.Array]:
  """Per-layer angle (degrees) between the method's update and the true BP gradient."""
  local, _ = compute_updates(cfg, state, batch)
  bp, _ = compute_updates(dataclasses.replace(cfg, method='bp'), state, batch)
  return dfa.update_angles(local, bp)


def _svd_layers(params: Any) -> dict[str, Any]:
  """``'stage1_block0/conv1'`` -> factored layer (:func:`lrdfa_jax.rank.svd_layers`)."""
  return {'/'.join(p): l for p, l in rank_lib.svd_layers(params).items()}


def layer_stats(params: Any) -> dict[str, jax.Array]:
  """Orthogonality error ``‖UᵀU−I‖²/r² + ‖VᵀV−I‖²/r²`` and rank of every factored layer."""
  out = {}
  for name, l in _svd_layers(params).items():
    out[f'orth/{name}'] = losses.orthogonality(l['u'], l['v'])
    out[f'rank/{name}'] = jnp.asarray(l['s'].shape[0])
    out[f'eff_rank/{name}'] = jnp.sum(jnp.abs(l['s']) > 1e-3 * jnp.max(jnp.abs(l['s'])))
  return out


# ------------------------------------------------------------------------------ building


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


class DivergenceError(FloatingPointError):
  """Training diverged (non-finite or exploding loss); the message says what was kept."""


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails fast, before anything is loaded or written."""
  method = config.dfa.method
  if method not in METHODS:
    raise ConfigError(f'unknown dfa.method {method!r}; choose one of {", ".join(METHODS)}.')
  if config.model.name not in models.MODELS:
    raise ConfigError(f'unknown model.name {config.model.name!r}; choose one of '
                      f'{", ".join(sorted(models.MODELS))}.')
  if config.data.source not in data_lib.SOURCES:
    raise ConfigError(f'unknown data.source {config.data.source!r}; choose one of '
                      f'{", ".join(data_lib.SOURCES)}.')
  bs = config.train.batch_size
  if bs <= 0:
    raise ConfigError(f'train.batch_size={bs}: give a positive batch size (e.g. 128).')
  if bs % num_devices:
    raise ConfigError(f'train.batch_size={bs} is not divisible by the {num_devices} devices; '
                      f'use a multiple of {num_devices}.')
  if config.train.epochs < 1:
    raise ConfigError(f'train.epochs={config.train.epochs}: give at least 1 epoch '
                      '(train.stop_after_steps ends a run early).')
  if not config.opt.lr > 0:
    raise ConfigError(f'opt.lr={config.opt.lr}: the learning rate must be positive '
                      '(e.g. 1e-3).')
  r = config.get('rank')
  if r is not None and r.epochs:
    if method not in FACTORED_METHODS:
      raise ConfigError(f'rank.epochs reduces factored layers: it applies to '
                        f'{", ".join(FACTORED_METHODS)}, not {method}. Leave it ().')
    if any(int(e) != e or not 1 <= e <= config.train.epochs for e in r.epochs):
      raise ConfigError(f'rank.epochs={tuple(r.epochs)}: give epochs in [1, '
                        f'{config.train.epochs}] after which to reduce, e.g. (3, 6).')
    if not 0.0 < r.energy <= 1.0:
      raise ConfigError(f'rank.energy={r.energy}: the share of Σ s² to keep lies in (0, 1].')
    if not (r.floor >= 1 and float(r.floor).is_integer()) and not 0.0 < r.floor < 1.0:
      raise ConfigError(f'rank.floor={r.floor}: an int rank >= 1 or a fraction in (0, 1).')
  if config.train.get('max_loss', 0.0) < 0:
    raise ConfigError('train.max_loss must be >= 0 (0: 20 × the chance loss ln(classes)).')
  if config.dfa.align not in dfa.ALIGNMENTS:
    raise ConfigError(f'unknown dfa.align {config.dfa.align!r}; choose one of {dfa.ALIGNMENTS}.')
  d = config.dfa
  if d.get('signal', 'global') not in signals.SIGNALS:
    raise ConfigError(f'unknown dfa.signal {d.signal!r}; choose one of {signals.SIGNALS}.')
  if d.get('readout_basis', 'sinusoidal') not in signals.BASES:
    raise ConfigError(f'unknown dfa.readout_basis {d.readout_basis!r}; choose one of '
                      f'{signals.BASES}.')
  if not 0.0 <= d.get('signal_mix', 0.5) <= 1.0 or not 0.0 <= d.get('sim_weight', 0.0) <= 1.0:
    raise ConfigError('dfa.signal_mix and dfa.sim_weight are shares: give values in [0, 1].')
  learn = d.get('learn_feedback', 'none')
  if learn not in dfa.LEARN_FEEDBACK:
    raise ConfigError(f'unknown dfa.learn_feedback {learn!r}; choose one of {dfa.LEARN_FEEDBACK}.')
  if method in LOCAL_METHODS and learn != 'none' and \
      (learn == 'global') != (d.get('signal', 'global') == 'global'):
    raise ConfigError(f"dfa.learn_feedback={learn!r} needs dfa.signal="
                      f"{'global' if learn == 'global' else 'local or mixed'}.")
  if d.get('readout_temperature', 0.5) <= 0:
    raise ConfigError('dfa.readout_temperature must be positive (LLS uses 0.5).')


def build_model(config: ml_collections.ConfigDict, num_classes: int, rank_overrides: str = ''):
  """Dense model for ``bp``/``dfa``; SVD layers at ``model.rank`` for ``svd_bp``/``ssa``.

  ``rank_overrides`` (``'conv2:12,fc1:30'``, after ``model.overrides``, so they win): the
  per-layer ranks of a model reduced during training (:mod:`lrdfa_jax.rank`).
  """
  m = config.model
  rank = m.rank if config.dfa.method in FACTORED_METHODS else None
  overrides = None
  if rank is not None:
    overrides = parse_overrides(m.overrides)
    for name, r in parse_overrides(rank_overrides).items():
      overrides.pop(name, None)  # re-inserted last: the last matching pattern wins
      overrides[name] = r
  return models.build_model(m.name, num_classes=num_classes, rank=rank, overrides=overrides,
                            split=m.split, act=m.act, **m.kwargs.to_dict())


def parse_overrides(text: str) -> dict[str, Any]:
  """``'conv1:dense,fc1:0.5,head:10,x:full'`` -> ``{'conv1': 'dense', 'fc1': 0.5, 'head': 10,
  'x': 'full'}``."""
  out: dict[str, Any] = {}
  for item in filter(None, (t.strip() for t in text.split(','))):
    name, sep, value = item.partition(':')
    if not sep:
      raise ConfigError(f'model.overrides item {item!r} must look like layer:rank, '
                        'layer:full or layer:dense.')
    value = value.strip()
    if value in ('dense', 'full'):
      out[name.strip()] = value
    else:
      try:
        out[name.strip()] = float(value) if '.' in value else int(value)
      except ValueError:
        raise ConfigError(f'model.overrides: {value!r} for {name!r} is neither a rank nor '
                          "'full' nor 'dense'.") from None
  return out


def build_feedback(config, key, params, tap_shapes, num_classes) -> fb.Feedback:
  """Structured feedback for ``ssa``, dense random for ``dfa``; none for backprop."""
  d = config.dfa
  if d.method not in LOCAL_METHODS:
    return fb.Feedback(groups={}, index=())
  kind = d.feedback if d.feedback != 'auto' else ('structured' if d.method == 'ssa' else 'dense')
  ranks = {}
  for name in tap_shapes:
    layer = models.output_layer(params, name)  # the layer that writes the tap
    k = layer['s'].shape[0] if layers.is_svd_layer(layer) else num_classes
    ranks[name] = min(k, d.feedback_rank) if d.feedback_rank else k
  if d.get('signal', 'global') != 'global':  # the fixed local readouts are the feedback
    return signals.init_readout(key, signals.readout_widths(tap_shapes, d.readout_dim),
                                num_classes, basis=d.readout_basis, ranks=ranks,
                                scale=d.feedback_scale)
  return fb.init_feedback(key, dfa.tap_widths(tap_shapes, d.delivery), num_classes, kind=kind,
                          ranks=ranks, scale=d.feedback_scale)


def tap_shapes(model, image_shape) -> dict[str, jax.ShapeDtypeStruct]:
  """The model's taps as shapes (batch 1), in forward order (pytrees sort dict keys; this does not)."""
  order: dict[str, Any] = {}
  x = jnp.zeros((1, *image_shape), jnp.float32)

  def taps(x):
    variables = model.init(jax.random.key(0), x, train=False)
    out = model.apply(variables, x, train=False)[1]
    order.update((n, None) for n in out)  # recorded while tracing, before the output is flattened
    return out
  shapes = jax.eval_shape(taps, x)
  return {n: shapes[n] for n in order}


def tap_order(model, image_shape) -> tuple[str, ...]:
  """The model's tap names in forward order."""
  return tuple(tap_shapes(model, image_shape))


def build_feedback_tx(config, steps_per_epoch: int = 1) -> optax.GradientTransformation | None:
  """The optax chain of learned feedback (``dfa.learn_feedback``), None when it is fixed.

  AdamW at ``dfa.feedback_lr`` with decoupled weight decay ``dfa.feedback_weight_decay``,
  the rate multiplied by ``dfa.feedback_lr_decay`` after every epoch (DKP's recipe:
  1e-4, 1e-6, 0.8).
  """
  d = config.dfa
  if d.method not in LOCAL_METHODS or d.get('learn_feedback', 'none') == 'none':
    return None
  lr = optax.exponential_decay(d.feedback_lr, transition_steps=max(steps_per_epoch, 1),
                               decay_rate=d.feedback_lr_decay, staircase=True)
  return optax.adamw(lr, weight_decay=d.feedback_weight_decay)


def create_train_state(config, model, tx, image_shape, num_classes, key,
                       steps_per_epoch: int = 1) -> TrainState:
  """A fresh state; ``steps_per_epoch`` sets learned feedback's per-epoch decay only."""
  k_init, k_fb = jax.random.split(key)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init(k_init, x, train=False)
  params = variables['params']
  shapes = jax.eval_shape(lambda v: model.apply(v, x, train=False)[1], variables)
  feedback = build_feedback(config, k_fb, params, shapes, num_classes)
  feedback_tx = build_feedback_tx(config, steps_per_epoch)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           batch_stats=variables.get('batch_stats'), feedback=feedback,
                           feedback_tx=feedback_tx,
                           feedback_opt_state=feedback_tx.init(feedback) if feedback_tx else None)


def build_tx(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain of the config and its learning-rate schedule."""
  o = config.opt
  schedule = optim.make_schedule(o.lr, total_steps, kind=o.schedule,
                                 warmup_steps=int(o.warmup_steps))
  factored = config.dfa.method in FACTORED_METHODS
  return optim.build_optimizer(learning_rate=schedule, optimizer=o.name, b1=o.b1, b2=o.b2,
                               momentum=o.momentum, weight_decay=o.weight_decay,
                               orth_weight=config.dfa.orth_weight if factored else 0.0,
                               hoyer_weight=config.dfa.hoyer_weight if factored else 0.0,
                               retract=o.retract_every,
                               clip_norm=o.clip_norm), schedule


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  devices = jax.devices()
  if num_devices:
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), ('data',))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def make_steps(cfg: StepConfig, mesh, state: TrainState):
  """The jitted train, eval and angle steps for a mesh: state replicated, batch sharded."""
  repl = NamedSharding(mesh, P())
  state_sharding = jax.tree.map(lambda _: repl, state)
  train = jax.jit(functools.partial(train_step, cfg=cfg), donate_argnums=0,
                  out_shardings=(state_sharding, repl))
  evaluate = jax.jit(eval_step, out_shardings=repl)
  angles = jax.jit(functools.partial(angle_step, cfg), out_shardings=repl)
  return train, evaluate, angles


# ---------------------------------------------------------------------------------- loop


def _dataset_info(config) -> dict[str, Any]:
  d = config.data
  if d.source == 'synthetic':
    s = d.synthetic
    return dict(num_classes=s.num_classes, image_shape=tuple(s.image_shape), mean=(0.5,) * 3,
                std=(0.25,) * 3)
  if d.name not in data_lib.DATASETS:
    raise ConfigError(f'unknown data.name {d.name!r}; choose one of '
                      f'{", ".join(sorted(data_lib.DATASETS))}.')
  info = dict(data_lib.DATASETS[d.name])
  if d.get('image_size'):
    if d.name not in LAZY_DATASETS:
      raise ConfigError(f'data.image_size applies to {", ".join(LAZY_DATASETS)} (images are '
                        f'resized there); {d.name} keeps {info["image_shape"][:2]}. Leave it 0.')
    info['image_shape'] = (d.image_size, d.image_size, 3)
  return info


def load_data(config) -> dict[str, tuple[Any, np.ndarray | None]]:
  """Train/test ``(images, labels)``, plus a ``'validation'`` slice held out of train when
  asked for. Lazy sources (ImageNet) come as ``(source, None)``; see data.train_batches."""
  d = config.data
  extra = dict(d.synthetic.to_dict()) if d.source == 'synthetic' else {}
  if 'image_shape' in extra:
    extra['image_shape'] = tuple(extra['image_shape'])
  splits = data_lib.load(d.source, d.name, data_dir=d.data_dir, cache_dir=d.cache_dir, **extra)
  splits = {k: (v, None) if not isinstance(v, tuple) else v for k, v in splits.items()}
  if d.validation_size:
    images, labels = splits['train']
    if d.validation_size >= len(images):
      raise ConfigError(f'data.validation_size={d.validation_size} leaves no training images '
                        f'out of {len(images)}.')
    order = np.random.default_rng(0).permutation(len(images))  # fixed split, seed-independent
    val, keep = order[:d.validation_size], np.sort(order[d.validation_size:])
    if labels is None:
      splits['train'] = (data_lib.Subset(images, keep), None)
      splits['validation'] = (data_lib.Subset(images, np.sort(val)), None)
    else:
      splits['train'] = (images[keep], labels[keep])
      splits['validation'] = (images[val], labels[val])
  return splits


def _machine() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, 'device_kind', dev.platform)
  return f'{jax.device_count()}x {kind} ({platform.machine()}, {os.cpu_count()} CPUs)'


def evaluate(eval_fn, state, images, labels, *, batch_size, info, mesh,
             workers: int = 16) -> dict[str, float]:
  """Top-1/top-5 accuracy (percent) and mean loss over every example."""
  totals = None
  for batch in data_lib.eval_batches(images, labels, batch_size=batch_size, mean=info['mean'],
                                     std=info['std'], process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     image_size=info['image_shape'][0], workers=workers):
    out = eval_fn(state, shard_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  n = float(totals['count'])
  return {'accuracy': 100.0 * float(totals['top1_sum']) / n,
          'top5': 100.0 * float(totals['top5_sum']) / n, 'loss': float(totals['loss_sum']) / n}


def _all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _checkpoint_manager(workdir: str, keep: int):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _save(mngr, state) -> None:
  import orbax.checkpoint as ocp
  mngr.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state))


def _restore(mngr, state):
  import orbax.checkpoint as ocp
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))


def _restore_checked(mngr, state, workdir: str):
  """The latest checkpoint restored into ``state``'s structure, refused in one line when it
  does not fit (another model, method or optimizer) or holds non-finite params."""
  try:
    restored = _restore(mngr, state)
  except Exception as e:  # noqa: BLE001 (orbax: a tree, shape or dtype that does not match)
    raise ConfigError(f'the checkpoint in {workdir}/checkpoints does not fit this config (its '
                      f'model, method or optimizer differ; orbax: {type(e).__name__}); use a '
                      'new --workdir.') from None
  if not _all_finite(restored.params):
    raise DivergenceError(f'the checkpoint of step {mngr.latest_step()} in {workdir} holds '
                          'non-finite params and cannot be resumed; start again in a new '
                          '--workdir.')
  return restored


# fields that change what is logged or saved, not what is trained
MONITORING = ('train.progress_bar', 'train.log_every', 'train.angle_every',
              'train.eval_every_epochs', 'train.checkpoint_every_epochs',
              'train.keep_checkpoints', 'data.workers')
# ... and the ones a resume may change too: where the run stops, how it is spread, where the
# (checksummed) data is read from
RUN_INDEPENDENT = MONITORING + ('train.stop_after_steps', 'train.num_devices',
                                'train.distributed', 'train.coordinator_address',
                                'train.num_processes', 'train.process_id', 'train.timeout_s',
                                'train.heartbeat_s',
                                'data.cache_dir', 'data.data_dir')
# dfa fields backprop never reads: a bp/svd_bp run is the same run whatever they hold
BACKPROP_IGNORED = ('delivery', 'feedback', 'feedback_rank', 'feedback_scale', 'align',
                    'align_weight', 'signal', 'signal_mix', 'readout_dim', 'readout_basis',
                    'readout_norm', 'readout_temperature', 'sim_weight', 'learn_feedback',
                    'feedback_lr', 'feedback_weight_decay', 'feedback_lr_decay')
_FREE_FORM = ('model.kwargs',)  # compared whole: a key one side lacks is a difference


def _leaves(tree: dict, prefix: str = ''):
  for k, v in tree.items():
    if isinstance(v, dict) and prefix + k not in _FREE_FORM:
      yield from _leaves(v, f'{prefix}{k}.')
    else:
      yield prefix + k, v


def config_changes(old: dict, new: dict,
                   ignore: tuple[str, ...] = RUN_INDEPENDENT) -> list[tuple[str, Any, Any]]:
  """``(field, old, new)`` for every field where two config dicts (as in ``config.json``)
  differ in what they train.

  Not compared: the ``ignore`` fields, fields ``old`` lacks (added to the code after that
  run, with defaults that keep what it did), and for backprop the ``BACKPROP_IGNORED`` ones.
  """
  a, b = dict(_leaves(old)), dict(_leaves(new))
  backprop = b.get('dfa.method') not in LOCAL_METHODS
  return [(k, a[k], v) for k, v in sorted(b.items())
          if k in a and k not in ignore and a[k] != v
          and not (backprop and k.startswith('dfa.') and k[4:] in BACKPROP_IGNORED)]


def check_workdir(config: ml_collections.ConfigDict, workdir: str | None,
                  allow_changed_config: bool = False) -> list[tuple[str, Any, Any]]:
  """Refuses a workdir whose ``config.json`` is another run's (before anything is written).

  Returns the changed fields (empty for a new workdir or the same config); with
  ``allow_changed_config`` they are allowed, and recorded by the caller.
  """
  path = os.path.join(workdir, 'config.json') if workdir else None
  if path is None or not os.path.isfile(path):
    return []
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} cannot be read ({e}); use a new --workdir.') from None
  changes = config_changes(old, json.loads(config.to_json_best_effort()))
  if changes and not allow_changed_config:
    shown = '; '.join(f'{k}: {o!r} -> {n!r}' for k, o, n in changes[:4])
    more = f' and {len(changes) - 4} more' if len(changes) > 4 else ''
    raise ConfigError(f'{workdir} holds a run with another config ({shown}{more}); use a new '
                      '--workdir, or pass --allow_changed_config to continue that run with '
                      'this config.')
  return changes


def _log_train(writer, step, metrics, state, *, dt, lr, batch_size, epoch) -> float:
  """Writes train metrics and layer stats. Returns the loss."""
  metrics = jax.device_get(metrics)
  loss = float(metrics['loss'])
  scalars = {**{f'train/{k}': v for k, v in metrics.items()}, 'lr': lr, 'step_time_s': dt,
             'images_per_s': batch_size / dt, 'epoch': epoch}
  scalars.update(jax.device_get(layer_stats(state.params)))
  writer.write(step, scalars)
  return loss


def _checkpoint_steps(workdir: str | None) -> list[int]:
  """The finished checkpoint steps in ``workdir/checkpoints`` (read without creating it)."""
  path = os.path.join(workdir, 'checkpoints') if workdir else None
  if path is None or not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def rank_reductions(workdir: str | None, up_to_step: int | None = None) -> list[dict]:
  """The rank reductions of a run (``workdir/ranks.jsonl``) at or before ``up_to_step``."""
  from lrdfa_jax.writers import read_jsonl
  path = os.path.join(workdir, 'ranks.jsonl') if workdir else None
  if path is None or not os.path.exists(path):
    return []
  return [r for r in read_jsonl(path) if up_to_step is None or r['step'] <= up_to_step]


def reduce_ranks(config: ml_collections.ConfigDict, state: TrainState, num_classes: int
                 ) -> tuple[TrainState, dict[str, int]]:
  """``state`` with every factored layer cut to the rank that keeps ``rank.energy`` of its
  singular-value energy (not below ``rank.floor``), its optimizer moments and feedback sliced
  to match and ``apply_fn`` rebuilt at the new ranks; on the host. Also returns the new
  ranks by layer path (empty: nothing to cut, ``state`` unchanged)."""
  host = jax.device_get(state)
  ranks = rank_lib.choose_ranks(host.params, config.rank.energy, config.rank.floor)
  if not ranks:
    return state, {}
  params, opt_state, feedback, f_opt = rank_lib.reduce(
      host.params, host.opt_state, ranks, feedback=host.feedback,
      feedback_opt_state=host.feedback_opt_state)
  model = build_model(config, num_classes, rank_lib.rank_overrides(params))
  new = host.replace(apply_fn=model.apply, params=params, opt_state=opt_state,
                     feedback=feedback, feedback_opt_state=f_opt)
  return new, {'/'.join(p): r for p, r in ranks.items()}


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                       step: int | None = None) -> TrainState:
  """The TrainState saved in ``workdir/checkpoints`` (latest, or ``step``), on the host,
  at the ranks it had then (after any rank reduction)."""
  import orbax.checkpoint as ocp
  info = _dataset_info(config)
  steps = _checkpoint_steps(workdir)
  step = (steps[-1] if steps else None) if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints.')
  reduced = rank_reductions(workdir, step)
  model = build_model(config, info['num_classes'], reduced[-1]['overrides'] if reduced else '')
  tx, _ = build_tx(config, total_steps=1)  # the schedule does not shape the optimizer state
  state = create_train_state(config, model, tx, info['image_shape'], info['num_classes'],
                             jax.random.key(config.train.seed))
  mngr = _checkpoint_manager(workdir, config.train.keep_checkpoints)
  try:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  finally:
    mngr.close()


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` for a multi-process run (``train.distributed``).

  Auto-detected on TPU pods, SLURM and other clusters JAX knows; elsewhere from
  ``train.coordinator_address`` (``host:port`` of process 0), ``train.num_processes`` and
  ``train.process_id``. CPU processes exchange collectives through gloo.
  """
  t = config.train
  kwargs = {}
  if t.get('coordinator_address'):
    if t.num_processes < 1 or not 0 <= t.process_id < t.num_processes:
      raise ConfigError(f'train.coordinator_address={t.coordinator_address!r} needs '
                        'train.num_processes >= 1 and 0 <= train.process_id < num_processes '
                        f'(got {t.num_processes}, {t.process_id}).')
    kwargs = dict(coordinator_address=t.coordinator_address, num_processes=t.num_processes,
                  process_id=t.process_id, initialization_timeout=int(t.get('timeout_s', 300)))
  if t.get('heartbeat_s'):  # a process that dies stops the others after this many seconds
    kwargs['heartbeat_timeout_seconds'] = int(t.heartbeat_s)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None, *,
                       allow_changed_config: bool = False) -> dict:
  """Trains and evaluates; resumes from ``workdir/checkpoints`` when present.

  Without a ``workdir`` nothing is written. A workdir whose ``config.json`` differs from
  ``config`` (:func:`config_changes`) is refused before anything is written, unless
  ``allow_changed_config``; the changes are then logged to ``config_changes.jsonl``. A
  non-finite or exploding loss (``train.max_loss``) stops the run with a
  ``DivergenceError``; no diverged state is checkpointed. Returns the run summary (also written to
  ``workdir/summary.json``): final test accuracy in percent, params, wall time, config.
  """
  from tqdm import tqdm

  from lrdfa_jax.writers import MetricWriter, write_jsonl

  t_start = time.time()
  if config.train.distributed:
    initialize_distributed(config)
  primary = jax.process_index() == 0  # the one process that writes files and prints
  mesh = make_mesh(config.train.num_devices)
  check_config(config, mesh.size)
  info = _dataset_info(config)
  splits = load_data(config)
  images, labels = splits['train']
  tc = config.train
  steps_per_epoch = data_lib.num_train_batches(len(images), tc.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f'train.batch_size={tc.batch_size} exceeds the {len(images)} training '
                      'examples.')
  total_steps = tc.epochs * steps_per_epoch
  changes = check_workdir(config, workdir, allow_changed_config)  # reads only
  # a run reduced before its last checkpoint resumes at the ranks it had then
  steps_saved = _checkpoint_steps(workdir)
  reductions = rank_reductions(workdir, steps_saved[-1]) if steps_saved else []
  model = build_model(config, info['num_classes'],
                      reductions[-1]['overrides'] if reductions else '')
  tx, schedule = build_tx(config, total_steps)
  state = create_train_state(config, model, tx, info['image_shape'], info['num_classes'],
                             jax.random.key(tc.seed), steps_per_epoch)
  if config.dfa.method in FACTORED_METHODS:
    unmatched = models.unmatched_overrides(state.params, parse_overrides(config.model.overrides))
    if unmatched:
      raise ConfigError(f'model.overrides {unmatched} match no layer of {config.model.name}; '
                        f'its layers are {list(models.layer_paths(state.params))}.')
  cfg = StepConfig.from_config(
      config, tap_order(model, info['image_shape']) if config.dfa.align == 'next' else ())
  aligned = None
  if cfg.method in LOCAL_METHODS and cfg.method in FACTORED_METHODS and cfg.align_weight \
      and cfg.align in ('subspace', 'channel_subspace'):
    channels = (alignment.tap_channels(tap_shapes(model, info['image_shape']))
                if cfg.align == 'channel_subspace' else None)
    aligned, notice = alignment.coverage(
        state.params, state.feedback, cfg.align, channels=channels,
        dense_feedback=config.dfa.feedback == 'dense', signal=cfg.signal,
        delivery=config.dfa.delivery)
    if notice:
      logging.info('%s', notice)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  train_fn, eval_fn, angle_fn = make_steps(cfg, mesh, state)

  # Everything above validates; only now is the workdir written.
  mngr = None
  if workdir is not None:
    mngr = _checkpoint_manager(workdir, tc.keep_checkpoints)
    if mngr.latest_step() is not None:
      state = jax.device_put(_restore_checked(mngr, state, workdir), NamedSharding(mesh, P()))
    if primary:  # atomically: the other processes may be reading it (check_workdir)
      tmp = os.path.join(workdir, 'config.json.tmp')
      with open(tmp, 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
      os.replace(tmp, os.path.join(workdir, 'config.json'))
  step = resumed_at = int(jax.device_get(state.step))
  if primary and workdir is not None and os.path.exists(os.path.join(workdir, 'ranks.jsonl')):
    # drop the reductions an interrupted run made after its last checkpoint
    write_jsonl(os.path.join(workdir, 'ranks.jsonl'), reductions)
  rank_epochs = set(config.rank.epochs) if config.get('rank') else set()
  if changes and primary:
    with open(os.path.join(workdir, 'config_changes.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, 'changes': changes}) + '\n')
  # rows after `step` are a killed run's; every process reads them, the primary writes
  writer = MetricWriter(workdir, resume_step=step, write=primary)
  say = tqdm.write if primary else (lambda _: None)
  if step:
    say(f'Resuming from step {step} in {workdir}.')
  end_step = total_steps if not tc.stop_after_steps else min(total_steps, tc.stop_after_steps)
  bar = tqdm(total=end_step, initial=step, desc=f'{config.model.name}/{cfg.method}',
             disable=not tc.progress_bar or not primary, dynamic_ncols=True)
  test_metrics: dict[str, float] = {}
  val_metrics: dict[str, float] = {}
  last_log, t_log = step, time.time()
  max_loss = tc.get('max_loss', 0.0) or 20.0 * math.log(info['num_classes'])
  metrics = None

  def kept() -> str:
    last = mngr.latest_step() if mngr is not None else None
    return ('Nothing was saved (no --workdir).' if mngr is None else
            'No checkpoint had been saved yet, so none is kept.' if last is None else
            f'The checkpoint of step {last} (saved while the loss was below the limit) is '
            'kept; no diverged state was saved.')

  def check_loss(loss: float, at_step: int, what: str = 'train loss') -> None:
    if np.isfinite(loss) and loss <= max_loss:
      return
    raise DivergenceError(
        f'training diverged at step {at_step}: {what} {loss:.4g} '
        f'({"not finite" if not np.isfinite(loss) else f"above train.max_loss={max_loss:.3g}"}).'
        f' {kept()} Lower opt.lr (or set opt.clip_norm) and start again in a new --workdir.')

  try:
    while step < end_step:
      epoch, start_batch = divmod(step, steps_per_epoch)
      epoch_end = min(end_step, (epoch + 1) * steps_per_epoch)
      with data_lib.prefetch(data_lib.train_batches(
          images, labels, batch_size=tc.batch_size, seed=tc.seed, epoch=epoch,
          augment=config.data.augment, mean=info['mean'], std=info['std'],
          process_index=jax.process_index(), process_count=jax.process_count(),
          start_batch=start_batch, image_size=info['image_shape'][0],
          workers=config.data.workers)) as batches:
        for batch in itertools.islice(batches, epoch_end - step):
          batch = shard_batch(batch, mesh)
          if tc.angle_every and cfg.method in LOCAL_METHODS and step % tc.angle_every == 0 \
              and not writer.logged(step, 'angle/'):  # kept from before a resume
            angles = jax.device_get(angle_fn(state, batch))
            writer.write(step, {f'angle/{k}': v for k, v in angles.items()})
          state, metrics = train_fn(state, batch)
          step += 1
          bar.update(1)
          if step % tc.log_every == 0 or step == epoch_end:
            dt = (time.time() - t_log) / max(step - last_log, 1)
            last_log, t_log = step, time.time()
            loss = _log_train(writer, step, metrics, state, dt=dt, lr=float(schedule(step - 1)),
                              batch_size=tc.batch_size, epoch=step / steps_per_epoch)
            check_loss(loss, step)
            bar.set_postfix(loss=f'{loss:.3f}')
      epoch_done = step % steps_per_epoch == 0
      n_epoch = step // steps_per_epoch
      if epoch_done and n_epoch in rank_epochs:
        before = param_count(state.params)
        state, ranks = reduce_ranks(config, state, info['num_classes'])
        if ranks:  # new shapes: one recompile
          state = jax.device_put(state, NamedSharding(mesh, P()))
          train_fn, eval_fn, angle_fn = make_steps(cfg, mesh, state)
          record = {'step': step, 'epoch': n_epoch, 'ranks': ranks,
                    'overrides': rank_lib.rank_overrides(state.params),
                    'params_before': before, 'trainable_params': param_count(state.params)}
          reductions.append(record)
          if workdir is not None and primary:
            with open(os.path.join(workdir, 'ranks.jsonl'), 'a') as f:
              f.write(json.dumps(record) + '\n')
          writer.write(step, {'trainable_params': record['trainable_params']})
          shown = ', '.join(f'{k} {v}' for k, v in ranks.items())
          say(f'epoch {n_epoch}: ranks reduced ({shown}); {before:,} -> '
                     f'{record["trainable_params"]:,} trainable params')
      if (epoch_done and n_epoch % tc.eval_every_epochs == 0) or step == end_step:
        for split in [s for s in ('validation', 'test') if s in splits]:
          res = evaluate(eval_fn, state, *splits[split], batch_size=tc.batch_size, info=info,
                         mesh=mesh, workers=config.data.workers)
          writer.write(step, {f'{split}/{k}': v for k, v in res.items()})
          say(f'epoch {step / steps_per_epoch:.2f} step {step}: {split} accuracy '
                     f'{res["accuracy"]:.2f}% loss {res["loss"]:.4f}')
          check_loss(res['loss'], step, f'{split} loss')  # of the params about to be saved
          if split == 'test':
            test_metrics = res
          else:
            val_metrics = res
      if mngr is not None and ((epoch_done and n_epoch % tc.checkpoint_every_epochs == 0)
                               or step == end_step):
        if metrics is not None:
          check_loss(float(jax.device_get(metrics['loss'])), step)
        if not _all_finite(state.params):
          raise DivergenceError(f'non-finite params at step {step}; not checkpointing. {kept()} '
                                'Lower opt.lr and start again in a new --workdir.')
        _save(mngr, state)
    if not test_metrics and 'test' in splits:  # e.g. a rerun of a finished run
      test_metrics = evaluate(eval_fn, state, *splits['test'], batch_size=tc.batch_size,
                              info=info, mesh=mesh, workers=config.data.workers)
    if not val_metrics and 'validation' in splits:
      val_metrics = evaluate(eval_fn, state, *splits['validation'], batch_size=tc.batch_size,
                             info=info, mesh=mesh, workers=config.data.workers)
  finally:
    bar.close()
    if mngr is not None:
      mngr.wait_until_finished()
      mngr.close()
    writer.close()

  summary = {
      'model': config.model.name, 'dataset': config.data.name, 'source': config.data.source,
      'method': cfg.method, 'seed': tc.seed, 'step': step, 'epochs': step / steps_per_epoch,
      'final_test_accuracy': test_metrics.get('accuracy'), 'final_test_top5': test_metrics.get('top5'),
      'final_test_loss': test_metrics.get('loss'),
      'final_validation_accuracy': val_metrics.get('accuracy'),
      'final_validation_loss': val_metrics.get('loss'),
      'trainable_params': param_count(state.params),
      **({'initial_trainable_params': reductions[0]['params_before'],
          'rank_reductions': reductions}
         if reductions else {}),
      'wall_time_s': time.time() - t_start, 'machine': _machine(),
      'subspace_align_blocks': aligned,
      'config': json.loads(config.to_json_best_effort()),
      **({'config_changes': {'step': resumed_at, 'changes': changes}} if changes else {}),
  }
  if workdir is not None and primary:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
