"""SVD layers equal their dense twins at full rank; factor/rebuild round trips; counts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrdfa_jax import layers


def _dense_from(params, kernel):
  return {'params': {'kernel': kernel, 'bias': params['bias']}}


def test_svd_dense_full_rank_equals_dense():
  x = jax.random.normal(jax.random.key(0), (5, 7))
  layer = layers.SVDDense(4, rank='full')
  p = layer.init(jax.random.key(1), x)['params']
  p = {**p, 'bias': jnp.arange(4.0)}
  kernel = layers.rebuild_dense_kernel(p['u'], p['s'], p['v'])
  want = nn.Dense(4).apply(_dense_from(p, kernel), x)
  np.testing.assert_allclose(layer.apply({'params': p}, x), want, rtol=1e-5, atol=1e-5)
  # the forward is ((x V) * s) Uᵀ + b, the SVD of the LeCun-normal kernel
  np.testing.assert_allclose(p['u'].T @ p['u'], np.eye(4), atol=1e-5)
  np.testing.assert_allclose(p['v'].T @ p['v'], np.eye(4), atol=1e-5)
  assert np.all(np.diff(p['s']) <= 0)


def test_factor_dense_kernel_roundtrip_and_truncation():
  k = jax.random.normal(jax.random.key(0), (6, 9))
  f = layers.factor_dense_kernel(k, 6)
  np.testing.assert_allclose(layers.rebuild_dense_kernel(**f), k, atol=1e-5)
  f2 = layers.factor_dense_kernel(k, 2)
  s = np.linalg.svd(np.asarray(k), compute_uv=False)
  err = np.linalg.norm(layers.rebuild_dense_kernel(**f2) - k)
  np.testing.assert_allclose(err, np.sqrt(np.sum(s[2:]**2)), rtol=1e-4)  # Eckart–Young


@pytest.mark.parametrize('split', ['spatial', 'channel'])
@pytest.mark.parametrize('strides,padding', [((1, 1), 'SAME'), ((2, 2), 'SAME'),
                                             ((2, 1), 'VALID'), ((1, 2), ((1, 2), (0, 1)))])
def test_svd_conv_full_rank_equals_conv(split, strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
  layer = layers.SVDConv(5, (3, 2), rank='full', strides=strides, padding=padding, split=split)
  p = layer.init(jax.random.key(1), x)['params']
  p = {**p, 'bias': jnp.linspace(-1, 1, 5)}
  kernel = layers.rebuild_conv_kernel(p['u'], p['s'], p['v'], (3, 2), split)
  dense = nn.Conv(5, (3, 2), strides=strides, padding=padding)
  want = dense.apply(_dense_from(p, kernel), x)
  got = layer.apply({'params': p}, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('split', ['spatial', 'channel'])
def test_conv_factor_roundtrip(split):
  k = jax.random.normal(jax.random.key(2), (3, 3, 4, 6))
  full = layers.conv_full_rank(k.shape, split)
  f = layers.factor_conv_kernel(k, full, split)
  np.testing.assert_allclose(layers.rebuild_conv_kernel(f['u'], f['s'], f['v'], (3, 3), split),
                             k, atol=1e-5)


def test_param_counts():
  x = jnp.zeros((1, 20))
  p = layers.SVDDense(30, rank=7).init(jax.random.key(0), x)['params']
  n_factors = sum(p[k].size for k in 'usv')
  assert n_factors == 7 * (20 + 30 + 1)
  assert sum(a.size for a in jax.tree.leaves(p)) == layers.svd_param_count(20, 30, 7)
  x = jnp.zeros((1, 8, 8, 4))
  for split, (m, n) in {'spatial': (3 * 4, 3 * 16), 'channel': (3 * 3 * 4, 16)}.items():
    p = layers.SVDConv(16, (3, 3), rank=5, split=split).init(jax.random.key(0), x)['params']
    assert p['v'].shape == (m, 5) and p['u'].shape == (n, 5)
    assert sum(a.size for a in jax.tree.leaves(p)) == 5 * (m + n + 1) + 16


def test_rank_resolution_and_errors():
  assert layers.resolve_rank(0.25, 64) == 16
  assert layers.resolve_rank(0.001, 64) == 1
  assert layers.resolve_rank(64, 64) == 64
  # integer-valued floats (from the float-typed model.rank) are that rank, never "all of it"
  assert layers.resolve_rank(1.0, 64) == 1 and layers.resolve_rank(2.0, 64) == 2
  assert layers.resolve_rank('full', 64) == 64
  with pytest.raises(ValueError, match="'full'"):
    layers.resolve_rank('half', 64)
  with pytest.raises(ValueError, match='above full rank 4'):
    layers.SVDDense(4, rank=5).init(jax.random.key(0), jnp.zeros((1, 10)))
  with pytest.raises(ValueError, match='fraction'):
    layers.resolve_rank(1.5, 10)
  with pytest.raises(ValueError, match="split must be"):
    layers.SVDConv(4, rank=2, split='depth').init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))


def test_fractional_rank_builds_low_rank_layer():
  p = layers.SVDConv(32, (3, 3), rank=0.25, split='channel').init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 16)))['params']
  assert p['s'].shape == (8,)


def _primitives(fn, *args):
  return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).eqns}


@pytest.mark.parametrize('hw,kernel,strides,padding', [
    ((2, 2), (3, 3), (1, 1), 'SAME'), ((4, 4), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((5, 3), (3, 1), (2, 1), 'SAME'), ((4, 4), (1, 3), (1, 1), ((0, 0), (1, 1))),
    ((6, 6), (3, 3), (2, 2), 'VALID'), ((8, 8), (3, 3), (2, 2), ((1, 0), (0, 1)))])
def test_tiny_map_conv_equals_lax_conv_with_gradients(hw, kernel, strides, padding):
  x = jax.random.normal(jax.random.key(0), (3, *hw, 5))
  k = jax.random.normal(jax.random.key(1), (*kernel, 5, 4))
  dn = ('NHWC', 'HWIO', 'NHWC')

  def loss(conv, x, k):
    y = conv(x, k, strides, padding, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y)), y
  (_, want), g_want = jax.value_and_grad(
      lambda x, k: loss(jax.lax.conv_general_dilated, x, k), (0, 1), has_aux=True)(x, k)
  (_, got), g_got = jax.value_and_grad(
      lambda x, k: loss(layers.conv_general_dilated, x, k), (0, 1), has_aux=True)(x, k)
  assert got.shape == want.shape and got.shape[1] * got.shape[2] <= layers.TINY_MAP
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # it really is the im2col form: no conv left in the jaxpr
  assert 'conv_general_dilated' not in _primitives(
      lambda x, k: layers.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn), x, k)


def test_large_maps_and_grouped_convs_keep_lax_conv():
  dn = ('NHWC', 'HWIO', 'NHWC')
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  k = jnp.ones((3, 3, 4, 4))
  big = _primitives(lambda x, k: layers.conv_general_dilated(x, k, (1, 1), 'SAME',
                                                             dimension_numbers=dn), x, k)
  grouped = _primitives(lambda x: layers.conv_general_dilated(
      x[:, :4, :4], k[..., :1, :], (1, 1), 'SAME', dimension_numbers=dn,
      feature_group_count=4), x)
  assert 'conv_general_dilated' in big and 'conv_general_dilated' in grouped


def test_zoo_convs_take_the_im2col_form_on_tiny_maps():
  """VGG-13's stage-4/5 convs (4×4, 2×2 maps) run as matmuls, dense (bp) and factored alike;
  ``im2col_positions=0`` keeps every conv a conv."""
  from lrdfa_jax import models
  x = jnp.zeros((1, 32, 32, 3))
  for rank in (None, 0.25):
    for positions, want in ((layers.TINY_MAP, [8 * 8, 16 * 16, 32 * 32]),
                            (0, [2 * 2, 4 * 4, 8 * 8, 16 * 16, 32 * 32])):
      m = models.build_model('vgg13', num_classes=10, rank=rank, width=0.125,
                             im2col_positions=positions)
      v = m.init(jax.random.key(0), x, train=False)
      eqns = jax.make_jaxpr(lambda v: m.apply(v, x, train=False))(v).eqns
      convs = [e for e in _walk(eqns) if e.primitive.name == 'conv_general_dilated']
      maps = {e.outvars[0].aval.shape[1] * e.outvars[0].aval.shape[2] for e in convs}
      assert sorted(maps) == want, (rank, positions)


def _walk(eqns):
  for e in eqns:
    yield e
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          yield from _walk(getattr(inner, 'eqns', []) or getattr(sub, 'eqns', []))


@pytest.mark.parametrize('split', ['spatial', 'channel'])
@pytest.mark.parametrize('strides,padding', [((1, 1), 'SAME'), ((2, 2), ((1, 1), (0, 1)))])
def test_rebuilt_kernel_execution_has_the_factored_output_and_gradients(split, strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
  kw = dict(features=8, kernel_size=(3, 3), rank=3, strides=strides, padding=padding,
            split=split)
  factored = layers.SVDConv(**kw)
  p = factored.init(jax.random.key(1), x)
  p = {'params': {**p['params'], 'bias': jnp.arange(8.0) / 8}}
  rebuilt = layers.SVDConv(**kw, execution='kernel')

  def run(layer):
    def loss(params):
      y = layer.apply({'params': params}, x)
      return jnp.sum(jnp.tanh(y)), y
    return jax.value_and_grad(loss, has_aux=True)(p['params'])
  (_, y_f), g_f = run(factored)
  (_, y_k), g_k = run(rebuilt)
  np.testing.assert_allclose(y_k, y_f, rtol=1e-5, atol=1e-5)
  for leaf in ('u', 's', 'v', 'bias'):
    np.testing.assert_allclose(g_k[leaf], g_f[leaf], rtol=1e-4, atol=1e-5)
  # one conv with the dense kernel's shape, not two thin ones
  convs = [e for e in jax.make_jaxpr(lambda x: rebuilt.apply(p, x))(x).eqns
           if e.primitive.name == 'conv_general_dilated']
  assert [e.invars[1].aval.shape for e in convs] == [(3, 3, 6, 8)]
  with pytest.raises(ValueError, match="conv execution must be one of"):
    layers.SVDConv(**kw, execution='fast').init(jax.random.key(1), x)


@pytest.mark.parametrize('cin,features,picked', [(6, 8, 'kernel'), (16, 16, 'kernel'),
                                                  (16, 32, 'factored'), (24, 8, 'factored')])
def test_auto_execution_runs_what_the_shape_rule_picks(cin, features, picked):
  assert layers.pick_conv_execution((3, 3, cin, features)) == picked
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, cin))
  kw = dict(features=features, kernel_size=(3, 3), rank=3)
  p = layers.SVDConv(**kw).init(jax.random.key(1), x)
  n_convs = {}
  for execution in ('auto', picked):
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, e=execution: jnp.sum(
        layers.SVDConv(**kw, execution=e).apply(p, x) ** 2)))(p)
    n_convs[execution] = sum(e.primitive.name == 'conv_general_dilated' for e in _walk(jaxpr.eqns))
  assert n_convs['auto'] == n_convs[picked]  # the same program as the execution it picked
  y = {e: layers.SVDConv(**kw, execution=e).apply(p, x) for e in ('auto', 'factored')}
  np.testing.assert_allclose(y['auto'], y['factored'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('hw,kernel,strides,padding', [
    ((9, 9), (3, 3), (1, 1), 'SAME'), ((10, 7), (3, 1), (2, 1), ((1, 1), (0, 0))),
    ((8, 8), (1, 1), (1, 1), 'VALID'), ((11, 11), (3, 3), (2, 2), ((1, 0), (0, 1)))])
def test_gemm_kernel_gradient_equals_xlas(hw, kernel, strides, padding):
  x = jax.random.normal(jax.random.key(0), (3, *hw, 5))
  k = jax.random.normal(jax.random.key(1), (*kernel, 5, 4))
  dn = ('NHWC', 'HWIO', 'NHWC')

  def run(conv):
    def loss(x, k):
      y = conv(x, k)
      return jnp.sum(jnp.sin(y)), y
    return jax.value_and_grad(loss, (0, 1), has_aux=True)(x, k)
  (_, want), g_want = run(lambda x, k: jax.lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=dn))
  gemm = lambda x, k: layers.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn,
                                                  max_positions=0, kernel_grad='gemm')
  (_, got), g_got = run(gemm)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # the backward has no conv writing a kernel-shaped gradient: that one is matmuls
  bwd = jax.make_jaxpr(jax.grad(lambda k: jnp.sum(gemm(x, k))))(k)
  kernel_convs = [e for e in _walk(bwd.eqns) if e.primitive.name == 'conv_general_dilated'
                  and e.outvars[0].aval.shape == k.shape]
  assert not kernel_convs


@pytest.mark.parametrize('hw,cin,cout,form', [
    ((6, 6), 3, 32, 'im2col_gemm'),  # a stem: few input channels, many output channels
    ((8, 8), 8, 4, 'xla'),      # narrow output on a small map
    ((9, 9), 8, 4, 'gemm'),     # the same on a map of more than SMALL_MAP positions
    ((6, 6), 8, 40, 'gemm')])
def test_auto_kernel_gradient_picks_a_form_per_shape_with_the_same_gradients(hw, cin, cout,
                                                                               form):
  assert layers.pick_conv_form((3, 3, cin, cout), hw[0] * hw[1]) == form
  x = jax.random.normal(jax.random.key(0), (2, *hw, cin))
  k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
  dn = ('NHWC', 'HWIO', 'NHWC')
  auto = lambda x, k: layers.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dn,
                                                  kernel_grad='auto')
  want = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dn)
  grads = [jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k))), (0, 1))(x, k)
           for f in (auto, want)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  fwd_convs = sum(e.primitive.name == 'conv_general_dilated'
                  for e in _walk(jax.make_jaxpr(auto)(x, k).eqns))
  bwd = jax.make_jaxpr(jax.grad(lambda k: jnp.sum(auto(x, k))))(k)
  kernel_convs = sum(e.primitive.name == 'conv_general_dilated'
                     and e.outvars[0].aval.shape == k.shape for e in _walk(bwd.eqns))
  assert (fwd_convs, kernel_convs) == {'im2col_gemm': (0, 0), 'gemm': (1, 0),
                                       'xla': (1, 1)}[form]
  with pytest.raises(ValueError, match='unknown kernel_grad'):
    layers.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dn, kernel_grad='fast')
  # im2col_positions=0 (never im2col) keeps a stem on the GEMM path
  never = jax.make_jaxpr(lambda x, k: layers.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=dn, max_positions=0, kernel_grad='auto'))(x, k)
  assert sum(e.primitive.name == 'conv_general_dilated' for e in _walk(never.eqns)) == 1
  want = ['conv_general_dilated'] if form == 'xla' else ['custom_vjp_call']  # the GEMM path
  assert [e.primitive.name for e in never.eqns] == want


def test_pick_conv_form_boundaries():
  pick = layers.pick_conv_form
  stem, narrow = layers.STEM_MAX_CHANNELS, layers.NARROW_CHANNELS
  assert pick((3, 3, stem, narrow), 1024) == 'im2col_gemm'
  assert pick((3, 3, stem + 1, narrow), 1024) == 'gemm'       # not a stem
  assert pick((3, 3, stem, narrow - 1), 1024) == 'gemm'       # a stem to few channels
  assert pick((3, 3, 64, narrow - 1), layers.SMALL_MAP) == 'xla'
  assert pick((3, 3, 64, narrow), layers.SMALL_MAP) == 'gemm'
  assert pick((3, 3, 64, narrow - 1), layers.SMALL_MAP + 1) == 'gemm'


def test_a_stem_keeps_its_input_not_its_columns_for_the_backward():
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 32))
  dn = ('NHWC', 'HWIO', 'NHWC')

  def temp_bytes(**kw):
    f = lambda x, k: jnp.sum(jnp.tanh(layers.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=dn, **kw)) ** 2)
    return jax.jit(jax.grad(f, 1)).lower(x, k).compile().memory_analysis().temp_size_in_bytes
  cols = 8 * 32 * 32 * 27 * 4
  stem, im2col = temp_bytes(kernel_grad='auto'), temp_bytes(max_positions=32 * 32)
  assert stem < im2col - cols // 2, (stem, im2col)


def test_models_take_the_kernel_gradient_option():
  from lrdfa_jax import models
  with pytest.raises(ValueError, match='unknown conv kernel gradient'):
    models.build_model('small_conv', num_classes=4, conv_kernel_grad='fast')
  x = jnp.ones((2, 8, 8, 3))
  grads = {}
  for how in ('xla', 'gemm'):
    m = models.build_model('small_conv', num_classes=4, rank=0.5, widths=(4, 8, 8), hidden=8,
                           conv_kernel_grad=how, overrides={'conv1': 'dense'},
                           im2col_positions=0)  # every conv on the path under test
    v = m.init(jax.random.key(0), x, train=False)
    grads[how] = jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x, train=False)[0] ** 2))(
        v['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads['gemm'], grads['xla'])


def test_a_local_step_on_the_gemm_path_runs_no_backward_conv_between_blocks():
  """On the GEMM kernel gradients (the CPU default for most convs), a DFA/SSA step's compiled HLO holds the
  forward's convolutions, plus, per factored conv, the one that carries the cotangent from
  its 1×1 ``U`` to its rank-r ``V`` conv inside the layer: kernel gradients are matmuls and no
  input gradient crosses a cut block. Backprop adds the input-gradient convs of the blocks
  after the first (two in SmallConv)."""
  from lrdfa_jax import dfa, feedback as fb, models
  x, y = jnp.ones((2, 8, 8, 3)), jnp.arange(2) % 4

  def convs(f, *args):
    return jax.jit(f).lower(*args).compile().as_text().count(' convolution(')
  for overrides, inner in ((None, 3), ({f'conv{i}': 'dense' for i in (1, 2, 3)}, 0)):
    m = models.build_model('small_conv', num_classes=4, rank=0.5, widths=(4, 8, 8), hidden=8,
                           conv_kernel_grad='gemm', im2col_positions=0, overrides=overrides)
    params = m.init(jax.random.key(0), x, train=False)['params']
    taps = jax.eval_shape(lambda p: m.apply({'params': p}, x, train=False)[1], params)
    feedback = fb.init_feedback(jax.random.key(1), dfa.tap_widths(taps, 'full'), 4)
    forward = convs(lambda p: m.apply({'params': p}, x, train=False)[0], params)
    local = convs(lambda p: dfa.local_grads(
        lambda q: (m.apply({'params': q}, x, train=False, local=True), None), p, feedback,
        y)[0], params)
    bp = convs(lambda p: dfa.bp_grads(
        lambda q: (m.apply({'params': q}, x, train=False), None), p, y)[0], params)
    assert forward == 3 * (1 + (inner > 0)) and local == forward + inner and bp == local + 2, (
        overrides, forward, local, bp)
