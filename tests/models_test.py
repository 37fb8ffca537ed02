"""The model zoo: builds, parameter counts, a train step per method, full-rank equality,
block locality, the per-layer rank syntax and the block -> output-layer convention."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from lrdfa_jax import dfa, feedback as fb, layers, models, train

ZOO = ('vgg13', 'resnet20', 'resnet32', 'resnet56', 'resnet18', 'resnet50', 'mobilenet_v1')

# Width-reduced test variants and the input size each needs (VGG: 5 pools; ImageNet
# ResNets: /32; MobileNetV1: /16).
TINY = {
    'vgg13': (dict(width=1 / 16), 32),
    'resnet20': (dict(width=0.25), 8),
    'resnet32': (dict(width=0.25), 8),
    'resnet56': (dict(width=0.25), 8),
    'resnet18': (dict(width=1 / 16), 32),
    'resnet50': (dict(width=1 / 16), 32),
    'mobilenet_v1': (dict(width=1 / 8), 16),
}
C = 5
B = 4


def _x(size, seed=0):
  return jax.random.normal(jax.random.key(seed), (B, size, size, 3))


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _init(model, size):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


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
  overrides = {'conv1': 'dense', 'stage2*': 0.5, 'block1?/pw': 1.0, 'head': 'dense'}
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


def _config(name, method):
  kwargs, size = TINY[name]
  c = default.get_config()
  c.model.name = name
  c.model.kwargs = dict(kwargs)
  c.model.rank = 0.5
  c.model.overrides = 'conv1:dense,head:dense'
  c.model.act = 'relu'
  c.dfa.method = method
  c.opt.warmup_steps = 0
  return c, size


@pytest.mark.parametrize('name', ZOO)
def test_forward_and_one_train_step_per_method(name):
  x = _x(TINY[name][1])
  y = jnp.arange(B) % C
  counts = {}
  for method in train.METHODS:
    config, size = _config(name, method)
    model = train.build_model(config, C)
    tx, _ = train.build_tx(config, 10)
    state = train.create_train_state(config, model, tx, (size, size, 3), C, jax.random.key(0))
    counts[method] = train.param_count(state.params)
    logits, taps = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x)
    assert logits.shape == (B, C) and taps
    if method in train.LOCAL_METHODS:
      assert set(state.feedback.names) == set(taps)
    cfg = train.StepConfig(method=method, align=config.dfa.align,
                           align_weight=config.dfa.align_weight)
    new, metrics = jax.jit(functools.partial(train.train_step, cfg=cfg))(
        state, {'image': x, 'label': y})
    assert np.isfinite(float(metrics['loss'])), (name, method)
    assert np.isfinite(float(metrics['update_norm'])) and float(metrics['update_norm']) > 0
    assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(new.params))
    # every top-level block moved, BN statistics too
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, new.params)
    assert all(any(jax.tree.leaves(v)) for v in moved.values()), (name, method, moved)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                            state.batch_stats, new.batch_stats)))
  assert counts['bp'] == counts['dfa'] > counts['svd_bp'] == counts['ssa']


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


@pytest.mark.parametrize('split', ['spatial', 'channel'])
@pytest.mark.parametrize('name', ZOO)
def test_full_rank_svd_model_equals_dense_model(name, split):
  kwargs, size = TINY[name]
  x = _x(size, 1)
  svd = models.build_model(name, num_classes=C, rank=1.0, split=split, **kwargs)
  dense = models.build_model(name, num_classes=C, **kwargs)
  v = svd.init(jax.random.key(2), x)
  dense_params = _dense_twin(v['params'], _init(dense, size)['params'], split)
  assert _count(models.layer_paths(dense_params)) > 0
  assert not any(layers.is_svd_layer(l) for l in models.layer_paths(dense_params).values())
  for train_mode in (False, True):
    (want, want_taps), _ = dense.apply({'params': dense_params, 'batch_stats': v['batch_stats']},
                                       x, train=train_mode, mutable=['batch_stats'])
    (got, got_taps), _ = svd.apply(v, x, train=train_mode, mutable=['batch_stats'])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for t in want_taps:
      np.testing.assert_allclose(got_taps[t], want_taps[t], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- locality


def _local_updates(model, variables, x, y):
  def forward(p):
    out, mutated = model.apply({**variables, 'params': p}, x, train=True, local=True,
                               mutable=['batch_stats'])
    return out, mutated['batch_stats']
  return jax.jit(lambda p, f: dfa.local_grads(forward, p, f, y, align='subspace',
                                              align_weight=0.1)[0])


def _swap_block(feedback, other, name):
  """``feedback`` with block ``name``'s arrays taken from ``other`` (same layout)."""
  (gkey, i), = [(g, i) for n, g, i in feedback.index if n == name]
  groups = dict(feedback.groups)
  groups[gkey] = {k: a.at[i].set(other.groups[gkey][k][i]) for k, a in groups[gkey].items()}
  return fb.Feedback(groups=groups, index=feedback.index)


