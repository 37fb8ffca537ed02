"""Training system: learning, resume, interruption, sharding, tracing, NaN handling."""
import dataclasses
import functools
import json
import os
import platform
import re
import time

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from lrdfa_jax import alignment
from lrdfa_jax import data as data_lib
from lrdfa_jax import build, metrics as metrics_lib, signals, steps as steps_lib, train, writers


def tiny_config(method='ssa', **overrides):
  c = default.get_config()
  c.data.source = 'synthetic'
  c.data.synthetic.update(num_train=256, num_test=64, image_shape=(8, 8, 3), num_classes=4)
  c.model.kwargs.widths = (4, 8, 8)
  c.model.kwargs.hidden = 16
  c.model.rank = 0.5
  c.model.overrides = ''
  c.dfa.method = method
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 0
  # no angle step (its two programs are a quarter of a tiny run's CPU time): the tests of
  # logged angles, two resume tests and the report's export set angle_every
  c.train.update(epochs=2, batch_size=32, log_every=2, angle_every=0, progress_bar=False,
                 num_devices=1)
  # one compile per program: 'auto' compiles two (steps.SmallerProgram); the scheduler tests
  # below and the default-config runs (main, notebooks, README, the distributed test's first
  # run) keep 'auto'
  c.train.xla_scheduler = 'default'
  for k, v in overrides.items():
    section, field = k.split('__')
    c[section][field] = v
  return c


def _setup(config, num_devices=1):
  run = build.setup(config, steps_per_epoch=500, num_devices=num_devices)  # 1,000-step schedule
  mesh = steps_lib.make_mesh(num_devices)
  state = jax.device_put(run.state,
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return state, steps_lib.make_steps(run.step_cfg, mesh, state), mesh, run.info


@pytest.mark.parametrize('model', ['mlp', 'small_conv'])
@pytest.mark.parametrize('method', ['bp', 'svd_bp', 'dfa', 'ssa'])
def test_tiny_training_loop_drives_loss_down(method, model):
  config = tiny_config(method)
  config.model.name = model
  config.model.kwargs = ({'features': (32, 32)} if model == 'mlp' else
                         {'widths': (8, 16, 16), 'hidden': 32})
  state, (train_fn, _, _), mesh, info = _setup(config)
  feedback0 = jax.tree.map(np.asarray, state.feedback)
  source = data_lib.ArraySource(*data_lib.synthetic(num_train=256, image_shape=(8, 8, 3),
                                                     num_classes=4)['train'])
  losses = []
  for epoch in range(40):  # 320 steps
    for batch in data_lib.train_batches(source, batch_size=32, seed=0, epoch=epoch,
                                        augment=False, mean=info['mean'], std=info['std']):
      state, m = train_fn(state, steps_lib.shard_batch(batch, mesh))
      losses.append(float(m['loss']))
  first, last = np.mean(losses[:8]), np.mean(losses[-8:])
  assert last < 0.5 * first, (method, model, first, last)
  assert train_fn._cache_size() == 1  # traced once
  # the feedback is carried unchanged
  jax.tree.map(np.testing.assert_array_equal, feedback0, jax.tree.map(np.asarray, state.feedback))
  if method in ('dfa', 'ssa'):
    assert feedback0.names


@pytest.mark.parametrize('method,signal,norm', [('ssa', 'local', 'none'),
                                                ('dfa', 'mixed', 'batch')])
def test_local_signal_training_drives_loss_down(method, signal, norm):
  config = tiny_config(method, dfa__signal=signal, dfa__readout_dim=32, dfa__sim_weight=0.5)
  config.model.kwargs = {'widths': (8, 16, 16), 'hidden': 32, 'norm': norm}
  if norm == 'batch':
    config.model.act = 'leaky_relu'
  state, (train_fn, _, _), mesh, info = _setup(config)
  assert state.feedback.block('conv1')['p'].shape[0] == 2 * 2 * 8  # 4x4 tap pooled to 2x2
  assert bool(state.batch_stats) == (norm == 'batch')
  stats0 = jax.tree.map(np.asarray, state.batch_stats)
  source = data_lib.ArraySource(*data_lib.synthetic(num_train=256, image_shape=(8, 8, 3),
                                                     num_classes=4)['train'])
  losses, local = [], []
  for epoch in range(25):
    for batch in data_lib.train_batches(source, batch_size=32, seed=0, epoch=epoch,
                                        augment=False, mean=info['mean'], std=info['std']):
      state, m = train_fn(state, steps_lib.shard_batch(batch, mesh))
      losses.append(float(m['loss']))
      local.append(float(m['local_loss']))
  assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])
  assert np.mean(local[-8:]) < np.mean(local[:8])  # the readouts' own CE falls too
  assert train_fn._cache_size() == 1
  if norm == 'batch':  # the running statistics move with training
    assert not np.allclose(stats0['conv1_bn']['mean'], state.batch_stats['conv1_bn']['mean'])


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 4
  config = tiny_config('ssa')
  source = data_lib.load('synthetic', '', num_train=64, image_shape=(8, 8, 3),
                         num_classes=4)['train']
  batch = next(data_lib.train_batches(source, batch_size=32, seed=0, epoch=0, mean=(0.5,) * 3,
                                      std=(0.25,) * 3))
  out = {}
  for n in (1, 4):
    state, (train_fn, eval_fn, angle_fn), mesh, _ = _setup(config, n)
    b = steps_lib.shard_batch(batch, mesh)
    assert len(b['image'].sharding.device_set) == n
    for _ in range(2):
      state, m = train_fn(state, b)
    out[n] = jax.device_get((state.params, m, angle_fn(state, b)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), out[1][:2],
               out[4][:2])
  # angles in degrees: arccos near 0° turns float rounding of the cosine into ~0.03°
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.1), out[1][2], out[4][2])


def test_the_split_angle_step_equals_the_one_program_step():
  """make_steps runs the angle step as separate programs (memory); the angles are the same."""
  config = tiny_config('ssa', dfa__signal='local')
  state, (_, _, angle_fn), mesh, _ = _setup(config)
  source = data_lib.load('synthetic', '', num_train=32, image_shape=(8, 8, 3),
                         num_classes=4)['train']
  batch = steps_lib.shard_batch(next(data_lib.train_batches(
      source, batch_size=32, seed=0, epoch=0, mean=(0.5,) * 3, std=(0.25,) * 3)), mesh)
  cfg = steps_lib.StepConfig.from_config(config)
  one = jax.jit(functools.partial(steps_lib.angle_step, cfg))(state, batch)
  split = angle_fn(state, batch)
  assert set(split) == set(one) and 'conv2' in split
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.1), split, one)
  assert 5 < float(split['conv2']) < 175 and float(split['head']) < 1.0  # exact head gradient


