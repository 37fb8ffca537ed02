"""The model zoo: builds, parameter counts, a train step per method, full-rank equality,
block locality, the per-layer rank syntax and the block -> output-layer convention."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from lrdfa_jax import build, dfa, feedback as fb, layers, models
from lrdfa_jax import metrics as metrics_lib, steps as steps_lib

ZOO = ('vgg13', 'resnet20', 'resnet32', 'resnet56', 'resnet18', 'resnet50', 'mobilenet_v1')

# Width-reduced test variants at the registered depth, and the input size each needs (VGG:
# 5 pools; ImageNet ResNets: /32; MobileNetV1: /16).
TINY = {
    'vgg13': (dict(width=1 / 16), 32),
    'resnet20': (dict(width=0.25), 8),
    'resnet32': (dict(width=0.25), 8),
    'resnet56': (dict(width=0.25), 8),
    'resnet18': (dict(width=1 / 16), 32),
    'resnet50': (dict(width=1 / 16), 32),
    'mobilenet_v1': (dict(width=1 / 8), 16),
}
# ... and shallow as well, for the tests that compile a train step or a forward: XLA:CPU takes
# ~0.1-0.2 s per conv to compile, so a full-depth ResNet-56 step costs a minute per method.
# One registered name per architecture family, each keeping its family's distinct parts: the
# stem, the block type, identity and projection/pad shortcuts, depthwise convs.
SHALLOW = {
    'vgg13': (dict(width=1 / 16, widths=((64,), (128,), (128,), (128,), (128,))), 32),
    'resnet20': (dict(width=0.25, stage_sizes=(1, 1), widths=(16, 32)), 8),  # identity, pad
    # basic blocks with identity and 1×1/2 conv shortcuts (resnet50 has the ImageNet stem)
    'resnet18': (dict(width=1 / 16, stage_sizes=(1, 1), widths=(64, 128), stem='cifar'), 8),
    'resnet50': (dict(width=1 / 16, stage_sizes=(1, 1), widths=(64, 128)), 32),  # 1×1, 1×1/2
    'mobilenet_v1': (dict(width=1 / 8, blocks=((64, 1), (128, 2))), 16),
}
# LRDFA_FULL_ZOO_TESTS=1: those tests run on every registered model at its registered depth
# (tiny width) instead; about 8 CPU-minutes.
FULL_ZOO = bool(os.environ.get('LRDFA_FULL_ZOO_TESTS'))
COMPILED_CASES = TINY if FULL_ZOO else SHALLOW
# The block whose feedback the locality check swaps (one with a shortcut conv where there is).
SWAP = {'vgg13': 'conv3', 'mobilenet_v1': 'block1'}
C = 5
B = 4
# XLA:CPU compile options for the tests' jits: the programs are tiny, compile time dominates.
# (Not xla_backend_optimization_level=0: it gives NaN gradients here.)
FAST_COMPILE = {'xla_cpu_use_fusion_emitters': False, 'xla_llvm_disable_expensive_passes': True}


def _compile(fn, *args):
  """``fn`` jitted and compiled for ``args`` with :data:`FAST_COMPILE`."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _jit(fn, *args):
  return _compile(fn, *args)(*args)


def _x(size, seed=0):
  return jax.random.normal(jax.random.key(seed), (B, size, size, 3))


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _init(model, size):
  """Shapes of ``model``'s variables (nothing runs)."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def _variables(model, size, seed=0):
  """Random variables of ``model`` drawn with numpy: XLA:CPU takes ~0.15 s per layer to compile
  a random init, most of these tests' time otherwise. Factors get orthonormal columns."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name in ('u', 'v'):
      x = np.linalg.qr(rng.normal(size=shape))[0]
    elif name == 's':
      x = np.sort(rng.uniform(0.5, 1.5, shape))[::-1]
    elif name == 'kernel':
      x = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name in ('scale', 'var'):
      x = rng.uniform(0.5, 1.5, shape)
    else:  # bias, BN shift and running mean
      x = 0.1 * rng.normal(size=shape)
    return jax.device_put(x.astype(np.float32))  # jnp.asarray would compile per shape

  return jax.tree_util.tree_map_with_path(draw, _init(model, size))


