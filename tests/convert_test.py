"""lrdfa_jax.convert on models defined here (not from the zoo)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrdfa_jax import convert as cv
from lrdfa_jax import dfa, feedback, layers
from lrdfa_jax.models.common import block_input


class UserNet(nn.Module):
  """A user's CNN: conv → BN → relu → pool, strided conv → relu, flatten, dense → relu, dense."""
  classes: int = 5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = nn.relu(nn.Conv(12, (3, 3), strides=2, padding=1)(x))
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.classes)(x)


class HandBuilt(nn.Module):
  """UserNet written by hand in the zoo's contract (docs/blocks.md), same layer names."""
  rank: object = 'full'

  @nn.compact
  def __call__(self, x, train: bool = False, local: bool = False):
    taps = {}
    x = layers.SVDConv(8, (3, 3), rank=self.rank, split='channel', name='Conv_0')(
        block_input(x, local))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='BatchNorm_0')(x)
    x = taps['Conv_0'] = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = layers.SVDConv(12, (3, 3), rank=self.rank, strides=(2, 2), padding=[(1, 1), (1, 1)],
                       split='channel', name='Conv_1')(block_input(x, local))
    x = taps['Conv_1'] = nn.relu(x).reshape(x.shape[0], -1)
    x = layers.SVDDense(16, rank=self.rank, name='Dense_0')(block_input(x, local))
    x = taps['Dense_0'] = nn.relu(x)
    return layers.SVDDense(5, rank=self.rank, name='Dense_1')(block_input(x, local)), taps


class Res(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16)(nn.relu(nn.Dense(16)(x)))
    return nn.relu(x + h)


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    x = Res()(x)
    x = Res()(x)
    return nn.Dense(5)(x)


X = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
Y = jnp.arange(6) % 5
KEY = jax.random.key(0)


def _close(a, b, tol):
  return all(np.allclose(p, q, atol=tol, rtol=tol) for p, q in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_full_rank_conversion_computes_the_original_and_round_trips_trained_params():
  dense_vars = UserNet().init(KEY, X)
  model = cv.convert(UserNet(), rank='full')
  variables = model.init(KEY, X)
  want = UserNet().apply(dense_vars, X)
  logits, taps = model.apply(variables, X)
  # the factors come from the same kernel_init draw: the same function at init ...
  np.testing.assert_allclose(logits, want, atol=1e-5)
  assert list(taps) == ['Conv_0', 'Conv_1', 'Dense_0'] and taps['Conv_0'].shape == (6, 4, 4, 8)
  # ... and after training: a dense tree factored at full rank and rebuilt is unchanged
  trained = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(KEY, p.shape), dense_vars['params'])
  factors = cv.factorize(model, trained, X)
  assert 'u' in factors['Conv_0'] and 'kernel' not in factors['Conv_0']
  np.testing.assert_allclose(model.apply({**variables, 'params': factors}, X)[0],
                             UserNet().apply({**dense_vars, 'params': trained}, X), atol=1e-4)
  assert _close(cv.densify(model, factors, X), trained, 1e-5)


def test_rank_and_overrides_pick_each_layers_factors():
  model = cv.convert(UserNet(), rank=0.5, overrides='Dense_1:dense,Conv_0:2')
  params = model.init(KEY, X)['params']
  assert params['Conv_0']['s'].shape == (2,)
  assert params['Conv_1']['s'].shape == (6,)       # channel split: min(3·3·8, 12) / 2
  assert params['Dense_0']['v'].shape == (48, 8)   # min(48, 16) / 2
  assert set(params['Dense_1']) == {'kernel', 'bias'}
  dense = cv.convert(UserNet(), rank=None).init(KEY, X)['params']  # plain DFA: all dense
  assert all('kernel' in dense[n] for n in ('Conv_0', 'Conv_1', 'Dense_0', 'Dense_1'))
  # a truncated rank factors the trained kernel by truncated SVD: the best rank-r kernel
  trained = UserNet().init(KEY, X)['params']
  factors = cv.factorize(model, trained, X)
  kernel = trained['Dense_0']['kernel']
  s = np.linalg.svd(kernel, compute_uv=False)
  err = np.linalg.norm(cv.densify(model, factors, X)['Dense_0']['kernel'] - kernel)
  np.testing.assert_allclose(err, np.sqrt((s[8:] ** 2).sum()), rtol=1e-4)