@pytest.mark.parametrize('method', ['bp', 'ssa'])
def test_the_memory_scheduler_gives_the_same_update_in_less_temporary_memory(method):
  """train.xla_scheduler='memory' reorders the step's ops on CPU: same new state, fewer bytes;
  'auto' compiles under both and runs the smaller program."""
  out = {}
  for scheduler in ('default', 'memory', 'auto'):
    config = tiny_config(method, dfa__signal='local' if method == 'ssa' else 'global',
                         train__xla_scheduler=scheduler)
    config.data.synthetic.image_shape = (16, 16, 3)
    state, (train_fn, _, _), mesh, _ = _setup(config)
    source = data_lib.load('synthetic', '', num_train=64, image_shape=(16, 16, 3),
                           num_classes=4)['train']
    batch = steps_lib.shard_batch(next(data_lib.train_batches(
        source, batch_size=64, seed=0, epoch=0, mean=(0.5,) * 3, std=(0.25,) * 3)), mesh)
    compiled = train_fn.lower(state, batch).compile()  # run the program measured, compile once
    new_state, _ = compiled(state, batch)
    out[scheduler] = (compiled.memory_analysis().temp_size_in_bytes,
                      jax.device_get(new_state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               out['default'][1], out['memory'][1])
  assert out['memory'][0] < out['default'][0]
  assert out['auto'][0] == min(out['default'][0], out['memory'][0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               out['auto'][1], out['memory'][1])


def test_auto_scheduler_keeps_the_smaller_program_per_input_signature():
  """SmallerProgram compiles once per signature (a new batch size compiles again), keeps the
  program its measure rates lower, whichever scheduler that is, and donates like jax.jit."""
  calls = []

  def make_f():  # a new function each time: jax shares traces between jits of one function
    def f(x, w):
      calls.append(x.shape)  # traced once per signature
      h = jnp.tanh(x @ w)
      return (h @ w.T).sum() + jnp.cumsum(h, axis=0).sum(), x * 2
    return f
  f = make_f()
  w = jnp.ones((16, 16))
  x4 = jnp.ones((4, 16))
  want = f(jnp.ones((8, 16)), w)
  for preferred in ('default', 'memory'):
    prog = steps_lib.SmallerProgram(make_f(), 'cpu', donate_argnums=0,
                                    measure=lambda s, c, p=preferred: 0 if s == p else 1)
    assert prog.chosen is None
    x = jnp.ones((8, 16))
    jax.tree.map(np.testing.assert_allclose, prog(x, w), want)
    assert prog.chosen == preferred and x.is_deleted()  # the donated input is consumed
    traced = len(calls)
    prog(jnp.ones((8, 16)), w)
    assert len(calls) == traced and prog._cache_size() == 1  # the kept program, no new trace
    prog(jnp.ones((4, 16)), w)
    assert len(calls) > traced and prog._cache_size() == 2
  # by default the measure is XLA's temporary bytes
  prog = steps_lib.SmallerProgram(f, 'cpu')
  prog(x4, w)
  temps = {s: steps_lib.temp_bytes(jax.jit(f, compiler_options=steps_lib.compiler_options(
      s, 'cpu')).lower(x4, w).compile()) for s in ('default', 'memory')}
  assert prog.chosen == min(temps, key=temps.get)
  assert steps_lib.temp_bytes(prog.lower(x4, w).compile()) == min(temps.values())
  assert not isinstance(steps_lib.scheduled_jit(f, 'auto', 'gpu'), steps_lib.SmallerProgram)
  assert isinstance(steps_lib.scheduled_jit(f, 'auto', 'cpu'), steps_lib.SmallerProgram)


def test_an_unknown_xla_scheduler_is_a_config_error():
  with pytest.raises(build.ConfigError, match='train.xla_scheduler'):
    build.setup(tiny_config(train__xla_scheduler='fast'))
  assert steps_lib.compiler_options('memory', 'gpu') is None  # XLA:CPU's option only
  assert steps_lib.compiler_options('default', 'cpu') is None
  with pytest.raises(ValueError, match='SmallerProgram'):
    steps_lib.compiler_options('auto', 'cpu')  # auto measures (scheduled_jit)


def _read_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l)['step'] for l in f]


def test_end_to_end_checkpoint_resume_and_interruption(tmp_path):
  # 256 examples / 32 = 8 steps per epoch, 2 epochs; interrupt mid-epoch at step 5; angles
  # measured every 3 steps, between the steps
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  tiny = functools.partial(tiny_config, train__angle_every=3)
  full = train.train_and_evaluate(tiny(), a)
  assert full['step'] == 16 and full['final_test_accuracy'] is not None
  assert sorted(os.listdir(os.path.join(a, 'checkpoints'))) == ['16', '8']
  assert {'summary.json', 'config.json', 'metrics.jsonl', 'tb'} <= set(os.listdir(a))

  part = train.train_and_evaluate(tiny(train__stop_after_steps=5), b)
  assert part['step'] == 5
  assert train.restore_checkpoint(tiny_config(), b).step == 5
  t0 = time.time()
  rest = train.train_and_evaluate(tiny(), b)
  resumed_for = time.time() - t0
  assert rest['step'] == 16
  assert min(s for s in _read_steps(b) if s > 5) > 5 and max(_read_steps(b)) == 16

  sa, sb = train.restore_checkpoint(tiny_config(), a), train.restore_checkpoint(tiny_config(), b)
  jax.tree.map(np.testing.assert_array_equal, (sa.params, sa.opt_state, sa.feedback),
               (sb.params, sb.opt_state, sb.feedback))
  assert rest['final_test_accuracy'] == full['final_test_accuracy']
  # the wall time goes on from the checkpoint's: it counts both invocations
  assert rest['wall_time_s'] > resumed_for and 'wall_time_since_step' not in rest
  assert rest['wall_time_s'] > part['wall_time_s']

  # a second call on a finished run restores the identical state and trains no more
  again = train.train_and_evaluate(tiny(), a)
  assert again['step'] == 16
  s2 = train.restore_checkpoint(tiny_config(), a)
  jax.tree.map(np.testing.assert_array_equal, (sa.params, sa.opt_state), (s2.params, s2.opt_state))


def test_the_summary_names_the_host_cpu_model(tmp_path, monkeypatch):
  """Wall times compare only on one CPU model, and the host varies: the machine string names it
  from /proc/cpuinfo, and falls back to the architecture where that names none."""
  info = tmp_path / 'cpuinfo'
  info.write_text('processor\t: 0\nmodel name\t: Test CPU 9000\n\nprocessor\t: 1\n'
                  'model name\t: Test CPU 9000\n')
  assert metrics_lib.cpu_model(str(info)) == 'Test CPU 9000'
  info.write_text('processor\t: 0\n')
  assert metrics_lib.cpu_model(str(info)) == (platform.processor() or platform.machine())
  assert metrics_lib.cpu_model(str(tmp_path / 'missing')) == metrics_lib.cpu_model(str(info))
  host = metrics_lib.machine().split('(', 1)[1]
  assert host.startswith(f'{metrics_lib.cpu_model()}, ') and f'{platform.machine()}, ' in host
  monkeypatch.setattr(metrics_lib, 'cpu_model', platform.machine)  # no model: the arch once
  assert f'({platform.machine()}, {os.cpu_count()} CPUs)' in metrics_lib.machine()