# ------------------------------------------------------------------------ param counts


@pytest.mark.parametrize('name,size,classes,want', [
    ('resnet20', 32, 10, 269_722),        # He et al. 2016 / akamaster: 0.27M (option A)
    ('resnet32', 32, 10, 464_154),        # 0.46M
    ('resnet56', 32, 10, 853_018),        # 0.85M
    ('resnet18', 224, 1000, 11_689_512),  # torchvision resnet18
    ('resnet50', 224, 1000, 25_557_032),  # torchvision resnet50
    ('mobilenet_v1', 32, 10, 3_217_226),  # CIFAR MobileNetV1 (stride-1 stem)
    ('vgg13', 32, 10, 9_413_066),         # VGG-13-BN, 512 -> 10 classifier, no conv bias
])
def test_dense_param_counts_match_the_references(name, size, classes, want):
  model = models.build_model(name, num_classes=classes)
  assert _count(_init(model, size)['params']) == want


@pytest.mark.parametrize('name', ZOO)
def test_svd_param_count_is_r_times_m_plus_n_plus_1(name):
  """Each factored layer holds r(m + n + 1) (+ bias) params at the rank its pattern gives."""
  kwargs, size = TINY[name]
  overrides = {'conv1': 'dense', 'stage2*': 0.5, 'block1?/pw': 'full', 'head': 'dense'}
  dense = _init(models.build_model(name, num_classes=C, **kwargs), size)['params']
  svd = _init(models.build_model(name, num_classes=C, rank=0.25, overrides=overrides,
                                 split='spatial', **kwargs), size)['params']
  want = _count(dense)
  n_factored = 0
  for path, layer in models.layer_paths(dense).items():
    k = layer['kernel'].shape
    if path in ('conv1', 'head') or path.endswith('/dw'):
      assert 'kernel' in models.layer_paths(svd)[path]
      continue
    frac = (0.5 if path.startswith('stage2') else
            1.0 if path in ('block10/pw', 'block11/pw', 'block12/pw', 'block13/pw') else 0.25)
    if len(k) == 4:  # spatial split: (kh·Cin) × (kw·Cout)
      m, n = k[0] * k[2], k[1] * k[3]
    else:
      m, n = k
    r = max(1, round(frac * min(m, n)))
    assert models.layer_paths(svd)[path]['s'].shape == (r,), path
    want += r * (m + n + 1) - int(np.prod(k))
    n_factored += 1
  assert n_factored > 5
  assert _count(svd) == want


# ------------------------------------------------------------- one step of every method


def _config(name, method, kwargs):
  c = default.get_config()
  c.model.name = name
  c.model.kwargs = dict(kwargs)
  c.model.rank = 0.5
  c.model.overrides = 'conv1:dense,head:dense'
  c.model.act = 'relu'
  c.dfa.method = method
  # SGD: the first step moves params by lr·update exactly (Adam's first step is lr·sign),
  # so comparing new params compares the updates themselves.
  c.opt.name = 'sgd'
  c.opt.lr = 0.1
  c.opt.clip_norm = 0.0  # a global-norm clip would couple the blocks' steps
  c.opt.warmup_steps = 0
  return c


def _feedback(config, params, taps, seed):
  """``build.build_feedback``'s feedback (same layout and ranks), its values drawn with numpy
  (compiling the random draws, one shape at a time, would cost more than the train step)."""
  shapes = jax.eval_shape(
      lambda p: build.build_feedback(config, jax.random.key(0), p, taps, C), params)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name in ('p', 'q'):  # [G, n, k], orthonormal columns
      x = np.linalg.qr(rng.normal(size=shape))[0]
    elif name == 'sigma':
      x = np.ones(shape)
    else:  # dense feedback f [G, d, C]
      x = rng.normal(size=shape) / np.sqrt(C)
    return jax.device_put(x.astype(np.float32))  # jnp.asarray would compile per shape

  return fb.Feedback(groups=jax.tree_util.tree_map_with_path(draw, shapes.groups),
                     index=shapes.index)