@pytest.mark.parametrize('rank', ['full', 0.5])
def test_local_update_equals_the_hand_built_model(rank):
  model, hand = cv.convert(UserNet(), rank=rank), HandBuilt(rank=rank)
  variables = model.init(KEY, X)
  assert _close(variables, hand.init(KEY, X), 0)  # same names, same draws
  taps = jax.eval_shape(lambda: model.apply(variables, X)[1])
  fb = feedback.init_feedback(KEY, dfa.tap_widths(taps, 'full'), 5, kind='structured', ranks=5)

  def update(m):
    def forward(p):
      return m.apply({**variables, 'params': p}, X, train=True, local=True,
                     mutable=['batch_stats'])
    return dfa.local_grads(forward, variables['params'], fb, Y, align='output', align_weight=0.1)

  (got, got_aux), (want, want_aux) = update(model), update(hand)
  assert _close(got, want, 1e-6)
  assert _close(got_aux['extra'], want_aux['extra'], 1e-6)  # BN running statistics
  assert not _close(got_aux['extra']['batch_stats'], variables['batch_stats'], 1e-6)
  assert float(jnp.abs(got['BatchNorm_0']['scale']).sum()) > 0  # BN learns in its conv's block


def test_each_block_learns_from_its_own_signal_only():
  model = cv.convert(UserNet(), rank=0.5)
  variables = model.init(KEY, X)
  taps = jax.eval_shape(lambda: model.apply(variables, X)[1])
  widths = dfa.tap_widths(taps, 'full')

  def update(seed):
    fb = feedback.init_feedback(jax.random.key(seed), widths, 5, kind='structured', ranks=5)
    return fb, dfa.local_grads(lambda p: (model.apply({**variables, 'params': p}, X, local=True),
                                          None), variables['params'], fb, Y)[0]

  fb0, base = update(0)
  fb1, _ = update(1)
  swapped = feedback.from_blocks({n: (fb1 if n == 'Conv_1' else fb0).block(n) for n in fb0.names})
  got = dfa.local_grads(lambda p: (model.apply({**variables, 'params': p}, X, local=True), None),
                        variables['params'], swapped, Y)[0]
  for name in base:
    same = _close(got[name], base[name], 0)
    assert same == (name != 'Conv_1'), name
  with pytest.raises(ValueError, match='cuts every block or none'):  # no dfa.modules here
    model.apply(variables, X, local=frozenset({'Conv_1'}))


def test_a_residual_add_across_blocks_is_refused_and_a_declared_block_trains():
  with pytest.raises(ValueError, match=r"both reach parameter .*blocks=\['Res_\*'\]"):
    cv.convert(ResNet()).init(KEY, X)
  model = cv.convert(ResNet(), blocks=['Res_*'])
  variables = model.init(KEY, X)
  logits, taps = model.apply(variables, X)
  assert list(taps) == ['Dense_0', 'Res_0', 'Res_1'] and logits.shape == (6, 5)
  reached = cv.reached(model, variables, X)
  assert reached['Res_0'] == {f'Res_0/Dense_{i}/{k}' for i in (0, 1) for k in ('u', 's', 'v', 'bias')}
  assert reached['<logits>'] == {f'Dense_1/{k}' for k in ('u', 's', 'v', 'bias')}