def test_wall_time_before_an_unlogged_resume_is_marked_unknown(tmp_path):
  """A checkpoint whose wall time was not logged (an older version's): the summary's time
  counts from the resume, and says from which step."""
  from lrdfa_jax.writers import read_jsonl, write_jsonl
  d = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(train__stop_after_steps=5), d)
  path = os.path.join(d, 'metrics.jsonl')
  recs = read_jsonl(path)
  assert [r['step'] for r in recs if 'wall_time_s' in r] == [5]
  write_jsonl(path, [{k: v for k, v in r.items() if k != 'wall_time_s'} for r in recs])
  rest = train.train_and_evaluate(tiny_config(), d)
  assert rest['step'] == 16 and rest['wall_time_since_step'] == 5
  from experiments import report
  assert report.wall_time([rest]).startswith('≥ ')


def test_imagenet_config_on_real_jpegs_resumes_mid_epoch(tmp_path, imagenet_jpegs):
  """configs/imagenet.py on real JPEGs in the tfds format (greyscale, CMYK, PNG-as-JPEG and
  tiny files among them): decode, inception crop + flip, resize + centre crop, a held-out
  slice, top-1/top-5, and a run stopped mid-epoch resumes to the uninterrupted result."""
  from configs import imagenet
  c = imagenet.get_config()
  c.data.update(data_dir=imagenet_jpegs, image_size=32, workers=2, validation_size=4)
  c.model.kwargs.width = 0.125
  c.dfa.method = 'bp'  # the input path is under test; an ssa ResNet-18 step compiles 2x longer
  c.opt.warmup_steps = 0
  c.train.update(batch_size=4, epochs=2, num_devices=1, log_every=1, angle_every=0,
                 progress_bar=False,  # (no angle step: one ResNet-18 compile fewer,
                 xla_scheduler='default')  # one scheduler: 'auto' compiles the step twice)
  part = c.copy_and_resolve_references()
  part.train.stop_after_steps = 2  # of 3 per epoch: (16 - 4 held out) / 4
  a, b = str(tmp_path / 'stopped'), str(tmp_path / 'straight')
  assert train.train_and_evaluate(part, a)['step'] == 2
  s = train.train_and_evaluate(c, a)
  straight = train.train_and_evaluate(c, b)
  assert s['step'] == straight['step'] == 6
  for k in ('final_test_accuracy', 'final_test_top5', 'final_validation_accuracy',
            'final_test_loss'):
    assert s[k] == straight[k], k
  assert s['final_test_top5'] >= s['final_test_accuracy']
  jax.tree.map(np.testing.assert_array_equal, train.restore_checkpoint(c, a).params,
               train.restore_checkpoint(c, b).params)
  metrics = [json.loads(line) for line in open(os.path.join(a, 'metrics.jsonl'))]
  assert any('test/top5' in m for m in metrics) and any('validation/accuracy' in m for m in metrics)
  with pytest.raises(train.ConfigError, match='image_size applies to'):
    build.dataset_info(tiny_config(data__source='offline', data__image_size=64))


def test_tap_order_is_forward_order():
  small = build.build_model(tiny_config(), 4)
  assert build.tap_order(small, (8, 8, 3)) == ('conv1', 'conv2', 'conv3', 'fc1')
  c = tiny_config()
  c.model.name, c.model.kwargs = 'vgg13', ml_collections.ConfigDict()
  order = build.tap_order(build.build_model(c, 4), (32, 32, 3))
  assert order == tuple(f'conv{i}' for i in range(1, 11))  # sorted would put conv10 2nd
  run = train.train_and_evaluate(tiny_config(dfa__align='next', dfa__align_weight=1.0,
                                             train__epochs=1))
  assert np.isfinite(run['final_test_loss'])


