"""lrdfa_jax.rank: energy ranks, slicing factors, optimizer moments and feedback."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrdfa_jax import feedback as fb
from lrdfa_jax import layers, rank


class Net(nn.Module):
  ranks: tuple = (6, 5)

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(layers.SVDDense(8, rank=self.ranks[0], name='fc1')(x))
    return layers.SVDDense(6, rank=self.ranks[1], name='head')(x)


def _params(ranks=(6, 5)):
  return Net(ranks).init(jax.random.key(0), jnp.zeros((1, 10)))['params']


def test_energy_rank_floor_and_cap():
  s = np.array([3.0, -4.0, 0.0, 0.0])  # energies 9, 16: 16 + 9 = 25
  assert rank.energy_rank(s, 0.95) == 2 and rank.energy_rank(s, 0.6) == 1
  assert rank.energy_rank(s, 1.0) == 2  # exact zeros are never needed
  assert rank.energy_rank(s, 0.6, floor=3) == 3
  assert rank.energy_rank(s, 0.6, floor=0.5, full=8) == 4  # half of full rank 8, capped at 4
  assert rank.energy_rank(s, 0.6, floor=9) == 4  # never above the current rank
  with pytest.raises(ValueError, match='energy'):
    rank.energy_rank(s, 1.5)
  with pytest.raises(ValueError, match='floor'):
    rank.energy_rank(s, 0.9, floor=0)


def test_truncating_zero_singular_values_keeps_the_function():
  params = _params()
  s = np.asarray(params['fc1']['s']).copy()
  s[[1, 4]] = 0.0  # zeros in the middle: the kept directions must be re-ordered
  params = {**params, 'fc1': {**params['fc1'], 's': jnp.asarray(s)}}
  ranks = rank.choose_ranks(params, energy=1.0)
  assert ranks == {('fc1',): 4}
  new, _, _, _ = rank.reduce(params, (), ranks)
  assert new['fc1']['s'].shape == (4,) and new['fc1']['u'].shape == (8, 4)
  jax.tree.map(np.testing.assert_array_equal, new['head'], params['head'])  # not reduced
  np.testing.assert_array_equal(np.abs(new['fc1']['s']), np.sort(np.abs(s))[::-1][:4])
  x = jax.random.normal(jax.random.key(1), (3, 10))
  np.testing.assert_allclose(Net((4, 5)).apply({'params': new}, x),
                             Net((6, 5)).apply({'params': params}, x), rtol=1e-5, atol=1e-6)


def test_sliced_optimizer_state_equals_a_small_model_fed_the_same_gradients():
  """Adam (chained with a masked weight decay, for a nested state) run on the rank-6 model,
  then sliced, equals the same optimizer run on the rank-4 model fed the sliced gradients."""
  big = _params()
  keep = rank.keep_indices(big['fc1']['s'], 4)
  mask = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)  # noqa: E731
  tx = optax.chain(optax.masked(optax.add_decayed_weights(1e-2), mask), optax.adam(1e-2))
  small, _, _, _ = rank.reduce(big, (), {('fc1',): 4})
  sb, ss = tx.init(big), tx.init(small)
  for t in range(5):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape), big)
    g_small = rank.slice_like(g, big, {('fc1',): keep})
    ub, sb = tx.update(g, sb, big)
    us, ss = tx.update(g_small, ss, small)
    big, small = optax.apply_updates(big, ub), optax.apply_updates(small, us)
  params, state, _, _ = rank.reduce(big, sb, {('fc1',): 4})
  assert jax.tree.structure(state) == jax.tree.structure(ss)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state, ss)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, small)
  adam = state[1][0]
  assert adam.mu['fc1']['u'].shape == (8, 4) and adam.nu['fc1']['v'].shape == (10, 4)
  assert int(adam.count) == 5  # scalars are left as they are


def test_feedback_k_is_capped_at_the_new_rank():
  params = _params()
  feedback = fb.init_feedback(jax.random.key(0), {'fc1': 8, 'head': 6}, 6, ranks=6)
  adam = optax.adam(1e-3)
  f_state = adam.init(feedback)
  new, _, new_fb, new_f_state = rank.reduce(params, (), {('fc1',): 3}, feedback=feedback,
                                            feedback_opt_state=f_state)
  assert new_fb.block('fc1')['p'].shape == (8, 3) and new_fb.block('head')['p'].shape == (6, 5)
  np.testing.assert_array_equal(new_fb.block('fc1')['q'], feedback.block('fc1')['q'][:, :3])
  fresh = fb.init_feedback(jax.random.key(1), {'fc1': 8, 'head': 6}, 6,
                           ranks={'fc1': 3, 'head': 5})
  # a fresh model at the new ranks has the same structure: a checkpoint restores into it
  assert jax.tree.structure(new_fb) == jax.tree.structure(fresh)
  assert jax.tree.structure(new_f_state) == jax.tree.structure(adam.init(fresh))
  assert new_f_state[0].mu.block('fc1')['p'].shape == (8, 3)


def test_rank_overrides_rebuild_the_reduced_model_and_bad_ranks_fail():
  params = _params()
  new, _, _, _ = rank.reduce(params, (), {('fc1',): 2, ('head',): 1})
  assert rank.rank_overrides(new) == 'fc1:2,head:1'
  with pytest.raises(ValueError, match=r'new rank 7 must lie in \[1, 6\]'):
    rank.reduce(params, (), {('fc1',): 7})
  with pytest.raises(KeyError, match='no factored layer fc9'):
    rank.reduce(params, (), {('fc9',): 2})


def test_a_top_level_layer_does_not_match_a_nested_one_of_the_same_name():
  layer = lambda k: {n: jax.random.normal(jax.random.key(k), sh)  # noqa: E731
                     for n, sh in (('u', (6, 4)), ('s', (4,)), ('v', (6, 4)), ('bias', (6,)))}
  params = {'conv1': layer(0), 'stage1_block0': {'conv1': layer(1)}}
  state = optax.adam(1e-3).init(params)
  new, new_state, _, _ = rank.reduce(params, state, {('conv1',): 2})
  assert new['conv1']['u'].shape == (6, 2)
  jax.tree.map(np.testing.assert_array_equal, new['stage1_block0'], params['stage1_block0'])
  assert new_state[0].mu['stage1_block0']['conv1']['u'].shape == (6, 4)
  assert new_state[0].mu['conv1']['s'].shape == (2,)


def test_energy_table_gives_each_thresholds_ranks_and_parameter_count():
  from experiments import rank_energy
  params = jax.device_get(_params())
  params['fc1']['s'] = jnp.array([4.0, 3.0, 0.1, 0.1, 0.1, 0.1])  # 25 of 25.04 in the top 2
  rows = rank_energy.energy_table(params, [0.99, 0.5])
  assert rows[0]['energy'] is None and rows[0]['ranks'] == {'fc1': 6, 'head': 5}
  assert rows[1]['ranks']['fc1'] == 2 and rows[2]['ranks']['fc1'] == 1
  per_rank = 10 + 8 + 1  # fc1: a u row of 8, a v row of 10 and one s per rank
  assert rows[0]['params'] - rows[1]['params'] >= 4 * per_rank  # head may be cut too
  cut = rank.reduce(params, None, rank.choose_ranks(params, 0.5))[0]
  assert rows[2]['params'] == sum(x.size for x in jax.tree.leaves(cut))
  assert '| 0.5 | 1 |' in rank_energy.markdown(rows)
