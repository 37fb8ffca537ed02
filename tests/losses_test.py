"""Each loss against a NumPy reference."""
import jax
import numpy as np

from lrdfa_jax import losses

RNG = np.random.default_rng(0)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_and_error():
  z = RNG.normal(size=(6, 5)).astype(np.float32)
  y = RNG.integers(0, 5, 6)
  ce = -np.mean(_log_softmax(z)[np.arange(6), y])
  np.testing.assert_allclose(losses.cross_entropy(z, y), ce, rtol=1e-5)
  e = np.exp(_log_softmax(z)) - np.eye(5)[y]
  np.testing.assert_allclose(losses.output_error(z, y), e, atol=1e-6)
  # e is B times the CE gradient in the logits
  np.testing.assert_allclose(jax.grad(losses.cross_entropy)(z, y) * 6, e, atol=1e-6)


def test_alignment_subspace():
  u = RNG.normal(size=(12, 4)); s = RNG.uniform(0.5, 2, 4)
  p, _ = np.linalg.qr(RNG.normal(size=(12, 3)))
  a = u * s
  want = np.sum((a - p @ p.T @ a)**2) / np.sum(a**2)
  np.testing.assert_allclose(losses.alignment_subspace(u, s, p), want, rtol=1e-5)
  # columns inside span(P) give zero
  np.testing.assert_allclose(losses.alignment_subspace(p[:, :2], s[:2], p), 0.0, atol=1e-6)
  # spatial-split factors [kw·d, r] fold into [d, kw·r]
  u3 = RNG.normal(size=(3 * 12, 4))
  a3 = (u3 * s).reshape(3, 12, 4).transpose(1, 0, 2).reshape(12, 12)
  want3 = np.sum((a3 - p @ p.T @ a3)**2) / np.sum(a3**2)
  np.testing.assert_allclose(losses.alignment_subspace(u3, s, p), want3, rtol=1e-5)


def test_alignment_output():
  h = RNG.normal(size=(4, 7)); g = RNG.normal(size=(4, 7)); eps = 1e-6
  cos = np.sum(h * -g, 1) / (np.sqrt(np.sum(h * h, 1) + eps) * np.sqrt(np.sum(g * g, 1) + eps))
  np.testing.assert_allclose(losses.alignment_output(h, g, eps), np.mean(1 - cos), rtol=1e-5)
  np.testing.assert_allclose(losses.alignment_output(-g, g), 0.0, atol=1e-5)
  # finite gradient at h = 0 thanks to the epsilon
  assert np.all(np.isfinite(jax.grad(losses.alignment_output)(np.zeros((2, 3)), g[:2, :3])))


def test_orthogonality_and_hoyer():
  u = RNG.normal(size=(9, 3)); v = RNG.normal(size=(5, 3))
  want = (np.sum((u.T @ u - np.eye(3))**2) + np.sum((v.T @ v - np.eye(3))**2)) / 9
  np.testing.assert_allclose(losses.orthogonality(u, v), want, rtol=1e-5)
  q, _ = np.linalg.qr(u)
  np.testing.assert_allclose(losses.orthogonality(q, q), 0.0, atol=1e-10)
  s = np.array([3.0, -1.0, 0.5])
  np.testing.assert_allclose(losses.hoyer(s), 4.5 / np.sqrt(10.25), rtol=1e-6)