def _tree_of(workdir):
  """Every file under ``workdir`` with its bytes: what a refused call must leave untouched."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(root, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, workdir)] = fh.read()
  return out


def test_divergence_stops_and_never_checkpoints_a_diverged_state(tmp_path):
  # an exploding (finite) loss: Adam at lr 1e3, no checkpoint saved yet
  fresh = str(tmp_path / 'fresh')
  with pytest.raises(train.DivergenceError, match=r'above train.max_loss=.*No checkpoint had '
                     r'been saved yet'):
    train.train_and_evaluate(tiny_config(opt__lr=1e3, train__log_every=1), fresh)
  assert not os.listdir(os.path.join(fresh, 'checkpoints'))
  # a non-finite loss after a good checkpoint: the message names it, and it is the one kept
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(train__epochs=1), workdir)
  good = train.restore_checkpoint(tiny_config(), workdir)
  blow = tiny_config(train__epochs=3, opt__lr=1e30, train__log_every=1, train__max_loss=1e38)
  with pytest.raises(train.DivergenceError, match='not finite.*checkpoint of step 8'):
    train.train_and_evaluate(blow, workdir, allow_changed_config=True)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['8']
  kept = train.restore_checkpoint(tiny_config(), workdir)
  jax.tree.map(np.testing.assert_array_equal, good.params, kept.params)
  # a loss that grows past the limit between log steps is caught before the save
  late = str(tmp_path / 'late')
  with pytest.raises(train.DivergenceError, match='above train.max_loss=0.001'):
    train.train_and_evaluate(tiny_config(train__log_every=100, train__max_loss=1e-3), late)
  assert not os.listdir(os.path.join(late, 'checkpoints'))


def test_workdir_with_another_config_is_refused_before_anything_is_written(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(train__epochs=1), workdir)
  before = _tree_of(workdir)
  for kw, shown in ((dict(opt__lr=1e-2), 'opt.lr: 0.003 -> 0.01'),
                    (dict(dfa__method='bp'), "dfa.method: 'ssa' -> 'bp'"),
                    (dict(train__epochs=2), 'train.epochs: 1 -> 2')):
    with pytest.raises(train.ConfigError, match=re.escape(shown) + '.*--allow_changed_config'):
      train.train_and_evaluate(tiny_config(**{'train__epochs': 1, **kw}), workdir)
    assert _tree_of(workdir) == before, kw
  # allowed, but the checkpoint cannot hold another method's state: one line, nothing written
  with pytest.raises(train.ConfigError, match='does not fit this config'):
    train.train_and_evaluate(tiny_config(train__epochs=1, dfa__method='bp'), workdir,
                             allow_changed_config=True)
  assert _tree_of(workdir) == before
  # fields that do not change what is computed may differ freely
  same = train.train_and_evaluate(tiny_config(train__epochs=1, train__log_every=5,
                                              train__progress_bar=True), workdir)
  assert same['step'] == 8 and 'config_changes' not in same
  # an allowed change continues the run and says so
  more = train.train_and_evaluate(tiny_config(train__epochs=2), workdir,
                                  allow_changed_config=True)
  assert more['step'] == 16
  assert more['config_changes'] == {'step': 8, 'changes': [('train.epochs', 1, 2)]}
  assert os.path.exists(os.path.join(workdir, 'config_changes.jsonl'))


def test_resume_after_a_kill_logs_no_step_twice(tmp_path):
  """A run killed after its metrics passed the last checkpoint redoes those steps: the
  metrics.jsonl rows and TensorBoard events after the checkpoint are replaced, not repeated."""
  import shutil

  a = str(tmp_path / 'a')
  config = tiny_config(train__angle_every=4)
  train.train_and_evaluate(config, a)
  for killed in (('16',), ('8', '16')):  # before the last save; before the first one
    c = str(tmp_path / f'c{len(killed)}')
    shutil.copytree(a, c)
    for step in killed:
      shutil.rmtree(os.path.join(c, 'checkpoints', step))
    os.remove(os.path.join(c, 'summary.json'))
    with open(os.path.join(c, 'metrics.jsonl'), 'a') as f:
      f.write('{"step": 16, "train/lo')  # and in the middle of writing a row
    train.train_and_evaluate(config, c)
    assert _keys(c) == _keys(a), killed
    steps = [e.step for e in _reloaded(c).Scalars('train/loss')]
    assert steps == sorted(set(steps)) and steps[-1] == 16
    assert steps == [e.step for e in _reloaded(a).Scalars('train/loss')]
  assert any(k == 'angle/conv2' and s == 8 for s, k in _keys(c))  # measured once, at step 8
  rows = writers.read_jsonl(os.path.join(a, 'metrics.jsonl'))
  assert max(r['train/accuracy'] for r in rows if 'train/accuracy' in r) > 1.0  # percent


def _keys(workdir):
  rows = writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  pairs = [(r['step'], k) for r in rows for k in r if k != 'step']
  assert len(pairs) == len(set(pairs)), 'a step was logged twice'
  return set(pairs)


def _reloaded(workdir):
  from tensorboard.backend.event_processing import event_accumulator
  ea = event_accumulator.EventAccumulator(os.path.join(workdir, 'tb'))
  ea.Reload()
  return ea


def test_a_run_without_workdir_ignores_files_in_the_current_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'ranks.jsonl').write_text('{"step": 0}\n')
  (tmp_path / 'config.json').write_text('{}')
  s = train.train_and_evaluate(tiny_config(train__stop_after_steps=1))
  assert s['step'] == 1 and (tmp_path / 'ranks.jsonl').read_text() == '{"step": 0}\n'


def test_config_mistakes_are_one_line_errors():
  with pytest.raises(train.ConfigError, match=r"\['conv9'\] match no layer of small_conv"):
    train.train_and_evaluate(tiny_config(model__overrides='conv9:dense'))
  for kw, reason in ((dict(opt__lr=-1.0), 'opt.lr=-1.0'), (dict(train__epochs=0), 'at least 1'),
                     (dict(train__batch_size=0), 'positive batch size'),
                     (dict(model__conv_execution='fast'), "model.conv_execution 'fast'"),
                     (dict(model__conv_kernel_grad='fast'), "model.conv_kernel_grad 'fast'"),
                     (dict(model__im2col_positions=-1), 'model.im2col_positions must be >= 0')):
    with pytest.raises(train.ConfigError, match=re.escape(reason)):
      train.train_and_evaluate(tiny_config(**kw))


def test_config_changes_skip_fields_added_later_but_not_new_model_kwargs():
  old = json.loads(tiny_config().to_json_best_effort())
  del old['train']['max_loss'], old['data']['synthetic']['cell']  # added to the code later
  new = tiny_config()
  assert train.config_changes(old, json.loads(new.to_json_best_effort())) == []
  new.model.kwargs.norm = 'batch'  # free-form constructor args: a new key is a new model
  new.train.log_every = 7  # monitoring only
  assert [f for f, *_ in train.config_changes(old, json.loads(new.to_json_best_effort()))] == \
      ['model.kwargs']


def test_integer_rank_one_is_rank_one_and_full_rank_is_asked_for_by_name():
  ranks = {}
  for rank, overrides in ((1.0, ''), (2.0, ''), (0.5, '*:full')):
    c = tiny_config(model__rank=rank, model__overrides=overrides)
    params = build.build_model(c, 4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
    ranks[rank] = {n: l['s'].shape[0] for n, l in metrics_lib.svd_layers(params).items()}
  assert set(ranks[1.0].values()) == {1} and set(ranks[2.0].values()) == {2}
  assert ranks[0.5]['head'] == 4 and ranks[0.5]['fc1'] == 8  # min(in, out): 8 features in
  # a reduced model's ranks win over any earlier pattern of model.overrides
  c = tiny_config(model__rank=0.5, model__overrides='fc1:3,*:2')
  model = build.build_model(c, 4, rank_overrides='fc1:1')
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  assert params['fc1']['s'].shape == (1,) and params['conv2']['s'].shape == (2,)


def test_angles_and_layer_stats_are_logged(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(train__epochs=1, train__angle_every=3), workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    recs = [json.loads(l) for l in f]
  keys = set().union(*recs)
  assert {'angle/conv2', 'angle/head', 'orth/conv2', 'rank/conv2', 'train/loss', 'lr',
          'images_per_s', 'test/accuracy', 'test/top5'} <= keys
  head = [r['angle/head'] for r in recs if 'angle/head' in r]
  np.testing.assert_allclose(head, 0.0, atol=0.5)  # the output layer gets the BP gradient
  assert all(0 <= r['angle/conv2'] <= 180 for r in recs if 'angle/conv2' in r)


def test_small_conv_taps_before_or_after_the_pool():
  """``tap='conv'`` feeds the feedback in at conv resolution; the update changes, not the net."""
  grads, outs = {}, {}
  for tap in ('pooled', 'conv'):
    config = tiny_config('ssa', dfa__delivery='full')
    config.model.kwargs.tap = tap
    info = build.dataset_info(config)
    model = build.build_model(config, info['num_classes'])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    outs[tap], taps = model.apply(variables, x)
    side = {'pooled': (4, 2, 1), 'conv': (8, 4, 2)}[tap]
    assert [taps[f'conv{i}'].shape[1] for i in (1, 2, 3)] == list(side)
    state, (train_fn, _, _), mesh, _ = _setup(config)
    batch = {'image': np.asarray(x), 'label': np.arange(4) % 4}
    before = jax.tree.map(np.asarray, state.params['conv1'])  # the step donates the state
    new, m = train_fn(state, steps_lib.shard_batch(batch, mesh))
    assert np.isfinite(float(m['loss']))
    grads[tap] = jax.tree.map(lambda a, b: np.asarray(a) - b, new.params['conv1'], before)
  np.testing.assert_allclose(outs['pooled'], outs['conv'], rtol=1e-6)
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), grads['pooled'], grads['conv'])
  assert max(jax.tree.leaves(diff)) > 1e-6
  config = tiny_config('ssa')
  config.model.kwargs.tap = 'middle'
  with pytest.raises(ValueError, match="tap must be 'pooled' or 'conv'"):
    build.build_model(config, 4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_subspace_alignment_blocks_follow_the_delivery(tmp_path, caplog):
  """Full-map feedback leaves the subspace term only the dense block (and 1×1 maps); the run
  logs it (INFO: a notice about the project's own default is not printed). 'channel_subspace' compares the conv blocks by channel and reaches all of them."""
  acting = {}
  for delivery in ('channel', 'full'):
    config = tiny_config('ssa', dfa__delivery=delivery)
    state, *_ = _setup(config)
    acting[delivery] = alignment.subspace_blocks(state.params, state.feedback)
  # 8×8 images: conv3's tap is 1×1 after the pools, so its full map is just its channels
  assert acting == {'channel': ['conv1', 'conv2', 'conv3', 'fc1'], 'full': ['conv3', 'fc1']}
  config = tiny_config('ssa', dfa__delivery='full', train__stop_after_steps=1)
  with caplog.at_level('INFO', logger='absl'):
    s = train.train_and_evaluate(config, None)
  assert s['subspace_align_blocks'] == ['conv3', 'fc1']
  assert "skips the factored blocks ['conv1', 'conv2']" in caplog.text
  caplog.clear()
  with caplog.at_level('INFO', logger='absl'):
    train.train_and_evaluate(tiny_config('ssa', train__stop_after_steps=1), None)
  assert 'skips' not in caplog.text  # channel broadcast: every block matches
  s = train.train_and_evaluate(tiny_config('ssa', dfa__delivery='full', train__stop_after_steps=1,
                                           dfa__align='channel_subspace'), None)
  assert s['subspace_align_blocks'] == ['conv1', 'conv2', 'conv3', 'fc1']


@pytest.mark.parametrize('learn,signal,layers,recon', [('global', 'global', 0, 0.0),
                                                       ('local', 'local', 0, 0.0),
                                                       ('local', 'local', 2, 0.0),
                                                       ('local', 'local', 0, 1.0)])
def test_learned_feedback_trains_and_resumes_bit_identically(tmp_path, learn, signal, layers,
                                                             recon):
  kw = dict(dfa__learn_feedback=learn, dfa__signal=signal, dfa__readout_dim=32,
            dfa__feedback_lr=1e-2, dfa__readout_layers=layers, dfa__recon_weight=recon,
            dfa__recon_size=4 if recon else 0)
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  train.train_and_evaluate(tiny_config(**kw), a)
  train.train_and_evaluate(tiny_config(train__stop_after_steps=5, **kw), b)
  train.train_and_evaluate(tiny_config(**kw), b)
  sa, sb = (train.restore_checkpoint(tiny_config(**kw), d) for d in (a, b))
  jax.tree.map(np.testing.assert_array_equal, (sa.params, sa.feedback, sa.feedback_opt_state),
               (sb.params, sb.feedback, sb.feedback_opt_state))
  fresh = build.create_train_state(tiny_config(**kw), build.build_model(tiny_config(**kw), 4),
                                   build.build_tx(tiny_config(**kw), 1)[0], (8, 8, 3), 4,
                                   jax.random.key(0))
  moved = jax.tree.map(lambda x, y: not np.allclose(x, y), fresh.feedback, sa.feedback)
  assert all(jax.tree.leaves(moved))  # every factor of every block's feedback learned
  if layers:  # each conv block's readout head: `layers` 1×1 layers of its width; fc1 none
    for name, c in (('conv1', 4), ('conv2', 8), ('conv3', 8)):
      blk = sa.feedback.block(name)
      assert blk[f'w{layers - 1}'].shape == (c, c) and f'w{layers}' not in blk
    assert 'w0' not in sa.feedback.block('fc1')
  if recon:  # InfoPro's decoder beside each conv readout (learned, checked above); fc1 none
    for name, c in (('conv1', 4), ('conv2', 8), ('conv3', 8)):
      assert sa.feedback.block(name)['rw0'].shape[2] == c
    assert 'rw0' not in sa.feedback.block('fc1')


def test_learned_feedback_needs_its_signal():
  with pytest.raises(train.ConfigError, match='needs dfa.signal=global'):
    train.train_and_evaluate(tiny_config(dfa__learn_feedback='global', dfa__signal='local'))
  with pytest.raises(train.ConfigError, match='learn_feedback'):
    train.train_and_evaluate(tiny_config(dfa__learn_feedback='kp'))
  with pytest.raises(train.ConfigError, match="readout_layers adds layers.*signal='local'"):
    train.train_and_evaluate(tiny_config(dfa__readout_layers=1))
  with pytest.raises(train.ConfigError, match='readout_layers=-1'):
    train.train_and_evaluate(tiny_config(dfa__signal='local', dfa__readout_layers=-1))
  with pytest.raises(train.ConfigError, match="recon_weight=1 trains a decoder.*learn_feedback='local'"):
    train.train_and_evaluate(tiny_config(dfa__signal='local', dfa__recon_weight=1.0))
  recon = dict(dfa__signal='local', dfa__learn_feedback='local', dfa__recon_weight=1.0)
  with pytest.raises(train.ConfigError, match='recon_size=3 does not divide the 8-pixel input'):
    train.train_and_evaluate(tiny_config(dfa__recon_size=3, **recon))
  wide = tiny_config(**recon)
  wide.data.synthetic.image_shape = (8, 6, 3)
  with pytest.raises(train.ConfigError, match='square images; this input is 8×6'):
    train.train_and_evaluate(wide)
  mlp = tiny_config(model__name='mlp', **recon)
  mlp.model.kwargs = {'features': (16,)}
  with pytest.raises(train.ConfigError, match='decodes conv blocks.*mlp has none here'):
    train.train_and_evaluate(mlp)


def test_factor_lr_scale_reaches_the_chain_and_is_checked():
  params = {'l': {'u': jnp.ones((4, 2)), 's': jnp.ones(2), 'v': jnp.ones((3, 2))},
            'bn': {'scale': jnp.ones(4)}}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
  steps = {}
  for scale in (1.0, 0.5):
    tx, _ = build.build_tx(tiny_config(opt__factor_lr_scale=scale, opt__warmup_steps=0), 10)
    steps[scale], _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(steps[0.5]['l']['s'], 0.5 * steps[1.0]['l']['s'], rtol=1e-6)
  np.testing.assert_array_equal(steps[0.5]['bn']['scale'], steps[1.0]['bn']['scale'])
  assert np.abs(steps[1.0]['l']['s']).max() > 0
  with pytest.raises(train.ConfigError, match='opt.factor_lr_scale scales the factors'):
    train.train_and_evaluate(tiny_config(dfa__method='dfa', opt__factor_lr_scale=0.5))
  with pytest.raises(train.ConfigError, match=r'opt.factor_lr_scale=-1'):
    train.train_and_evaluate(tiny_config(opt__factor_lr_scale=-1.0))


def test_rank_reduction_during_training_resumes_bit_identically(tmp_path):
  """Reduced after epoch 1 of 2 (step 8; ssa with learned readouts, so the feedback and its
  optimizer state are sliced too): the run recompiles at the new ranks, logs them, and a run
  interrupted after the reduction (step 12) resumes into the reduced shapes and ends
  identically."""
  kw = dict(dfa__method='ssa', dfa__signal='local', dfa__readout_dim=32,
            dfa__learn_feedback='local', dfa__feedback_lr=1e-2, rank__epochs=(1,),
            rank__energy=0.5, train__angle_every=0, dfa__readout_layers=1)
  full = train.train_and_evaluate(tiny_config(**kw), str(tmp_path / 'full'))
  (red,) = full['rank_reductions']
  assert red['step'] == 8 and red['ranks'] and full['trainable_params'] < full[
      'initial_trainable_params'] == red['params_before']
  sa = train.restore_checkpoint(tiny_config(**kw), str(tmp_path / 'full'))
  for path, r in red['ranks'].items():
    layer = sa.params
    for k in path.split('/'):
      layer = layer[k]
    assert layer['s'].shape == (r,) and layer['u'].shape[1] == r
  assert sa.feedback.block('conv2')['w0'].shape == (8, 8)  # slicing k keeps the readout head
  for stop in (12,):
    workdir = str(tmp_path / f'stop{stop}')
    train.train_and_evaluate(tiny_config(train__stop_after_steps=stop, **kw), workdir)
    rest = train.train_and_evaluate(tiny_config(**kw), workdir)
    assert rest['rank_reductions'] == full['rank_reductions']
    sb = train.restore_checkpoint(tiny_config(**kw), workdir)
    jax.tree.map(np.testing.assert_array_equal,
                 (sa.params, sa.opt_state, sa.feedback, sa.feedback_opt_state),
                 (sb.params, sb.opt_state, sb.feedback, sb.feedback_opt_state))
    assert rest['final_test_accuracy'] == full['final_test_accuracy']
  with pytest.raises(train.ConfigError, match='rank.epochs reduces factored layers'):
    train.train_and_evaluate(tiny_config(dfa__method='dfa', rank__epochs=(1,)))
  with pytest.raises(train.ConfigError, match=r'rank.epochs=\(3,\)'):
    train.train_and_evaluate(tiny_config(dfa__method='ssa', rank__epochs=(3,)))


def _assert_layer_close(got, want):
  """One layer's update tree equals `want` to float32 precision. A conv bias before BN has zero
  true gradient: both sides are rounding noise at the layer's scale (on an AMD EPYC host 2.5e-7
  apart for a layer whose largest entry is 0.84), so the absolute tolerance follows the layer's
  largest reference entry."""
  atol = 1e-6 * max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol), got, want)


