"""From a config to what a run trains: validation, data, model, feedback, optimizer, state.

Only this module and :mod:`lrdfa_jax.train` read the ConfigDict; the library below takes
explicit arguments. :func:`setup` is the one sequence every caller uses (the training loop,
``restore_checkpoint``, the benchmarks, the tests): it validates and builds, and writes nothing.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lrdfa_jax import alignment
from lrdfa_jax import data as data_lib
from lrdfa_jax import dfa, feedback as fb, layers, models, optim, signals
from lrdfa_jax.steps import (FACTORED_METHODS, LOCAL_METHODS, METHODS, XLA_SCHEDULERS, StepConfig,
                             TrainState, in_blocks, parse_modules)

class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


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
  if config.dfa.get('modules', ''):
    if method not in LOCAL_METHODS:
      raise ConfigError(f'dfa.modules groups the blocks of a local method; {method} is not '
                        f'local ({", ".join(LOCAL_METHODS)}). Leave it empty.')
    if config.dfa.get('bp_blocks', ()):
      raise ConfigError('dfa.modules and dfa.bp_blocks do not combine; set one of them.')
  if config.dfa.get('overlap', False):
    if method not in LOCAL_METHODS:
      raise ConfigError(f'dfa.overlap changes where a local method\'s cuts stop the gradient; '
                        f'{method} is not local ({", ".join(LOCAL_METHODS)}). Set it False.')
    if config.model.name not in models.OVERLAP_MODELS:
      raise ConfigError(f'dfa.overlap is built for {", ".join(models.OVERLAP_MODELS)}, not '
                        f'{config.model.name}; set it False.')
  if config.dfa.get('blockwise', False) and method in LOCAL_METHODS:  # backprop ignores it
    d = config.dfa
    if config.model.name not in models.BLOCKWISE_MODELS:
      raise ConfigError(f'dfa.blockwise is built for {", ".join(models.BLOCKWISE_MODELS)}, not '
                        f'{config.model.name}; set it False.')
    clash = [f'dfa.{k}' for k in ('modules', 'overlap', 'bp_blocks', 'sim_weight') if d.get(k)]
    clash += ['model.kwargs.remat'] if (config.model.get('kwargs') or {}).get('remat') else []
    if d.get('signal', 'global') != 'local' or d.get('learn_feedback', 'none') == 'global' or clash:
      raise ConfigError('dfa.blockwise takes each block\'s update from its own output alone: it '
                        'needs dfa.signal=local and no ' + ', '.join(
                            clash or ['global signal or global feedback learning']) + '.')
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
  scale = config.opt.get('factor_lr_scale', 1.0)
  if scale != 1.0:
    if method not in FACTORED_METHODS:
      raise ConfigError(f'opt.factor_lr_scale scales the factors of '
                        f'{", ".join(FACTORED_METHODS)}; {method} has none. Leave it 1.')
    if not scale > 0:
      raise ConfigError(f'opt.factor_lr_scale={scale}: give a positive fraction of opt.lr '
                        '(1: the factors step at the same rate).')
  if config.train.get('max_loss', 0.0) < 0:
    raise ConfigError('train.max_loss must be >= 0 (0: 20 × the chance loss ln(classes)).')
  if config.model.get('conv_execution', 'auto') not in layers.CONV_EXECUTIONS:
    raise ConfigError(f'unknown model.conv_execution {config.model.conv_execution!r}; choose '
                      f'one of {layers.CONV_EXECUTIONS}.')
  if config.model.get('conv_kernel_grad', 'auto') not in layers.KERNEL_GRADS:
    raise ConfigError(f'unknown model.conv_kernel_grad {config.model.conv_kernel_grad!r}; '
                      f'choose one of {", ".join(layers.KERNEL_GRADS)}.')
  if not int(config.model.get('im2col_positions', layers.TINY_MAP)) >= 0:
    raise ConfigError('model.im2col_positions must be >= 0 (0: never run a conv as im2col).')
  if config.train.get('xla_scheduler', 'auto') not in XLA_SCHEDULERS:
    raise ConfigError(f'unknown train.xla_scheduler {config.train.xla_scheduler!r}; choose one '
                      f'of {", ".join(XLA_SCHEDULERS)}.')
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
  layers_ = d.get('readout_layers', 0)
  if not (isinstance(layers_, int) and layers_ >= 0):
    raise ConfigError(f'dfa.readout_layers={layers_!r}: give a count of hidden layers >= 0.')
  if layers_ and (method not in LOCAL_METHODS or d.get('signal', 'global') == 'global'):
    raise ConfigError('dfa.readout_layers adds layers to the local readout: it needs a local '
                      "method (dfa, ssa) with dfa.signal='local' or 'mixed'.")
  recon = d.get('recon_weight', 0.0)
  if recon < 0 or d.get('recon_size', 0) < 0:
    raise ConfigError('dfa.recon_weight and dfa.recon_size must be >= 0.')
  if recon and (method not in LOCAL_METHODS or learn != 'local'):
    raise ConfigError(f"dfa.recon_weight={recon:g} trains a decoder beside each learned local "
                      "readout: it needs a local method (dfa, ssa) with "
                      "dfa.learn_feedback='local'.")
  if d.get('readout_temperature', 0.5) <= 0:
    raise ConfigError('dfa.readout_temperature must be positive (LLS uses 0.5).')
  side, width = dataset_info(config)['image_shape'][:2]  # checks data.name, data.image_size
  size = d.get('recon_size', 0)
  if recon and side != width:
    raise ConfigError(f'dfa.recon_weight reconstructs square images; this input is '
                      f'{side}×{width}.')
  if recon and size and side % size:
    raise ConfigError(f'dfa.recon_size={size} does not divide the {side}-pixel input: '
                      f'give a divisor of {side} (0: the input itself).')


def dataset_info(config) -> dict[str, Any]:
  """``num_classes``, ``image_shape`` (after ``data.image_size``), ``mean`` and ``std``."""
  d = config.data
  if d.source == 'synthetic':
    s = d.synthetic
    return dict(num_classes=s.num_classes, image_shape=tuple(s.image_shape), mean=(0.5,) * 3,
                std=(0.25,) * 3)
  if d.name not in data_lib.DATASETS:
    raise ConfigError(f'unknown data.name {d.name!r}; choose one of '
                      f'{", ".join(sorted(data_lib.DATASETS))}.')
  spec = data_lib.DATASETS[d.name]
  info = {k: v for k, v in spec.items() if k != 'resized'}
  if d.get('image_size'):
    if not spec.get('resized'):
      resized = [n for n, i in data_lib.DATASETS.items() if i.get('resized')]
      raise ConfigError(f'data.image_size applies to {", ".join(resized)} (images are '
                        f'resized there); {d.name} keeps {info["image_shape"][:2]}. Leave it 0.')
    info['image_shape'] = (d.image_size, d.image_size, 3)
  return info


def load_data(config) -> dict[str, data_lib.ArraySource | data_lib.RecordSource]:
  """The train and test sources (:func:`lrdfa_jax.data.load`), plus a ``'validation'``
  slice held out of train when ``data.validation_size`` asks for one (a fixed split,
  independent of the seed)."""
  d = config.data
  extra = dict(d.synthetic.to_dict()) if d.source == 'synthetic' else {}
  if 'image_shape' in extra:
    extra['image_shape'] = tuple(extra['image_shape'])
  splits = data_lib.load(d.source, d.name, data_dir=d.data_dir, cache_dir=d.cache_dir, **extra)
  if d.validation_size:
    train = splits['train']
    if d.validation_size >= len(train):
      raise ConfigError(f'data.validation_size={d.validation_size} leaves no training images '
                        f'out of {len(train)}.')
    order = np.random.default_rng(0).permutation(len(train))  # fixed split, seed-independent
    val, keep = order[:d.validation_size], np.sort(order[d.validation_size:])
    # arrays keep the permuted order; records are read in file order (locality)
    splits['train'] = train.subset(keep)
    splits['validation'] = train.subset(val if train.decoded else np.sort(val))
  return splits


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
                            split=m.split, act=m.act,
                            conv_execution=m.get('conv_execution', 'auto'),
                            im2col_positions=m.get('im2col_positions', layers.TINY_MAP),
                            conv_kernel_grad=m.get('conv_kernel_grad', 'auto'),
                            **m.kwargs.to_dict())


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
  """Structured feedback for ``ssa``, dense random for ``dfa``; none for backprop.

  ``tap_shapes``: name -> shape of every tap, in forward order (:func:`tap_shapes`; the
  patterns of ``dfa.modules`` expand over that order; the draws do not depend on it).
  """
  d = config.dfa
  if d.method not in LOCAL_METHODS:
    return fb.Feedback(groups={}, index=())
  kind = d.feedback if d.feedback != 'auto' else ('structured' if d.method == 'ssa' else 'dense')
  modules = parse_modules(d.get('modules', ''), tuple(tap_shapes))
  inner = {n for m in modules for n in m[:-1]}  # no signal inside a module
  tap_shapes = {n: s for n, s in tap_shapes.items() if n not in inner}
  ranks = {}
  for name in tap_shapes:
    layer = models.output_layer(params, name)  # the layer that writes the tap
    k = layer['s'].shape[0] if layers.is_svd_layer(layer) else num_classes
    ranks[name] = min(k, d.feedback_rank) if d.feedback_rank else k
  if d.get('signal', 'global') != 'global':  # the fixed local readouts are the feedback
    hidden = {n: (d.readout_layers, s.shape[-1]) for n, s in tap_shapes.items()
              if d.get('readout_layers', 0) and len(s.shape) == 4}
    decoders = {n: s.shape[-1] for n, s in tap_shapes.items()
                if d.get('recon_weight', 0.0) and len(s.shape) == 4}
    if d.get('recon_weight', 0.0) and not decoders:
      raise ConfigError(f'dfa.recon_weight={d.recon_weight:g} decodes conv blocks with a local '
                        f'readout; {config.model.name} has none here: leave it 0.')
    return signals.init_readout(key, signals.readout_widths(tap_shapes, d.readout_dim),
                                num_classes, basis=d.readout_basis, ranks=ranks,
                                scale=d.feedback_scale, hidden=hidden, decoders=decoders)
  return fb.init_feedback(key, dfa.tap_widths(tap_shapes, d.delivery), num_classes, kind=kind,
                          ranks=ranks, scale=d.feedback_scale)


def tap_shapes(model, image_shape, variables=None) -> dict[str, jax.ShapeDtypeStruct]:
  """The model's taps as shapes (batch 1), in forward order (pytrees sort dict keys; this does
  not). ``variables``: the model's, if at hand (else they are traced from an init)."""
  order: dict[str, Any] = {}
  x = jnp.zeros((1, *image_shape), jnp.float32)

  def taps(x, variables):
    if variables is None:
      variables = model.init(jax.random.key(0), x, train=False)
    out = model.apply(variables, x, train=False)[1]
    order.update((n, None) for n in out)  # recorded while tracing, before the output is flattened
    return out
  shapes = jax.eval_shape(taps, x, variables)
  return {n: shapes[n] for n in order}


