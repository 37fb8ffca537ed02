"""Structured and dense feedback: construction, projection, stacking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrdfa_jax import feedback as fb

WIDTHS = {'a': 16, 'b': 16, 'c': 8, 'd': 32}


def test_structured_is_orthonormal_and_stacked():
  f = fb.init_feedback(jax.random.key(0), WIDTHS, 10, ranks={'a': 4, 'b': 4, 'c': 20, 'd': 3})
  # equal (width, rank) blocks share one stack
  assert len(f.groups) == 3
  assert f.groups['structured_d16_k4']['p'].shape == (2, 16, 4)
  for name in WIDTHS:
    b = f.block(name)
    k = b['p'].shape[1]
    assert k <= min(WIDTHS[name], 10)
    np.testing.assert_allclose(b['p'].T @ b['p'], np.eye(k), atol=1e-5)
    np.testing.assert_allclose(b['q'].T @ b['q'], np.eye(k), atol=1e-5)
  assert f.block('c')['p'].shape == (8, 8)  # rank clipped to min(d, C)


@pytest.mark.parametrize('kind', ['structured', 'dense'])
def test_projection_equals_dense_product(kind):
  f = fb.init_feedback(jax.random.key(1), WIDTHS, 10, kind=kind, ranks=5, scale=2.0)
  err = jax.random.normal(jax.random.key(2), (3, 10))
  g = jax.jit(fb.project)(f, err)
  assert set(g) == set(WIDTHS)
  for name, d in WIDTHS.items():
    F = fb.dense_matrix(f, name)
    assert F.shape == (d, 10)
    np.testing.assert_allclose(g[name], err @ F.T, rtol=1e-5, atol=1e-5)
  if kind == 'structured':
    s = np.linalg.svd(np.asarray(fb.dense_matrix(f, 'a')), compute_uv=False)
    np.testing.assert_allclose(s[:5], 2.0, rtol=1e-5)
    assert np.all(s[5:] < 1e-5)


def test_structured_projection_never_forms_dense_matrix():
  f = fb.init_feedback(jax.random.key(1), {'x': 4096}, 10, ranks=2)
  jaxpr = jax.make_jaxpr(fb.project)(f, jnp.ones((8, 10)))
  shapes = [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars]
  assert all(4096 * 10 > np.prod(s) or s[-2:] == (8, 4096) for s in shapes if len(s) >= 2)
  assert not any(set(s[-2:]) == {4096, 10} for s in shapes if len(s) >= 2)


def test_structured_projection_is_one_vmap_per_group():
  f = fb.init_feedback(jax.random.key(1), {f'b{i}': 16 for i in range(5)}, 10, ranks=4)
  jaxpr = jax.make_jaxpr(fb.project)(f, jnp.ones((8, 10)))
  dots = [e for e in jaxpr.eqns if e.primitive.name == 'dot_general']
  assert len(dots) == 2  # e·Q and (·σ)·Pᵀ, batched over the 5 blocks


def test_errors():
  with pytest.raises(ValueError, match='feedback kind'):
    fb.init_feedback(jax.random.key(0), WIDTHS, 10, kind='sparse')
  f = fb.init_feedback(jax.random.key(0), WIDTHS, 10)
  with pytest.raises(KeyError, match='no feedback'):
    f.block('zzz')