def test_bp_blocks_take_the_backprop_gradient_and_the_rest_their_local_update():
  """dfa.bp_blocks=('conv2',) on the BN SmallConv: conv2 and conv2_bn get jax.grad of the
  output CE through the whole net (written out here, not via dfa.bp_grads), every other block
  exactly the update it gets without the option."""
  c = tiny_config('ssa', dfa__signal='local', model__act='leaky_relu',
                  model__kwargs=ml_collections.ConfigDict({'widths': (4, 8, 8), 'hidden': 16,
                                                           'norm': 'batch'}))
  run = build.setup(c)
  state = run.state
  images, labels = data_lib.synthetic(**c.data.synthetic.to_dict())["train"]
  batch = {'image': jnp.asarray(images[:16], jnp.float32) / 255.0,
           'label': jnp.asarray(labels[:16])}
  plain, _ = steps_lib.compute_updates(run.step_cfg, state, batch)
  mixed, _ = steps_lib.compute_updates(
      steps_lib.StepConfig.from_config(_with(c, dfa__bp_blocks=('conv2',))), state, batch)

  def ce(params):
    logits, _ = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                               batch['image'], train=True, mutable=['batch_stats'])[0]
    onehot = jax.nn.one_hot(batch['label'], logits.shape[-1])
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
  reference = jax.grad(ce)(state.params)
  bp_names = {'conv2', 'conv2_bn'} & set(state.params)
  assert bp_names == {'conv2', 'conv2_bn'}  # the BN net: its BN goes with its conv
  for name in state.params:
    _assert_layer_close(mixed[name], reference[name] if name in bp_names else plain[name])
  # the local update of conv2 is not the backprop gradient, so the swap is visible
  assert not np.allclose(plain['conv2']['u'], reference['conv2']['u'], atol=1e-4)