def _swap_block(feedback, other, name):
  """``feedback`` with block ``name``'s arrays taken from ``other`` (same layout)."""
  (gkey, i), = [(g, i) for n, g, i in feedback.index if n == name]
  groups = dict(feedback.groups)
  swapped = {}
  for k, a in groups[gkey].items():
    a = np.array(a)  # numpy: jnp indexing compiles per shape
    a[i] = np.asarray(other.groups[gkey][k])[i]
    swapped[k] = jax.device_put(a)
  groups[gkey] = swapped
  return fb.Feedback(groups=groups, index=feedback.index)


def _block_keys(params, block):
  """The top-level param keys of block ``block`` (VGG's ``conv{i}`` and ResNet's stem
  ``conv1`` keep their BN beside them as ``bn{i}``)."""
  own = {block, 'bn' + block[4:]} if block.startswith('conv') else {block}
  return own & set(params)


@pytest.mark.parametrize('name', sorted(COMPILED_CASES))
def test_one_train_step_per_method_and_block_locality(name):
  """Every method: a forward, one ``steps.train_step`` (finite, moves every block and the BN
  statistics), trainable-param counts. Under dfa and ssa, swapping one block's feedback
  changes that block's new params and no other block's."""
  kwargs, size = COMPILED_CASES[name]
  batch = {'image': _x(size), 'label': jnp.arange(B) % C}
  states, swapped, cfgs = {}, {}, {}
  # dfa and ssa build the states (build.create_train_state, with a numpy init); bp and
  # svd_bp take the same params and optimizer and never read the feedback.
  source = {'dfa': 'dfa', 'ssa': 'ssa', 'bp': 'dfa', 'svd_bp': 'ssa'}
  for method in steps_lib.METHODS:
    config = _config(name, method, kwargs)
    cfgs[method] = steps_lib.StepConfig(method=method, align=config.dfa.align,
                                        align_weight=config.dfa.align_weight)
    if method not in steps_lib.LOCAL_METHODS:
      continue
    model = build.build_model(config, C)
    tx, _ = build.build_tx(config, 10)
    v = _variables(model, size)
    taps = jax.eval_shape(lambda v: model.apply(v, batch['image'])[1], v)  # noqa: B023
    feedback, other = (_feedback(config, v['params'], taps, seed) for seed in (1, 7))
    assert set(feedback.names) == set(taps) and 'head' not in taps
    states[method] = _jit(lambda v, f: steps_lib.TrainState.create(  # noqa: B023
        apply_fn=model.apply, params=v['params'], tx=tx, batch_stats=v['batch_stats'],  # noqa
        feedback=f), v, feedback)
    block = SWAP.get(name, 'stage2_block0')
    swapped[method] = states[method].replace(feedback=_swap_block(feedback, other, block))

  def all_methods(states, batch):
    out = {m: steps_lib.train_step(states[source[m]], batch, cfgs[m]) for m in steps_lib.METHODS}
    fwd = {m: states[m].apply_fn({'params': states[m].params,
                                  'batch_stats': states[m].batch_stats}, batch['image'])
           for m in states}
    return out, fwd

  run = _compile(all_methods, states, batch)  # one compile for the four methods
  out, fwd = jax.device_get(run(states, batch))  # numpy from here: no more compiles
  out_swapped, _ = jax.device_get(run(swapped, batch))
  states = jax.device_get(states)

  for m in states:
    logits, taps = fwd[m]
    assert logits.shape == (B, C) and set(taps) == set(states[m].feedback.names)
  counts = {m: metrics_lib.param_count(states[source[m]].params) for m in steps_lib.METHODS}
  assert counts['bp'] == counts['dfa'] > counts['svd_bp'] == counts['ssa']
  for m, (new, metrics) in out.items():
    state = states[source[m]]
    assert np.isfinite(float(metrics['loss'])), (name, m)
    assert np.isfinite(float(metrics['update_norm'])) and float(metrics['update_norm']) > 0
    assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(new.params)), (name, m)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, new.params)
    assert all(any(jax.tree.leaves(v)) for v in moved.values()), (name, m, moved)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                            state.batch_stats, new.batch_stats)))
  # locality: swapping one block's feedback changes every leaf of that block's update and
  # no other block's (bit for bit)
  block = SWAP.get(name, 'stage2_block0')
  for m in steps_lib.LOCAL_METHODS:
    new, new_swapped = out[m][0].params, out_swapped[m][0].params
    own = _block_keys(new, block)
    for key in new:
      same = [bool(np.array_equal(a, b)) for a, b in zip(jax.tree.leaves(new[key]),
                                                        jax.tree.leaves(new_swapped[key]))]
      if key in own:
        assert not any(same), (m, key)
      else:
        assert all(same), (m, key)
    if name.startswith('resnet') and name not in ('resnet20', 'resnet32', 'resnet56'):
      assert 'shortcut' in new[block] and 'shortcut_bn' in new[block]  # trained locally