class Branches(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(5)(nn.relu(nn.Dense(8)(x)) + nn.relu(nn.Dense(8)(x)))


class Twice(nn.Module):
  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(192)
    return nn.Dense(5)(layer(layer(x.reshape(x.shape[0], -1))))


class Circular(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(nn.Conv(4, (3, 3), padding='CIRCULAR')(x).mean((1, 2)))


def test_models_that_are_not_a_chain_of_blocks_fail_with_one_line_errors():
  with pytest.raises(ValueError, match='is not a chain of blocks'):
    cv.convert(Branches()).init(KEY, X)
  with pytest.raises(ValueError, match='is called twice'):
    cv.convert(Twice()).init(KEY, X)
  with pytest.raises(ValueError, match=r"keep it dense with overrides=\{'Conv_0': 'dense'\}"):
    cv.convert(Circular()).init(KEY, X)
  assert cv.convert(Circular(), overrides={'Conv_0': 'dense'}).init(KEY, X)
  with pytest.raises(TypeError, match='Flax Linen module'):
    cv.convert(UserNet)


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(6, (3, 3), padding='SAME', bias_init=nn.initializers.normal(1.0))(x))


class WithFields(nn.Module):
  """Submodules passed as fields and built in setup, an nn.Sequential head, non-zero biases."""
  enc: nn.Module
  head: nn.Module

  def __call__(self, x):
    return self.head(self.enc(x).mean((1, 2)))


def _with_fields():
  return WithFields(enc=Encoder(), head=nn.Sequential([
      nn.Dense(16, bias_init=nn.initializers.normal(1.0)), nn.relu, nn.Dense(5)]))


@pytest.mark.parametrize('split', ['channel', 'spatial'])
def test_field_and_sequential_submodules_keep_their_paths_and_function(split):
  want_vars = _with_fields().init(KEY, X)
  model = cv.convert(_with_fields(), rank='full', split=split, overrides={'head/layers_2': 'dense'})
  variables = model.init(KEY, X)
  assert set(variables['params']) == {'enc', 'head'}
  assert 'u' in variables['params']['enc']['Conv_0'] and 'kernel' in variables['params']['head']['layers_2']
  logits, taps = model.apply(variables, X)
  assert list(taps) == ['enc/Conv_0', 'head/layers_0']
  # (submodules passed as fields draw from another rng stream under the wrapper, so compare
  # through factorize: the original's params, factored at full rank, give its function)
  factors = cv.factorize(model, want_vars['params'], X)
  np.testing.assert_allclose(model.apply({'params': factors}, X)[0],
                             _with_fields().apply(want_vars, X), atol=1e-4)
  assert _close(cv.densify(model, factors, X), want_vars['params'], 1e-5)


def test_a_non_zero_bias_init_draws_the_originals_bias():
  want = UserNetBias().init(KEY, X)
  got = cv.convert(UserNetBias(), rank='full').init(KEY, X)
  np.testing.assert_allclose(got['params']['Conv_0']['bias'], want['params']['Conv_0']['bias'])
  np.testing.assert_allclose(cv.convert(UserNetBias(), rank='full').apply(got, X)[0],
                             UserNetBias().apply(want, X), atol=1e-4)


class UserNetBias(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), bias_init=nn.initializers.normal(1.0))(x))
    return nn.Dense(5, bias_init=nn.initializers.normal(1.0))(x.mean((1, 2)))


class Scaled(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, param_dtype=jnp.bfloat16)(x.reshape(x.shape[0], -1))
    return nn.Dense(5)(x * self.param('s', nn.initializers.ones, (8,)))


class CustomBlock(nn.Module):
  @nn.compact
  def forward(self, x):
    return nn.relu(nn.Dense(8)(x) + x[..., :8])


class CallsAMethod(nn.Module):
  def setup(self):
    self.stem, self.block, self.head = nn.Dense(8), CustomBlock(), nn.Dense(5)

  def __call__(self, x):
    return self.head(self.block.forward(nn.relu(self.stem(x.reshape(x.shape[0], -1)))))


class NormFirst(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
    return nn.Dense(5)(nn.relu(nn.Dense(8)(x)))


def test_dtypes_custom_params_methods_and_untrained_params():
  model = cv.convert(Scaled(), rank='full')
  params = model.init(KEY, X)['params']
  assert params['Dense_0']['u'].dtype == jnp.bfloat16 and params['Dense_1']['u'].dtype == jnp.float32
  # a user param named like a factor is copied, not factored
  dense = Scaled().init(KEY, X)['params']
  assert np.array_equal(cv.factorize(model, dense, X)['s'], dense['s'])
  # a declared block called through another method is cut and tapped as one block
  m = cv.convert(CallsAMethod(), blocks=['block'])
  assert list(m.apply(m.init(KEY, X), X)[1]) == ['stem', 'block']
  with pytest.raises(ValueError, match='both reach parameter'):
    cv.convert(CallsAMethod()).init(KEY, X)
  with pytest.raises(ValueError, match=r"no block's signal reaches LayerNorm_0/bias .* never train"):
    cv.convert(NormFirst()).init(KEY, X)
  with pytest.raises(ValueError, match='not a 2-D conv'):  # flax reads kernel_size=3 as (3,)
    cv.convert(IntKernel()).init(KEY, X)


class IntKernel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(nn.Conv(4, 3)(x).mean((1, 2)))