def tap_order(model, image_shape) -> tuple[str, ...]:
  """The model's tap names in forward order."""
  return tuple(tap_shapes(model, image_shape))


def check_modules(config: ml_collections.ConfigDict, order: tuple[str, ...]) -> None:
  """Fails unless ``dfa.modules`` names runs of consecutive blocks of the model (``order``:
  its taps in forward order, then ``head``), each block in one module (the method is checked
  by :func:`check_config`)."""
  text = config.dfa.get('modules', '')
  try:
    modules = parse_modules(text, order)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  blocks = (*order, 'head')
  seen: set[str] = set()
  for m in modules:
    unknown = [n for n in m if n not in blocks]
    if unknown:
      raise ConfigError(f'dfa.modules {unknown} name no block of {config.model.name}; its '
                        f'blocks in forward order are {list(blocks)}.')
    start = blocks.index(m[0])
    if m != blocks[start:start + len(m)]:
      raise ConfigError(f'dfa.modules {"+".join(m)!r} is not a run of consecutive blocks; in '
                        f'forward order they are {list(blocks)}.')
    if seen & set(m):
      raise ConfigError(f'dfa.modules puts {sorted(seen & set(m))} in two modules.')
    seen |= set(m)


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
  # one jitted program (big_vision's way): op by op, a zoo net's init compiles hundreds
  variables = jax.jit(functools.partial(model.init, train=False))(k_init, x)
  params = variables['params']
  feedback = build_feedback(config, k_fb, params, tap_shapes(model, image_shape, variables),
                            num_classes)
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
                               clip_norm=o.clip_norm,
                               factor_lr_scale=o.get('factor_lr_scale', 1.0)), schedule