def test_modules_backprop_within_and_cut_between():
  """dfa.modules='conv2+conv3,fc1+head' on the BN SmallConv, local signal: each module's params
  take jax.grad of its last block's loss (conv3's readout CE; the output CE) through the
  module, written out on the uncut forward; conv1 keeps its own readout's gradient; conv2 and
  fc1 have no readout. One module of every block is backprop."""
  c = tiny_config('ssa', dfa__signal='local', dfa__align='none', model__act='leaky_relu',
                  dfa__modules='conv2+conv3,fc1+head',
                  model__kwargs=ml_collections.ConfigDict({'widths': (4, 8, 8), 'hidden': 16,
                                                           'norm': 'batch'}))
  run = build.setup(c)
  state, fb = run.state, run.state.feedback
  assert fb.names == ('conv1', 'conv3')  # no signal inside a module
  assert run.step_cfg.modules == (('conv2', 'conv3'), ('fc1', 'head'))
  images, labels = data_lib.synthetic(**c.data.synthetic.to_dict())["train"]
  batch = {'image': jnp.asarray(images[:16], jnp.float32) / 255.0,
           'label': jnp.asarray(labels[:16])}
  got, _ = steps_lib.compute_updates(run.step_cfg, state, batch)

  def forward(params):
    (logits, taps), _ = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                       batch['image'], train=True, mutable=['batch_stats'])
    return logits, taps

  def ce(z):
    return -jnp.mean(jnp.sum(jax.nn.one_hot(batch['label'], z.shape[-1])
                             * jax.nn.log_softmax(z), -1))

  def readout_ce(block):
    return lambda p: signals.local_loss(forward(p)[1][block], fb.block(block), batch['label'])
  refs = {'conv1': jax.grad(readout_ce('conv1'))(state.params),
          'conv3': jax.grad(readout_ce('conv3'))(state.params),
          'head': jax.grad(lambda p: ce(forward(p)[0]))(state.params)}
  module_of = {'conv1': 'conv1', 'conv1_bn': 'conv1', 'conv2': 'conv3', 'conv2_bn': 'conv3',
               'conv3': 'conv3', 'conv3_bn': 'conv3', 'fc1': 'head', 'head': 'head'}
  assert set(module_of) == set(state.params)
  for name, loss in module_of.items():
    _assert_layer_close(got[name], refs[loss][name])
  # conv2 learns through conv3 (not from nothing), conv1 not from conv3's loss
  assert np.abs(np.asarray(got['conv2']['u'])).max() > 1e-6
  assert not np.allclose(got['conv1']['u'], refs['conv3']['conv1']['u'], atol=1e-6)
  whole = _with(c, dfa__modules='conv1+conv2+conv3+fc1+head')
  run = build.setup(whole)
  assert run.state.feedback.names == ()
  got, _ = steps_lib.compute_updates(run.step_cfg, run.state, batch)
  # atol 1e-6: a conv bias before BN has a zero gradient, float noise of ~1e-7 either way
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got, jax.grad(lambda p: ce(forward(p)[0]))(run.state.params))