@pytest.mark.parametrize('kind', ['dense', 'structured'])
@pytest.mark.parametrize('name,block,kwargs', [
    ('resnet20', 'stage2_block0', {}),
    ('resnet20', 'stage2_block0', {'shortcut': 'conv'}),  # a trained shortcut conv
    ('resnet50', 'stage3_block0', {}),
    ('mobilenet_v1', 'block4', {}),
    ('vgg13', 'conv5', {}),
])
def test_no_block_update_depends_on_another_blocks_feedback(name, block, kwargs, kind):
  tiny, size = TINY[name]
  model = models.build_model(name, num_classes=C, rank=0.5, split='channel', **tiny, **kwargs)
  x, y = _x(size), jnp.arange(B) % C
  variables = model.init(jax.random.key(0), x)
  taps = jax.eval_shape(lambda v: model.apply(v, x)[1], variables)
  widths = dfa.tap_widths(taps)
  feedback = fb.init_feedback(jax.random.key(1), widths, C, kind=kind, ranks=2)
  other = fb.init_feedback(jax.random.key(7), widths, C, kind=kind, ranks=2)
  step = _local_updates(model, variables, x, y)
  base = step(variables['params'], feedback)
  swapped = step(variables['params'], _swap_block(feedback, other, block))
  for key in base:
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                        base[key], swapped[key]))
    if key == block:
      assert not any(same), key        # every leaf of the block moves with its feedback
    else:
      assert all(same), key            # ... and nothing else does
  if kwargs.get('shortcut') == 'conv':
    assert 'shortcut' in base[block]


def test_dfa_step_computes_no_input_gradient_between_blocks():
  """ResNet-20: BP differentiates every conv's input but the stem's; DFA only the convs that
  feed another layer of the same block (each block's conv1 output goes through conv2)."""
  model = models.build_model('resnet20', num_classes=C, width=0.25)
  x, y = _x(8), jnp.arange(B) % C
  variables = model.init(jax.random.key(0), x)
  taps = jax.eval_shape(lambda v: model.apply(v, x)[1], variables)
  feedback = fb.init_feedback(jax.random.key(1), dfa.tap_widths(taps), C, kind='dense')

  def forward(local):
    def f(p):
      out, m = model.apply({**variables, 'params': p}, x, train=True, local=local,
                           mutable=['batch_stats'])
      return out, m['batch_stats']
    return f

  def n_convs(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text().count('convolution(')

  n_dfa = n_convs(lambda p, f: dfa.local_grads(forward(True), p, f, y)[0],
                  variables['params'], feedback)
  n_bp = n_convs(lambda p: dfa.bp_grads(forward(False), p, y)[0], variables['params'])
  n_layers, n_blocks = 19, 9
  assert n_dfa == 2 * n_layers + n_blocks, n_dfa       # forward, weight grads, conv2 -> conv1
  assert n_bp == 2 * n_layers + (n_layers - 1), n_bp   # ... and every input gradient


# --------------------------------------------------------------- names, ranks, patterns


def test_layer_rank_patterns():
  ov = train.parse_overrides('conv1:dense, stage3*:0.5, stage3_block0/shortcut:dense, '
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
  want = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(models.max_pool_3x3_s2(x), want)