# -------------------------------------------------------------- full-rank SVD == dense


def _dense_twin(svd_params, dense_params, split):
  """Dense params with every factored kernel rebuilt from ``u diag(s) vᵀ``."""
  def rebuild(s, d):
    if layers.is_svd_layer(s):
      k = d['kernel']
      kernel = (layers.rebuild_conv_kernel(s['u'], s['s'], s['v'], k.shape[:2], split)
                if k.ndim == 4 else layers.rebuild_dense_kernel(s['u'], s['s'], s['v']))
      return {**{k_: v for k_, v in s.items() if k_ not in ('u', 's', 'v')}, 'kernel': kernel}
    if isinstance(s, dict):
      return {k_: rebuild(s[k_], d[k_]) for k_ in s}
    return s
  return rebuild(svd_params, dense_params)


@pytest.mark.parametrize('name', sorted(COMPILED_CASES))
def test_full_rank_svd_model_equals_dense_model(name):
  """At rank 1.0 (spatial and channel split) the forward equals the dense model's with the
  kernels rebuilt from ``u diag(s) vᵀ`` (same module names; depthwise convs and BN shared)."""
  kwargs, size = COMPILED_CASES[name]
  dense = models.build_model(name, num_classes=C, **kwargs)
  dense_shapes = _init(dense, size)['params']
  svds = {split: models.build_model(name, num_classes=C, rank='full', split=split, **kwargs)
          for split in ('spatial', 'channel')}
  vs = {split: _variables(m, size, seed=i) for i, (split, m) in enumerate(svds.items())}

  def both(vs, x):
    out = {}
    for split, v in vs.items():
      dense_params = _dense_twin(v['params'], dense_shapes, split)
      assert not any(layers.is_svd_layer(l) for l in models.layer_paths(dense_params).values())
      out[split] = (dense.apply({'params': dense_params, 'batch_stats': v['batch_stats']}, x),
                    svds[split].apply(v, x))
    return out

  for split, (want, got) in _jit(both, vs, _x(size, 1)).items():
    # logits and every tap; residual nets grow activations with depth, so atol follows scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(  # noqa: B023
        a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=split), got, want)


# --------------------------------------------------------------------------- locality


def test_dfa_step_computes_no_input_gradient_between_blocks():
  """CIFAR ResNet: BP differentiates every conv's input but the stem's; DFA only the convs
  that feed another layer of the same block (each block's conv1 output goes through conv2)."""
  model = models.build_model('resnet20', num_classes=C, width=0.25, stage_sizes=(1, 1),
                             widths=(16, 32), im2col_positions=0,  # every conv a convolution
                             conv_kernel_grad='xla')               # with XLA's own gradients
  x, y = _x(8), jnp.arange(B) % C
  variables = _variables(model, 8)
  taps = jax.eval_shape(lambda v: model.apply(v, x)[1], variables)
  feedback = fb.init_feedback(jax.random.key(1), dfa.tap_widths(taps), C, kind='dense')

  def forward(local):
    def f(p):
      out, m = model.apply({**variables, 'params': p}, x, train=True, local=local,
                           mutable=['batch_stats'])
      return out, m['batch_stats']
    return f

  def n_convs(fn, *args):
    return _compile(fn, *args).as_text().count('convolution(')

  n_dfa = n_convs(lambda p, f: dfa.local_grads(forward(True), p, f, y)[0],
                  variables['params'], feedback)
  n_bp = n_convs(lambda p: dfa.bp_grads(forward(False), p, y)[0], variables['params'])
  n_blocks = 2
  n_layers = 1 + 2 * n_blocks
  assert n_dfa == 2 * n_layers + n_blocks, n_dfa       # forward, weight grads, conv2 -> conv1
  assert n_bp == 2 * n_layers + (n_layers - 1), n_bp   # ... and every input gradient