def step_config(config: ml_collections.ConfigDict, model, image_shape) -> StepConfig:
  """The run's :class:`StepConfig`, with the model's tap order when ``dfa.align='next'`` or
  ``dfa.modules`` needs it."""
  d = config.dfa
  blockwise = d.get('blockwise', False)
  order = (tap_order(model, image_shape) if d.align == 'next' or d.get('modules', '') or blockwise
           else ())
  return StepConfig.from_config(config, order, models.residual_blocks(order) if blockwise else ())


@dataclasses.dataclass(frozen=True)
class Setup:
  """A run's parts, built from its config by :func:`setup`."""
  info: dict[str, Any]             # dataset_info: num_classes, image_shape, mean, std
  model: Any                       # the Flax module (SVD layers for the factored methods)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state: TrainState                # fresh (seed train.seed), on the host
  step_cfg: StepConfig
  steps_per_epoch: int
  total_steps: int
  aligned: list[str] | None = None  # the blocks the subspace term acts on (None: no such term)
  notice: str = ''                 # a sentence on the factored blocks it skips, if any


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1,
             rank_overrides: str = '') -> tuple[dict[str, Any], Any]:
  """Every check of :func:`setup` that needs no initialised state: the config's fields, and
  the layer and block names it gives against the model's (from the params' shapes, so it
  takes no init). Returns ``(dataset_info, model)``; raises :class:`ConfigError`."""
  check_config(config, num_devices)
  info = dataset_info(config)
  model = build_model(config, info['num_classes'], rank_overrides)
  if config.dfa.get('modules', ''):
    check_modules(config, tap_order(model, info['image_shape']))
  d = config.dfa
  blocks = tuple(d.get('bp_blocks', ()))
  if d.method not in FACTORED_METHODS and not blocks:
    return info, model
  x = jax.ShapeDtypeStruct((1, *info['image_shape']), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']
  if d.method in FACTORED_METHODS:
    unmatched = models.unmatched_overrides(params, parse_overrides(config.model.overrides))
    if unmatched:
      raise ConfigError(f'model.overrides {unmatched} match no layer of {config.model.name}; '
                        f'its layers are {list(models.layer_paths(params))}.')
  if blocks:
    if d.method not in LOCAL_METHODS:
      raise ConfigError(f'dfa.bp_blocks trains some blocks of a local method by backprop; '
                        f'{d.method} is not local ({", ".join(LOCAL_METHODS)}). Leave it ().')
    unknown = [b for b in blocks if not any(in_blocks(k, (b,)) for k in params)]
    if unknown:
      raise ConfigError(f'dfa.bp_blocks {unknown} name no block of {config.model.name}; its '
                        f'top-level params are {list(params)}.')
  return info, model


def setup(config: ml_collections.ConfigDict, *, steps_per_epoch: int = 1, num_devices: int = 1,
          rank_overrides: str = '') -> Setup:
  """Validates ``config`` (:func:`validate`) and builds its run; loads no data and writes
  nothing.

  ``steps_per_epoch`` shapes the learning-rate schedule (``train.epochs × steps_per_epoch``
  steps) and the per-epoch decay of learned feedback, not the state's structure: a restore
  can leave it at 1. ``rank_overrides``: the ranks of a run reduced during training
  (:func:`build_model`).
  """
  info, model = validate(config, num_devices=num_devices, rank_overrides=rank_overrides)
  total_steps = config.train.epochs * steps_per_epoch
  tx, schedule = build_tx(config, total_steps)
  state = create_train_state(config, model, tx, info['image_shape'], info['num_classes'],
                             jax.random.key(config.train.seed), steps_per_epoch)
  d = config.dfa
  cfg = step_config(config, model, info['image_shape'])
  aligned, notice = None, ''
  if cfg.method in LOCAL_METHODS and cfg.method in FACTORED_METHODS and cfg.align_weight \
      and cfg.align in ('subspace', 'channel_subspace'):
    channels = (alignment.tap_channels(tap_shapes(model, info['image_shape']))
                if cfg.align == 'channel_subspace' else None)
    aligned, notice = alignment.coverage(
        state.params, state.feedback, cfg.align, channels=channels,
        dense_feedback=d.feedback == 'dense', signal=cfg.signal, delivery=d.delivery)
  return Setup(info=info, model=model, tx=tx, schedule=schedule, state=state, step_cfg=cfg,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, aligned=aligned,
               notice=notice)