def test_module_patterns_expand_over_the_blocks_of_a_resnet():
  """'conv1+stage1_*,stage2_*,stage3_*+head' on ResNet-20: one module per stage; a stage's
  first block learns from the stage's last readout through the residual blocks between."""
  from configs import zoo
  c = zoo.get_config('resnet20,cifar10,smoke')
  c.dfa.update(method='ssa', signal='local', modules='conv1+stage1_*,stage2_*,stage3_*+head')
  run = build.setup(c)
  stage = lambda i: tuple(f'stage{i}_block{b}' for b in range(3))
  assert run.step_cfg.modules == (('conv1', *stage(1)), stage(2), (*stage(3), 'head'))
  state, fb = run.state, run.state.feedback
  assert set(fb.names) == {'stage1_block2', 'stage2_block2'}
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray([0, 1, 2, 3])}
  got, _ = jax.jit(functools.partial(steps_lib.compute_updates, run.step_cfg))(state, batch)

  def stage2_ce(params):
    (_, taps), _ = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                  batch['image'], train=True, mutable=['batch_stats'])
    return signals.local_loss(taps['stage2_block2'], fb.block('stage2_block2'), batch['label'])
  want = jax.jit(jax.grad(stage2_ce))(state.params)['stage2_block0']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               got['stage2_block0'], want)
  with pytest.raises(train.ConfigError, match="pattern 'stage9_\\*' matches no block"):
    build.setup(_with(c, dfa__modules='stage9_*+head'))
  # forward order, not the sorted one (block10 sorts before block2): MobileNet's 13 blocks
  m = zoo.get_config('mobilenet_v1,cifar10,smoke')
  m.model.kwargs.width = 0.25
  m.dfa.update(method='ssa', signal='local', modules='conv1+block*')
  run = build.setup(m)
  assert run.step_cfg.modules == (('conv1', *(f'block{i}' for i in range(1, 14))),)
  assert run.state.feedback.names == ('block13',)


def test_overlap_trains_the_block_below_each_cut_with_the_gradient_there():
  """dfa.overlap (LoCo) on the BN SmallConv, modules 'conv2+conv3,fc1+head', local signal:
  the gradient at a cut also trains the block below it and stops at that block's input. So,
  written out on the uncut forward (where a block's own param gradient holds its input fixed):
  conv1 takes its readout's CE and conv3's (through conv2's cut); conv3 takes conv3's and the
  output CE (through fc1's cut); conv2 only conv3's; fc1 and head the output CE. The forward,
  the taps and the BN statistics are those without overlap (the batch is counted once)."""
  c = tiny_config('ssa', dfa__signal='local', dfa__align='none', model__act='leaky_relu',
                  dfa__modules='conv2+conv3,fc1+head', dfa__overlap=True,
                  model__kwargs=ml_collections.ConfigDict({'widths': (4, 8, 8), 'hidden': 16,
                                                           'norm': 'batch'}))
  run = build.setup(c)
  assert run.step_cfg.overlap
  state, fb = run.state, run.state.feedback
  images, labels = data_lib.synthetic(**c.data.synthetic.to_dict())["train"]
  batch = {'image': jnp.asarray(images[:16], jnp.float32) / 255.0,
           'label': jnp.asarray(labels[:16])}
  got, aux = steps_lib.compute_updates(run.step_cfg, state, batch)
  plain, plain_aux = steps_lib.compute_updates(
      dataclasses.replace(run.step_cfg, overlap=False), state, batch)

  def forward(params):
    (logits, taps), _ = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                       batch['image'], train=True, mutable=['batch_stats'])
    return logits, taps

  def ce(params):
    z = forward(params)[0]
    return -jnp.mean(jnp.sum(jax.nn.one_hot(batch['label'], z.shape[-1])
                             * jax.nn.log_softmax(z), -1))

  def readout_ce(block):
    return lambda p: signals.local_loss(forward(p)[1][block], fb.block(block), batch['label'])
  g = {'conv1': jax.grad(readout_ce('conv1'))(state.params),
       'conv3': jax.grad(readout_ce('conv3'))(state.params), 'ce': jax.grad(ce)(state.params)}
  losses_of = {'conv1': ('conv1', 'conv3'), 'conv2': ('conv3',), 'conv3': ('conv3', 'ce'),
               'fc1': ('ce',), 'head': ('ce',)}
  for name in state.params:
    block = name.removesuffix('_bn')
    want = jax.tree.map(lambda *t: sum(t), *(g[k][name] for k in losses_of[block]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got[name], want)
  # the overlap is visible (conv1, conv3 changed), the rest is the step without it
  for name in ('conv1', 'conv3'):
    assert not np.allclose(got[name]['u'], plain[name]['u'], atol=1e-6), name
  for name in ('conv2', 'fc1', 'head'):
    jax.tree.map(np.testing.assert_array_equal, got[name], plain[name])
  jax.tree.map(np.testing.assert_array_equal, (aux['logits'], aux['extra']),
               (plain_aux['logits'], plain_aux['extra']))


def test_overlap_on_a_resnet_crosses_one_block_at_each_stage_cut():
  """ResNet-20, one module per stage, overlap: a stage's last block also takes the next
  stage's loss; the block before it does not."""
  from configs import zoo
  c = zoo.get_config('resnet20,cifar10,smoke')
  c.model.kwargs.width = 0.5
  c.dfa.update(method='ssa', signal='local', align='none', overlap=True,
               modules='conv1+stage1_*,stage2_*,stage3_*+head')
  run = build.setup(c)
  state, fb = run.state, run.state.feedback
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray([0, 1, 2, 3])}
  got, _ = jax.jit(functools.partial(steps_lib.compute_updates, run.step_cfg))(state, batch)

  def stage_ce(params, block):
    (_, taps), _ = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                  batch['image'], train=True, mutable=['batch_stats'])
    return signals.local_loss(taps[block], fb.block(block), batch['label'])
  grad = jax.jit(jax.grad(stage_ce), static_argnums=1)
  s1, s2 = grad(state.params, 'stage1_block2'), grad(state.params, 'stage2_block2')
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  jax.tree.map(close, got['stage1_block2'],
               jax.tree.map(jnp.add, s1['stage1_block2'], s2['stage1_block2']))
  jax.tree.map(close, got['stage1_block1'], s1['stage1_block1'])


