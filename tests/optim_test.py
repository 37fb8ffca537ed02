"""The orthogonality transform, the retraction and the chain builder."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrdfa_jax import losses, optim


def _params(key=0):
  k = jax.random.split(jax.random.key(key), 4)
  return {'l1': {'u': jax.random.normal(k[0], (6, 3)), 's': jnp.ones(3),
                 'v': jax.random.normal(k[1], (5, 3)), 'bias': jnp.zeros(6)},
          'dense': {'kernel': jax.random.normal(k[2], (5, 4)), 'bias': jnp.zeros(4)}}


def test_orthogonality_in_chain_equals_penalty_by_hand():
  params = _params()
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
  w = 0.3
  tx = optax.chain(optim.add_orthogonality_penalty(w), optax.adam(1e-2))
  got, _ = tx.update(grads, tx.init(params), params)

  def penalty(p):
    return w * losses.orthogonality(p['l1']['u'], p['l1']['v'])
  by_hand = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params))
  ref = optax.adam(1e-2)
  want, _ = ref.update(by_hand, ref.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
  # only u and v are touched
  assert not np.allclose(by_hand['l1']['u'], grads['l1']['u'])
  np.testing.assert_array_equal(by_hand['dense']['kernel'], grads['dense']['kernel'])


def test_orthogonality_needs_params():
  tx = optim.add_orthogonality_penalty(1.0)
  with pytest.raises(ValueError, match='needs params'):
    tx.update(_params(), tx.init(_params()))


def test_retraction_orthonormalises_and_keeps_product():
  params = _params()
  tx = optax.chain(optax.sgd(1e-2), optim.retract_every(2))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  upd, state = step(grads, state, params)          # step 1: no retraction
  p1 = optax.apply_updates(params, upd)
  assert losses.orthogonality_one(p1['l1']['u']) > 1e-2
  upd, state = step(grads, state, p1)              # step 2: retraction
  p2 = optax.apply_updates(p1, upd)
  plain = optax.apply_updates(p1, jax.tree.map(lambda g: -1e-2 * g, grads))
  for f in ('u', 'v'):
    np.testing.assert_allclose(p2['l1'][f].T @ p2['l1'][f], np.eye(3), atol=1e-5)
  w = lambda l: (l['u'] * l['s']) @ l['v'].T  # noqa: E731
  np.testing.assert_allclose(w(p2['l1']), w(plain['l1']), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(p2['dense']['kernel'], plain['dense']['kernel'], rtol=1e-6)


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_build_optimizer_runs(name):
  params = _params()
  tx = optim.build_optimizer(learning_rate=optim.make_schedule(1e-2, 10, warmup_steps=2),
                             optimizer=name, orth_weight=0.1, retract=3, clip_norm=1.0,
                             weight_decay=1e-4)
  state = tx.init(params)
  for _ in range(4):
    upd, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, upd)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  with pytest.raises(ValueError, match='optimizer must be'):
    optim.build_optimizer(learning_rate=1.0, optimizer='lion')


def test_factor_lr_scale_scales_only_the_factor_steps():
  params = _params()
  params['bn'] = {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
  kw = dict(learning_rate=1e-2, orth_weight=0.1)
  plain, scaled = optim.build_optimizer(**kw), optim.build_optimizer(**kw, factor_lr_scale=0.25)
  want, _ = plain.update(grads, plain.init(params), params)
  got, _ = scaled.update(grads, scaled.init(params), params)
  for leaf in ('u', 's', 'v'):
    np.testing.assert_allclose(got['l1'][leaf], 0.25 * want['l1'][leaf], rtol=1e-6)
  for a, b in ((got['l1']['bias'], want['l1']['bias']), (got['bn'], want['bn']),
               (got['dense'], want['dense'])):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert np.abs(want['l1']['u']).max() > 0
  with pytest.raises(ValueError, match='factor_lr_scale must be > 0'):
    optim.build_optimizer(learning_rate=1.0, factor_lr_scale=0.0)


def test_schedules():
  s = optim.make_schedule(1.0, 100, kind='cosine', warmup_steps=10)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6 and float(s(100)) < 1e-6
  c = optim.make_schedule(0.5, 100, kind='constant')
  assert float(c(77)) == 0.5


def test_hoyer_penalty_adds_its_gradient_to_s_only_before_clipping():
  params = _params()
  params['nested'] = {'block': {'u': jnp.eye(4, 2), 's': jnp.array([3.0, 0.5]),
                                'v': jnp.eye(3, 2), 'bias': jnp.zeros(4)}}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
  w = 0.7
  got, _ = optim.add_hoyer_penalty(w).update(grads, optax.EmptyState(), params)

  def penalty(p):
    return w * (losses.hoyer(p['l1']['s']) + losses.hoyer(p['nested']['block']['s']))
  want = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  assert not np.allclose(got['nested']['block']['s'], grads['nested']['block']['s'])
  # first in the chain: the penalty is clipped with the loss gradient
  tx = optim.build_optimizer(learning_rate=1.0, optimizer='sgd', momentum=0.0, hoyer_weight=w,
                             clip_norm=1e-3)
  steps, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.global_norm(steps), 1e-3, rtol=1e-5)
  flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])  # noqa: E731
  np.testing.assert_allclose(flat(steps) / 1e-3, -flat(want) / optax.global_norm(want), rtol=1e-5)