# --------------------------------------------------------------- names, ranks, patterns


def test_layer_rank_patterns():
  ov = build.parse_overrides('conv1:dense, stage3*:0.5, stage3_block0/shortcut:dense, '
                             'stage*/conv2:8, head:dense')
  assert ov == {'conv1': 'dense', 'stage3*': 0.5, 'stage3_block0/shortcut': 'dense',
                'stage*/conv2': 8, 'head': 'dense'}
  r = functools.partial(models.layer_rank, rank=0.25, overrides=ov)
  assert r('conv1') == 'dense' and r('head') == 'dense'
  assert r('stage1_block0/conv1') == 0.25          # 'conv1' is exact: not the block's conv1
  assert r('stage3_block2/conv1') == 0.5
  assert r('stage3_block0/shortcut') == 'dense'
  assert r('stage3_block1/conv2') == 8             # the last matching pattern wins
  assert models.layer_rank('stage2_block1/conv2', 0.25, {'stage2_block1': 'dense'}) == 'dense'
  assert models.layer_rank('conv1', None, {}) is None


def test_overrides_reach_nested_layers_and_unmatched_ones_are_reported():
  kwargs, size = TINY['resnet20']
  ov = {'conv1': 'dense', 'stage3*': 0.5, 'stage2_block0': 'dense', 'stage9*': 0.1}
  params = _init(models.build_model('resnet20', num_classes=C, rank=0.25, overrides=ov,
                                    split='channel', shortcut='conv', **kwargs), size)['params']
  paths = models.layer_paths(params)
  assert 'kernel' in paths['conv1'] and 'kernel' in paths['stage2_block0/conv1']
  assert 'kernel' in paths['stage2_block0/shortcut']
  full = lambda p: min(int(np.prod(p['v'].shape[:1])), p['u'].shape[0])  # noqa: E731
  for path, p in paths.items():
    if path.startswith('stage3'):
      assert p['s'].shape[0] == round(0.5 * full(p)), path
    elif path.startswith('stage1'):
      assert p['s'].shape[0] == max(1, round(0.25 * full(p))), path
  assert models.unmatched_overrides(params, ov) == ['stage9*']


@pytest.mark.parametrize('name', ZOO)
def test_every_tap_has_an_output_layer_of_its_width(name):
  kwargs, size = TINY[name]
  model = models.build_model(name, num_classes=C, rank=0.5, split='channel', **kwargs)
  v = _init(model, size)
  taps = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3)))[1], v)
  for tap, shape in taps.items():
    layer = models.output_layer(v['params'], tap)
    assert layer is not None, tap
    width = layer['kernel'].shape[-1] if 'kernel' in layer else layer['u'].shape[0]
    assert width == shape.shape[-1], tap
  assert 'head' not in taps and 'head' in v['params']


def test_bad_model_arguments_fail_clearly():
  with pytest.raises(ValueError, match='takes no argument'):
    models.build_model('resnet20', num_classes=10, depth=20)
  m = models.build_model('resnet20', num_classes=10, shortcut='B')
  with pytest.raises(ValueError, match='unknown shortcut'):
    m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_max_pool_3x3_s2_equals_nn_max_pool():
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
  got, want = jax.jit(lambda x: (models.max_pool_3x3_s2(x),
                                 nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))))(x)
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- configs, param counts