@pytest.mark.parametrize('learn, align', [('none', 'output'), ('local', 'none'),
                                          ('none', 'channel_subspace')])
def test_blockwise_step_gives_the_same_update_and_state_in_block_order(learn, align):
  """dfa.blockwise on ResNet-20 (BN, local readouts): the same update, BN statistics, losses
  and readout gradients as the one-vjp step; in the compiled program every block's weight
  gradient comes before the next block's forward, so fewer temporary bytes."""
  from configs import zoo
  c = zoo.get_config('resnet20,cifar10,smoke')
  c.model.kwargs.width = 0.5
  c.train.xla_scheduler = 'default'
  c.dfa.update(method='ssa', signal='local', align=align, align_weight=0.1,
               learn_feedback=learn)
  run = build.setup(c)
  cb = _with(c, dfa__blockwise=True)
  cfg_b = build.setup(cb).step_cfg
  assert cfg_b.blockwise == tuple(f'stage{i}_block{j}' for i in (1, 2, 3) for j in range(3))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 8))}
  step = lambda cfg: jax.jit(functools.partial(steps_lib.compute_updates, cfg))
  (want, aux_w), (got, aux_g) = (step(cfg)(run.state, batch) for cfg in (run.step_cfg, cfg_b))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  jax.tree.map(close, got, want)
  jax.tree.map(close, aux_g['extra'], aux_w['extra'])  # BN statistics, counted once
  for k in ('loss', 'local_loss', 'align_loss'):
    close(aux_g[k], aux_w[k])
  if learn == 'local':
    jax.tree.map(close, aux_g['feedback_grads'], aux_w['feedback_grads'])
  assert float(jnp.abs(got['stage2_block1']['conv1']['u']).sum()) > 0  # a real update
  temp = lambda cfg: step(cfg).lower(run.state, batch).compile().memory_analysis(
      ).temp_size_in_bytes
  assert temp(cfg_b) < temp(run.step_cfg)


@pytest.mark.parametrize('kw, message', [
    ({'dfa__signal': 'global'}, 'needs dfa.signal=local'),
    ({'dfa__overlap': True}, 'no dfa.overlap'),
])
def test_blockwise_needs_a_local_signal_on_a_resnet(kw, message):
  from configs import zoo
  c = zoo.get_config('resnet20,cifar10,smoke')
  c.dfa.update(method='ssa', signal='local', blockwise=True)
  with pytest.raises(train.ConfigError, match=message):
    build.validate(_with(c, **kw))
  with pytest.raises(train.ConfigError, match='built for resnet20, .* not small_conv'):
    build.validate(tiny_config(dfa__signal='local', dfa__blockwise=True))
  build.validate(_with(c, dfa__method='bp'))  # backprop ignores it, as the other dfa fields


@pytest.mark.parametrize('kw, message', [
    ({'dfa__method': 'svd_bp'}, 'svd_bp is not local'),
    ({'model__name': 'mlp'}, 'built for small_conv, .* not mlp'),
])
def test_overlap_needs_a_local_method_and_a_model_that_recomputes(kw, message):
  with pytest.raises(train.ConfigError, match=message):
    build.setup(tiny_config(**{'dfa__overlap': True, **kw}))


@pytest.mark.parametrize('modules, kw, message', [
    ('conv1+conv3', {}, "'conv1\\+conv3' is not a run of consecutive blocks"),
    ('conv3+head', {}, 'not a run of consecutive blocks'),
    ('conv9+head', {}, r"dfa.modules \['conv9'\] name no block"),
    ('conv1+conv2,conv2+conv3', {}, r"puts \['conv2'\] in two modules"),
    ('conv1', {}, 'must join two or more blocks'),
    ('conv1+conv2', {'dfa__method': 'svd_bp'}, 'svd_bp is not local'),
    ('conv1+conv2', {'dfa__bp_blocks': ('conv3',)}, 'do not combine'),
])
def test_modules_must_be_runs_of_blocks_of_a_local_method(modules, kw, message):
  with pytest.raises(train.ConfigError, match=message):
    build.setup(tiny_config(**{'dfa__signal': 'local', 'dfa__modules': modules, **kw}))


def _with(config, **overrides):
  c = config.copy_and_resolve_references()
  for k, v in overrides.items():
    section, field = k.split('__')
    c[section][field] = v
  return c


def test_bp_blocks_must_name_blocks_of_a_local_method():
  with pytest.raises(train.ConfigError, match=r"dfa.bp_blocks \['conv9'\] name no block"):
    train.train_and_evaluate(tiny_config(dfa__bp_blocks=('conv9',)))
  with pytest.raises(train.ConfigError, match='svd_bp is not local'):
    train.train_and_evaluate(tiny_config('svd_bp', dfa__bp_blocks=('conv1',)))
  # build.validate makes the same checks without initialising a state (from param shapes)
  with pytest.raises(train.ConfigError, match=r"dfa.bp_blocks \['conv9'\] name no block"):
    build.validate(tiny_config(dfa__bp_blocks=('conv9',)))
  with pytest.raises(train.ConfigError, match=r"model.overrides \['conv9'\] match no layer"):
    build.validate(tiny_config(model__overrides='conv9:dense'))
  info, model = build.validate(tiny_config(dfa__bp_blocks=('conv2',)))
  assert info['num_classes'] == 4 and type(model).__name__ == 'SmallConv'
