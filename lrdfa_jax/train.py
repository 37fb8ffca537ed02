"""The training loop: ``train_and_evaluate``, with orbax resume, rank reduction and NaN stops.

The run is built by :func:`lrdfa_jax.build.setup` and stepped by the jitted steps of
:mod:`lrdfa_jax.steps`; :mod:`lrdfa_jax.metrics` evaluates and writes the summary. This
module owns the workdir: its checkpoints, ``config.json``, ``ranks.jsonl`` and the logs.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from lrdfa_jax import build, metrics as metrics_lib
from lrdfa_jax import data as data_lib
from lrdfa_jax import rank as rank_lib
from lrdfa_jax.build import ConfigError
from lrdfa_jax.steps import LOCAL_METHODS, TrainState, make_mesh, make_steps, shard_batch


class DivergenceError(FloatingPointError):
  """Training diverged (non-finite or exploding loss); the message says what was kept."""


# ---------------------------------------------------------------------------- checkpoints

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




# ------------------------------------------------------------------------- the workdir


# fields that change what is logged or saved, not what is trained
MONITORING = ('train.progress_bar', 'train.log_every', 'train.angle_every',
              'train.eval_every_epochs', 'train.checkpoint_every_epochs',
              'train.keep_checkpoints', 'data.workers')
# ... and the ones a resume may change too: where the run stops, how it is spread, where the
# (checksummed) data is read from
RUN_INDEPENDENT = MONITORING + ('train.stop_after_steps', 'train.num_devices',
                                'train.distributed', 'train.coordinator_address',
                                'train.num_processes', 'train.process_id', 'train.timeout_s',
                                'train.heartbeat_s', 'train.xla_scheduler',
                                'dfa.blockwise',  # the same update, in another order
                                'data.cache_dir', 'data.data_dir')
# dfa fields backprop never reads: a bp/svd_bp run is the same run whatever they hold
BACKPROP_IGNORED = ('delivery', 'feedback', 'feedback_rank', 'feedback_scale', 'align',
                    'align_weight', 'signal', 'signal_mix', 'readout_dim', 'readout_basis',
                    'readout_norm', 'readout_layers', 'readout_temperature', 'sim_weight', 'learn_feedback',
                    'recon_weight', 'recon_size',
                    'feedback_lr', 'feedback_weight_decay', 'feedback_lr_decay', 'modules',
                    'overlap')
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
  model = build.build_model(config, num_classes, rank_lib.rank_overrides(params))
  new = host.replace(apply_fn=model.apply, params=params, opt_state=opt_state,
                     feedback=feedback, feedback_opt_state=f_opt)
  return new, {'/'.join(p): r for p, r in ranks.items()}


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                       step: int | None = None) -> TrainState:
  """The TrainState saved in ``workdir/checkpoints`` (latest, or ``step``), on the host,
  at the ranks it had then (after any rank reduction)."""
  import orbax.checkpoint as ocp
  steps = _checkpoint_steps(workdir)
  step = (steps[-1] if steps else None) if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints.')
  reduced = rank_reductions(workdir, step)
  state = build.setup(config, rank_overrides=reduced[-1]['overrides'] if reduced else '').state
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


_barriers = itertools.count()  # a barrier's name is used once


def wait_for_all_processes(name: str, timeout_s: int) -> None:
  """Blocks until every process of a multi-process CPU run has reached this point, for up to
  ``timeout_s`` (a no-op in one process and on accelerators, whose collectives wait). It is
  the coordination service's barrier, not a collective: gloo, the CPU collectives, gives a
  process only 30 s to join its first collective, which one process slowed by loading data or
  a busy CPU can miss (orbax's first sync is one)."""
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    import orbax.checkpoint as ocp
    ocp.multihost.get_barrier_sync_fn()(key=f'lrdfa_{name}_{next(_barriers)}',
                                        timeout_ms=int(timeout_s) * 1000)



# -------------------------------------------------------------------------------- the loop


def _replicated(state, mesh):
  """``state`` replicated over ``mesh``. Every process holds the same state (one seed, or one
  checkpoint), so a multi-process run builds each global array from its local copy: a
  ``device_put`` would check the copies' equality with one collective per leaf."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(state, sharding)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    local = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(local.shape, sharding, lambda index: local[index])
  return jax.tree.map(put, state)


class _Loop:
  """The state of a run between its named steps: what it trains, where it writes, how far
  it is. Only :func:`train_and_evaluate` makes one."""

  def __init__(self, config, run: build.Setup, mesh, splits, state, *, workdir, writer, mngr,
               reductions, primary, say):
    self.config, self.run, self.mesh, self.splits = config, run, mesh, splits
    self.state, self.writer, self.mngr, self.reductions = state, writer, mngr, reductions
    self.workdir, self.primary, self.say = workdir, primary, say
    self.fns = make_steps(run.step_cfg, mesh, state)  # train, eval, angle
    self.step = int(jax.device_get(state.step))
    self.last_log, self.t_log = self.step, time.time()  # for the logged step time
    self.metrics = None  # of the last train step
    self.results: dict[str, dict[str, float]] = {}  # split -> its last evaluation
    self.max_loss = (config.train.get('max_loss', 0.0)
                     or 20.0 * math.log(run.info['num_classes']))

  def kept(self) -> str:
    last = self.mngr.latest_step() if self.mngr is not None else None
    return ('Nothing was saved (no --workdir).' if self.mngr is None else
            'No checkpoint had been saved yet, so none is kept.' if last is None else
            f'The checkpoint of step {last} (saved while the loss was below the limit) is '
            'kept; no diverged state was saved.')

  def check_loss(self, loss: float, what: str = 'train loss') -> None:
    if np.isfinite(loss) and loss <= self.max_loss:
      return
    limit = f'above train.max_loss={self.max_loss:.3g}'
    raise DivergenceError(
        f'training diverged at step {self.step}: {what} {loss:.4g} '
        f'({"not finite" if not np.isfinite(loss) else limit}). {self.kept()} '
        'Lower opt.lr (or set opt.clip_norm) and start again in a new --workdir.')

  def train_epoch(self, end_step: int, bar) -> None:
    """Up to the end of the current epoch (or ``end_step``): angles, steps, logs."""
    tc, cfg, spe = self.config.train, self.run.step_cfg, self.run.steps_per_epoch
    info = self.run.info
    train_fn, _, angle_fn = self.fns
    epoch, start_batch = divmod(self.step, spe)
    epoch_end = min(end_step, (epoch + 1) * spe)
    with data_lib.prefetch(data_lib.train_batches(
        self.splits['train'], batch_size=tc.batch_size, seed=tc.seed, epoch=epoch,
        augment=self.config.data.augment, mean=info['mean'], std=info['std'],
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_batch=start_batch, image_size=info['image_shape'][0],
        workers=self.config.data.workers)) as batches:
      for batch in itertools.islice(batches, epoch_end - self.step):
        batch = shard_batch(batch, self.mesh)
        if tc.angle_every and cfg.method in LOCAL_METHODS and self.step % tc.angle_every == 0 \
            and not self.writer.logged(self.step, 'angle/'):  # kept from before a resume
          angles = jax.device_get(angle_fn(self.state, batch))
          self.writer.write(self.step, {f'angle/{k}': v for k, v in angles.items()})
        self.state, self.metrics = train_fn(self.state, batch)
        self.step += 1
        bar.update(1)
        if self.step % tc.log_every == 0 or self.step == epoch_end:
          dt = (time.time() - self.t_log) / max(self.step - self.last_log, 1)
          self.last_log, self.t_log = self.step, time.time()
          loss = metrics_lib.log_train(self.writer, self.step, self.metrics, self.state, dt=dt,
                                       lr=float(self.run.schedule(self.step - 1)),
                                       batch_size=tc.batch_size, epoch=self.step / spe)
          self.check_loss(loss)
          bar.set_postfix(loss=f'{loss:.3f}')

  def cut_ranks(self, epoch: int) -> None:
    """Cuts the ranks (:func:`reduce_ranks`) and recompiles the steps for the new shapes."""
    before = metrics_lib.param_count(self.state.params)
    state, ranks = reduce_ranks(self.config, self.state, self.run.info['num_classes'])
    if not ranks:
      return
    self.state = _replicated(state, self.mesh)
    self.fns = make_steps(self.run.step_cfg, self.mesh, self.state)
    record = {'step': self.step, 'epoch': epoch, 'ranks': ranks,
              'overrides': rank_lib.rank_overrides(self.state.params),
              'params_before': before,
              'trainable_params': metrics_lib.param_count(self.state.params)}
    self.reductions.append(record)
    if self.workdir is not None and self.primary:
      with open(os.path.join(self.workdir, 'ranks.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')
    self.writer.write(self.step, {'trainable_params': record['trainable_params']})
    shown = ', '.join(f'{k} {v}' for k, v in ranks.items())
    self.say(f'epoch {epoch}: ranks reduced ({shown}); {before:,} -> '
             f'{record["trainable_params"]:,} trainable params')

  def evaluate(self, split: str, log: bool = True) -> None:
    res = metrics_lib.evaluate(self.fns[1], self.state, self.splits[split],
                               batch_size=self.config.train.batch_size, info=self.run.info,
                               mesh=self.mesh, workers=self.config.data.workers)
    if log:
      self.writer.write(self.step, {f'{split}/{k}': v for k, v in res.items()})
      self.say(f'epoch {self.step / self.run.steps_per_epoch:.2f} step {self.step}: {split} '
               f'accuracy {res["accuracy"]:.2f}% loss {res["loss"]:.4f}')
      self.check_loss(res['loss'], f'{split} loss')  # of the params about to be saved
    self.results[split] = res

  def checkpoint(self) -> None:
    if self.metrics is not None:
      self.check_loss(float(jax.device_get(self.metrics['loss'])))
    if not _all_finite(self.state.params):
      raise DivergenceError(f'non-finite params at step {self.step}; not checkpointing. '
                            f'{self.kept()} Lower opt.lr and start again in a new --workdir.')
    _save(self.mngr, self.state)


def _open_workdir(config, workdir: str | None, state, mesh, *, primary: bool, reductions,
                  changes):
  """The checkpoint manager (None without a workdir) and the state, restored when the
  workdir holds a checkpoint; writes ``config.json`` and trims ``ranks.jsonl`` to the
  checkpoint's reductions."""
  from lrdfa_jax.writers import write_jsonl
  if workdir is None:
    return None, state
  mngr = _checkpoint_manager(workdir, config.train.keep_checkpoints)
  if mngr.latest_step() is not None:
    state = _replicated(_restore_checked(mngr, state, workdir), mesh)
  step = int(jax.device_get(state.step))
  if primary:  # atomically: the other processes may be reading it (check_workdir)
    tmp = os.path.join(workdir, 'config.json.tmp')
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, 'config.json'))
    if os.path.exists(os.path.join(workdir, 'ranks.jsonl')):
      # drop the reductions an interrupted run made after its last checkpoint
      write_jsonl(os.path.join(workdir, 'ranks.jsonl'), reductions)
    if changes:
      with open(os.path.join(workdir, 'config_changes.jsonl'), 'a') as f:
        f.write(json.dumps({'step': step, 'changes': changes}) + '\n')
  return mngr, state


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

  from lrdfa_jax.writers import MetricWriter

  t_start = time.time()
  tc = config.train
  if tc.distributed:
    initialize_distributed(config)
  primary = jax.process_index() == 0  # the one process that writes files and prints
  mesh = make_mesh(tc.num_devices)
  build.check_config(config, mesh.size)
  splits = build.load_data(config)
  steps_per_epoch = data_lib.num_train_batches(len(splits['train']), tc.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f'train.batch_size={tc.batch_size} exceeds the '
                      f'{len(splits["train"])} training examples.')
  changes = check_workdir(config, workdir, allow_changed_config)  # reads only
  saved = _checkpoint_steps(workdir)  # a run reduced before it resumes at the ranks it had
  reductions = rank_reductions(workdir, saved[-1]) if saved else []
  run = build.setup(config, steps_per_epoch=steps_per_epoch, num_devices=mesh.size,
                    rank_overrides=reductions[-1]['overrides'] if reductions else '')
  if run.notice:
    logging.info('%s', run.notice)

  # Everything above validates; only now is the workdir written. The processes set up at
  # their own pace; they meet here, before orbax's first collective.
  wait_for_all_processes('setup', tc.get('timeout_s', 300))
  mngr, state = _open_workdir(config, workdir, _replicated(run.state, mesh), mesh,
                              primary=primary, reductions=reductions, changes=changes)
  say = tqdm.write if primary else (lambda _: None)
  # rows after the resumed step are a killed run's; every process reads them, the primary writes
  writer = MetricWriter(workdir, resume_step=int(jax.device_get(state.step)), write=primary)
  loop = _Loop(config, run, mesh, splits, state, workdir=workdir, writer=writer, mngr=mngr,
               reductions=reductions, primary=primary, say=say)
  resumed_at = loop.step
  if resumed_at:
    say(f'Resuming from step {resumed_at} in {workdir}.')
  # the run's wall time goes on from the checkpoint's (logged with it); a checkpoint written
  # before this was logged leaves the time before the resume unknown
  before = writer.kept_value(resumed_at, 'wall_time_s') if resumed_at else 0.0
  since_step = None if before is not None else resumed_at
  before = before or 0.0
  end_step = run.total_steps if not tc.stop_after_steps else min(run.total_steps,
                                                                  tc.stop_after_steps)
  bar = tqdm(total=end_step, initial=loop.step, desc=f'{config.model.name}/{run.step_cfg.method}',
             disable=not tc.progress_bar or not primary, dynamic_ncols=True)
  rank_epochs = set(config.rank.epochs) if config.get('rank') else set()
  evaluated = [s for s in ('validation', 'test') if s in splits]
  try:
    while loop.step < end_step:
      loop.train_epoch(end_step, bar)
      epoch, into = divmod(loop.step, steps_per_epoch)
      if not into and epoch in rank_epochs:
        loop.cut_ranks(epoch)
      if (not into and epoch % tc.eval_every_epochs == 0) or loop.step == end_step:
        for split in evaluated:
          loop.evaluate(split)
      if mngr is not None and ((not into and epoch % tc.checkpoint_every_epochs == 0)
                               or loop.step == end_step):
        loop.checkpoint()
        writer.write(loop.step, {'wall_time_s': before + time.time() - t_start})
    for split in reversed(evaluated):  # e.g. a rerun of a finished run
      if split not in loop.results:
        loop.evaluate(split, log=False)
  finally:
    bar.close()
    if mngr is not None:
      mngr.wait_until_finished()
      mngr.close()
    writer.close()

  summary = metrics_lib.run_summary(
      config, method=run.step_cfg.method, step=loop.step, steps_per_epoch=steps_per_epoch,
      test=loop.results.get('test', {}), validation=loop.results.get('validation', {}),
      params=loop.state.params, reductions=loop.reductions,
      wall_time_s=before + time.time() - t_start, wall_time_since_step=since_step,
      aligned=run.aligned,
      changes={'step': resumed_at, 'changes': changes} if changes else None)
  if workdir is not None and primary:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