def test_zoo_config_builds_every_model_and_dataset_and_refuses_bad_pairs():
  from configs import zoo
  assert len(zoo.PAIRS) == 12
  for model_name, dataset in zoo.PAIRS:
    for arg in ('', ',smoke'):
      c = zoo.get_config(f'{model_name},{dataset}{arg}')
      assert c.model.name == model_name and c.data.name == dataset
      assert (c.data.source == 'synthetic') == (arg == ',smoke')
      build.check_config(c, 1)
    c.dfa.method = 'ssa'  # the factored model; layer names do not depend on the input size
    params = _init(build.build_model(c, build.dataset_info(c)['num_classes']), 32)['params']
    assert models.unmatched_overrides(params, build.parse_overrides(c.model.overrides)) == []
    assert any(layers.is_svd_layer(l) for l in models.layer_paths(params).values())
  for bad, reason in (('resnet21,cifar10', 'MODEL,DATASET'), ('resnet20', 'MODEL,DATASET'),
                      ('resnet18,cifar10', 'resnet18 is built for imagenet2012'),
                      ('vgg13,imagenet2012', 'vgg13 is built for cifar10 or cifar100')):
    with pytest.raises(ValueError, match=reason):
      zoo.get_config(bad)


def test_param_counts_command_lists_dense_and_svd_counts():
  from experiments import param_counts
  out = param_counts.table(['zoo:resnet20,cifar10', 'configs/zoo.py:resnet18,imagenet2012'])
  rows = out.splitlines()
  assert len(rows) == 4
  assert '| resnet20 | `zoo:resnet20,cifar10` | 32×32, 10 | 269,722 | 77,506 | 0.29 |' in rows[2]
  assert ('| resnet18 | `configs/zoo.py:resnet18,imagenet2012` | 224×224, 1000 | 11,689,512 |'
          in rows[3])


def test_remat_blocks_give_the_same_update_for_bp_and_the_local_rule():
  """model.kwargs.remat rematerialises each residual block: the same params, loss and update
  (bp through the whole net, ssa's local vjps); a name that is no policy is refused."""
  kw, size = SHALLOW['resnet20']
  x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
  y = jnp.arange(4) % 10
  out = {}
  for remat in ('', 'nothing_saveable'):
    m = models.build_model('resnet20', num_classes=10, rank=0.5, remat=remat, **kw)
    variables = m.init(jax.random.key(0), x)
    params, stats = variables['params'], variables['batch_stats']
    jaxpr = str(jax.make_jaxpr(lambda p: m.apply({'params': p, 'batch_stats': stats}, x))(params))
    assert ('checkpoint' in jaxpr or 'remat' in jaxpr) == bool(remat)  # the blocks are remat'd

    def forward(p, local):
      (logits, taps), mutated = m.apply({'params': p, 'batch_stats': stats}, x, train=True,
                                        local=local, mutable=['batch_stats'])
      return (logits, taps), mutated['batch_stats']
    taps = jax.eval_shape(lambda p: forward(p, False)[0][1], params)
    feedback = fb.init_feedback(jax.random.key(2), dfa.tap_widths(taps, 'channel'), 10,
                                kind='structured', ranks=4)
    bp = jax.jit(lambda p: dfa.bp_grads(functools.partial(forward, local=False), p, y))(params)
    local = jax.jit(lambda p: dfa.local_grads(functools.partial(forward, local=True), p,
                                              feedback, y, signal='global'))(params)
    out[remat] = params, bp, local
  (params0, bp0, local0), (params, bp, local) = out[''], out['nothing_saveable']
  assert jax.tree.structure(params) == jax.tree.structure(params0)
  jax.tree.map(np.testing.assert_array_equal, params, params0)
  for got, want in ((bp, bp0), (local, local0)):
    np.testing.assert_allclose(got[1]['loss'], want[1]['loss'], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got[0], want[0])
  assert optax.global_norm(local0[0]) > 0 and optax.global_norm(bp0[0]) > 0
  m = models.build_model('resnet20', num_classes=10, remat='everything', **kw)
  with pytest.raises(ValueError, match="remat 'everything' is not a jax.checkpoint_policies"):
    m.init(jax.random.key(0), x)
