"""Local error signals and the similarity term against hand-written references on tiny nets."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrdfa_jax import dfa, feedback as fb, layers, losses, models, signals

B, C = 6, 3


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _ref_cotangent(h, f, y, e_global, mix, temperature):
  """By hand, for a dense tap: x̂ = h/|h|, z = x̂F/T, the error through Fᵀ, then the
  normalisation's Jacobian (I − x̂x̂ᵀ)/|h|, all over B."""
  h, f = np.asarray(h, np.float64), np.asarray(f, np.float64)
  n = np.linalg.norm(h, axis=1, keepdims=True)
  xh = h / n
  e_local = _softmax(xh @ f / temperature) - np.eye(f.shape[1])[y]
  e = (1 - mix) * e_local + mix * np.asarray(e_global, np.float64)
  g = e @ f.T / (temperature * h.shape[0])
  return (g - xh * np.sum(xh * g, 1, keepdims=True)) / n


def test_readout_grid_matches_lls_smallconv():
  # SmallConv taps after conv1/2/3 pools: LLS pools them to 4x4, 2x2, 2x2 (dim_in 512)
  assert signals.readout_grid((1, 16, 16, 32), 512) == 4
  assert signals.readout_grid((1, 8, 8, 64), 512) == 2
  assert signals.readout_grid((1, 4, 4, 128), 512) == 2
  assert signals.readout_grid((1, 2, 2, 256), 512) == 1  # never 0, even when one pixel is over
  shapes = {'c': jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32),
            'd': jax.ShapeDtypeStruct((1, 40), jnp.float32)}
  assert signals.readout_widths(shapes, 512) == {'c': 512, 'd': 40}


def test_features_pool_flatten_normalise():
  h = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  x = np.asarray(signals.features(h, 2 * 2 * 3, norm=False))
  ref = np.asarray(h).reshape(2, 2, 4, 2, 4, 3).mean((2, 4)).reshape(2, -1)
  np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-7)
  xn = np.asarray(signals.features(h, 12))
  np.testing.assert_allclose(xn, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-5)
  with pytest.raises(ValueError, match='fits no pool grid'):
    signals.features(h, 5 * 3)


@pytest.mark.parametrize('basis', signals.BASES)
@pytest.mark.parametrize('mix', [0.0, 0.3])
def test_readout_cotangent_equals_hand_rule(basis, mix):
  k = jax.random.split(jax.random.key(1), 3)
  h = jax.random.normal(k[0], (B, 7))
  y = jax.random.randint(k[1], (B,), 0, C)
  e_glob = jax.nn.softmax(jax.random.normal(k[2], (B, C))) - jax.nn.one_hot(y, C)
  ro = signals.init_readout(jax.random.key(2), {'a': 7}, C, basis=basis)
  block = ro.block('a')
  cot, ce = signals.readout_cotangent(h, block, y, e_glob, mix=mix, temperature=0.5)
  f = fb.dense_matrix(ro, 'a')
  np.testing.assert_allclose(cot, _ref_cotangent(h, f, y, e_glob, mix, 0.5), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(ce, signals.local_loss(h, block, y), rtol=1e-6)
  if mix == 0:  # the local signal is the gradient of the block's own readout CE
    np.testing.assert_allclose(cot, jax.grad(signals.local_loss)(h, block, y), rtol=1e-4,
                               atol=1e-7)


def test_readout_bases():
  ro = signals.init_readout(jax.random.key(0), {'a': 64, 'b': 64, 'c': 32}, 10)
  assert len(ro.groups) == 2  # stacked by shape, like the feedback
  np.testing.assert_allclose(fb.dense_matrix(ro, 'a'), signals.sinusoidal_basis(64, 10).T,
                             atol=1e-4)
  rnd = signals.init_readout(jax.random.key(0), {'a': 64}, 10, basis='random')
  f = np.asarray(fb.dense_matrix(rnd, 'a'))
  # orthogonal columns with the norm of a sinusoid row, sqrt(d/2)
  np.testing.assert_allclose(f.T @ f, 32.0 * np.eye(10), atol=1e-3)
  np.testing.assert_allclose(np.linalg.norm(signals.sinusoidal_basis(64, 10), axis=1),
                             np.sqrt(32.0), rtol=0.15)
  with pytest.raises(ValueError, match='basis'):
    signals.init_readout(jax.random.key(0), {'a': 4}, 3, basis='cosine')


def _ref_similarity(x):
  x = np.asarray(x, np.float64)
  if x.ndim == 4:
    x = x.reshape(x.shape[0], -1, x.shape[-1]).std(1, ddof=1)
  xc = x - x.mean(1, keepdims=True)
  xn = xc / (1e-8 + np.linalg.norm(xc, axis=1, keepdims=True))
  return np.clip(xn @ xn.T, -1, 1)


def test_similarity_matrix_and_loss():
  h = jax.random.normal(jax.random.key(3), (5, 4, 4, 6))
  np.testing.assert_allclose(signals.similarity_matrix(h), _ref_similarity(h), atol=1e-5)
  y = jnp.array([0, 1, 0, 2, 1])
  target = _ref_similarity(np.eye(3)[np.asarray(y)])
  assert target[0, 2] == pytest.approx(1.0) and target[0, 1] == pytest.approx(-0.5)
  want = np.mean((_ref_similarity(h) - target) ** 2)
  np.testing.assert_allclose(signals.similarity_loss(h, y, 3), want, rtol=1e-5)


def _mlp(svd):
  dense = functools.partial(layers.SVDDense, rank='full') if svd else nn.Dense
  model = models.MLP(features=(8, 8), num_classes=C, dense=dense, act=jnp.tanh)
  k = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(k[0], (B, 5))
  y = jax.random.randint(k[1], (B,), 0, C)
  return model, x, y, model.init(k[2], x)['params']


@pytest.mark.parametrize('svd', [False, True])
@pytest.mark.parametrize('sim_weight', [0.0, 0.99])
def test_local_signal_update_is_each_blocks_own_gradient(svd, sim_weight):
  """Under signal='local' every hidden block's update is the gradient of its own readout loss
  ((1−β) CE + β L_sim) with respect to its own params only; the head gets the exact CE."""
  model, x, y, params = _mlp(svd)
  readout = signals.init_readout(jax.random.key(5), {'dense1': 8, 'dense2': 8}, C)
  forward = lambda p: (model.apply({'params': p}, x, local=True), None)  # noqa: E731
  updates, aux = dfa.local_grads(forward, params, readout, y, signal='local',
                                 sim_weight=sim_weight)
  inputs = {'dense1': x, 'dense2': None}

  def block_out(p, name, h_in):
    if svd:
      return jnp.tanh(((h_in @ p['v']) * p['s']) @ p['u'].T + p['bias'])
    return jnp.tanh(h_in @ p['kernel'] + p['bias'])
  _, taps = model.apply({'params': params}, x)
  inputs['dense2'] = taps['dense1']
  total = 0.0
  for name in ('dense1', 'dense2'):
    def loss(p, name=name):
      h = block_out(p, name, inputs[name])
      ce = signals.local_loss(h, readout.block(name), y)
      return (1 - sim_weight) * ce + sim_weight * signals.similarity_loss(h, y, C)
    want = jax.grad(loss)(params[name])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 updates[name], want)
    total += signals.local_loss(taps[name], readout.block(name), y)
  head = jax.grad(lambda p: losses.cross_entropy(
      model.apply({'params': {**params, 'head': p}}, x)[0], y))(params['head'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               updates['head'], head)
  np.testing.assert_allclose(aux['local_loss'], total / 2, rtol=1e-5)


def test_mixed_signal_interpolates_and_global_ignores_readout_fields():
  model, x, y, params = _mlp(False)
  readout = signals.init_readout(jax.random.key(5), {'dense1': 8, 'dense2': 8}, C)
  forward = lambda p: (model.apply({'params': p}, x, local=True), None)  # noqa: E731
  run = lambda **kw: dfa.local_grads(forward, params, readout, y, **kw)[0]  # noqa: E731
  u0, u1 = run(signal='local'), run(signal='mixed', signal_mix=1.0)
  um = run(signal='mixed', signal_mix=0.25)
  # the cotangent, hence the update of a single-layer block, is affine in the mix
  jax.tree.map(lambda a, b, m: np.testing.assert_allclose(m, 0.75 * a + 0.25 * b, rtol=1e-4,
                                                          atol=1e-7), u0, u1, um)
  assert not np.allclose(u0['dense1']['kernel'], u1['dense1']['kernel'])
  with pytest.raises(ValueError, match='signal must be one of'):
    run(signal='lokal')


def test_feedback_grads_dkp_and_learned_readout_by_hand():
  k = jax.random.split(jax.random.key(7), 4)
  y = jax.random.randint(k[0], (B,), 0, C)
  e = jax.nn.softmax(jax.random.normal(k[1], (B, C))) - jax.nn.one_hot(y, C)
  taps = {'d': jax.random.normal(k[2], (B, 6)), 'c': jax.random.normal(k[3], (B, 2, 2, 4))}
  f = fb.init_feedback(jax.random.key(8), {'d': 6, 'c': 4}, C, ranks=2)  # 'c': channel broadcast
  g = dfa.feedback_grads(f, taps, y, e, 'global')
  # DKP: ∇F = ψ(h)ᵀ e / B (ψ = sum over positions for channel broadcast), through P σ Qᵀ
  for name, psi in (('d', taps['d']), ('c', taps['c'].sum((1, 2)))):
    b, gb = f.block(name), g.block(name)
    grad_f = np.asarray(psi).T @ np.asarray(e) / B
    np.testing.assert_allclose(gb['p'], grad_f @ b['q'] * b['sigma'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb['sigma'], np.diag(b['p'].T @ grad_f @ b['q']), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(gb['q'], grad_f.T @ b['p'] * b['sigma'], rtol=1e-4, atol=1e-6)
  ro = signals.init_readout(jax.random.key(9), {'d': 6}, C)
  gl = dfa.feedback_grads(ro, taps, y, e, 'local')
  want = jax.grad(lambda blk: signals.local_loss(taps['d'], blk, y))(ro.block('d'))
  for key in ('p', 'sigma', 'q'):
    np.testing.assert_allclose(gl.block('d')[key], want[key], rtol=1e-5, atol=1e-7)


def _hand_mlp_features(h, ws, bs, g):
  """Pool [B, H, W, c] to g×g by hand, then relu(x W + b) per position, flatten, normalise."""
  b_, hh, ww, c = h.shape
  x = jnp.stack([jnp.stack([h[:, i * hh // g:(i + 1) * hh // g, j * ww // g:(j + 1) * ww // g]
                            .mean((1, 2)) for j in range(g)], 1) for i in range(g)], 1)
  for w, bias in zip(ws, bs):
    x = jnp.maximum(jnp.einsum('bijc,cd->bijd', x, w) + bias, 0.0)
  x = x.reshape(b_, -1)
  return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


@pytest.mark.parametrize('mix', [0.0, 0.3])
def test_hidden_readout_layers_equal_hand_written_head(mix):
  """readout_layers: the pooled map through 1×1 ReLU layers, then the linear readout; the
  tap's cotangent and the learned readout's gradient (every W, b, P, σ, Q) against jax.grad
  of the head written out by hand."""
  k = jax.random.split(jax.random.key(11), 4)
  h = jax.random.normal(k[0], (B, 4, 4, 3))
  y = jax.random.randint(k[1], (B,), 0, C)
  e_glob = jax.nn.softmax(jax.random.normal(k[2], (B, C))) - jax.nn.one_hot(y, C)
  ro = signals.init_readout(k[3], {'a': 12}, C, hidden={'a': (2, 3)})
  block = ro.block('a')
  assert block['w0'].shape == block['w1'].shape == (3, 3) and not np.any(block['b0'])
  for b in (block, {**block, 'b0': block['b0'] + 0.1, 'b1': block['b1'] - 0.1}):

    def hand_feat(t, blk=b):
      return _hand_mlp_features(t, (blk['w0'], blk['w1']), (blk['b0'], blk['b1']), 2)

    def hand_loss(t, blk=b):
      z = hand_feat(t, blk) @ ((blk['p'] * blk['sigma']) @ blk['q'].T) / 0.5
      return losses.cross_entropy(z, y)

    f = (b['p'] * b['sigma']) @ b['q'].T
    e_local = jax.nn.softmax(hand_feat(h) @ f / 0.5) - jax.nn.one_hot(y, C)
    _, pull = jax.vjp(hand_feat, h)
    (want,) = pull(((1 - mix) * e_local + mix * e_glob) @ f.T / (0.5 * B))
    cot, ce = signals.readout_cotangent(h, b, y, e_glob, mix=mix, temperature=0.5)
    np.testing.assert_allclose(cot, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ce, hand_loss(h), rtol=1e-5)
    if mix == 0:
      np.testing.assert_allclose(cot, jax.grad(hand_loss)(h), rtol=1e-4, atol=1e-7)
  # the learned readout ("pred" + the head): its gradient in every array of the block
  taps = {'a': h}
  g = dfa.feedback_grads(ro, taps, y, e_glob, 'local')
  want = jax.grad(lambda blk: hand_loss(h, blk))(block)
  assert set(g.block('a')) == {'p', 'sigma', 'q', 'w0', 'b0', 'w1', 'b1'}
  for key, w in want.items():
    assert np.any(np.asarray(w) != 0), key
    np.testing.assert_allclose(g.block('a')[key], w, rtol=1e-4, atol=1e-7)


def test_hidden_readout_layers_stack_by_width_and_need_conv_taps():
  # equal readout width and rank, different channel counts: two stacks, not one
  ro = signals.init_readout(jax.random.key(0), {'a': 12, 'b': 12, 'd': 12}, C,
                            hidden={'a': (1, 3), 'b': (1, 12)})
  assert ro.block('a')['w0'].shape == (3, 3) and ro.block('b')['w0'].shape == (12, 12)
  assert 'w0' not in ro.block('d') and len(ro.groups) == 3
  with pytest.raises(ValueError, match='conv taps only'):
    signals.init_readout(jax.random.key(0), {'a': 10}, C, hidden={'a': (1, 4)})
  with pytest.raises(ValueError, match='conv taps only'):
    signals.features(jnp.ones((B, 12)), 12, hidden=((jnp.eye(12), jnp.zeros(12)),))


def _hand_conv3x3(x, w, b):
  """'SAME' 3×3 convolution written out: zero padding, then the sum over the 9 offsets."""
  hh, ww = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(jnp.einsum('bhwc,cd->bhwd', xp[:, i:i + hh, j:j + ww], w[i, j])
            for i in range(3) for j in range(3))
  return out + b


def test_reconstruction_term_equals_hand_written_decoder():
  """InfoPro's term: at the tap's own side the resize is the identity, so the decoder is two
  hand-written 3×3 convs (ReLU between) against the image average-pooled to that side; the
  tap's cotangent gains λ ∂L_rec/∂h and the decoder learns λ L_rec beside the readout's CE."""
  k = jax.random.split(jax.random.key(5), 5)
  h = jax.random.normal(k[0], (B, 4, 4, 3))
  images = jax.random.normal(k[1], (B, 8, 8, 3))
  y = jax.random.randint(k[2], (B,), 0, C)
  ro = signals.init_readout(k[3], {'a': 12}, C, decoders={'a': 3})
  block = ro.block('a')
  assert block['rw0'].shape == (3, 3, 3, signals.DECODER_CHANNELS)
  assert block['rw1'].shape == (3, 3, signals.DECODER_CHANNELS, 3)
  block = {**block, 'rb0': block['rb0'] + 0.05, 'rb1': block['rb1'] - 0.1}
  hidden = jax.nn.relu(_hand_conv3x3(h, block['rw0'], block['rb0']))
  np.testing.assert_allclose(signals.decode(h, block, 4),
                             _hand_conv3x3(hidden, block['rw1'], block['rb1']), rtol=1e-4,
                             atol=1e-5)

  def hand_rec(t, blk=block):
    img = images.reshape(B, 4, 2, 4, 2, 3).mean((2, 4))
    out = _hand_conv3x3(jax.nn.relu(_hand_conv3x3(t, blk['rw0'], blk['rb0'])), blk['rw1'],
                        blk['rb1'])
    return jnp.mean((out - img) ** 2)

  np.testing.assert_allclose(signals.reconstruction_loss(h, block, images, 4), hand_rec(h),
                             rtol=1e-5)
  up = jax.image.resize(h, (B, 8, 8, 3), 'bilinear')  # upsampled 4 → 8, then the same convs
  np.testing.assert_allclose(
      signals.reconstruction_loss(h, block, images, 8),
      jnp.mean((_hand_conv3x3(jax.nn.relu(_hand_conv3x3(up, block['rw0'], block['rb0'])),
                              block['rw1'], block['rb1']) - images) ** 2), rtol=1e-5)
  with pytest.raises(ValueError, match='does not divide'):
    signals.pooled_image(images, 3)
  # local_grads: the one-tap model h = x·W; with λ the update gains Wᵀ-pulled λ ∂L_rec/∂h
  w = jax.random.normal(k[4], (3, 3))
  x = jax.random.normal(k[0], (B, 4, 4, 3))
  fed = fb.from_blocks({'a': block})

  def forward(p):
    t = x @ p['w']
    return (t.mean((1, 2)), {'a': t}), None
  lam = 0.7
  got, aux = dfa.local_grads(forward, {'w': w}, fed, y, signal='local', recon_weight=lam,
                             recon_size=4, images=images, learn_feedback='local')
  plain, _ = dfa.local_grads(forward, {'w': w}, fed, y, signal='local')
  h0 = x @ w
  cot = lam * jax.grad(hand_rec)(h0)
  np.testing.assert_allclose(got['w'] - plain['w'],
                             jnp.einsum('bhwc,bhwd->cd', x, cot), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(aux['recon_loss'], hand_rec(h0), rtol=1e-5)  # logged as a metric
  # the decoder's gradient is λ ∂L_rec; the readout's factors keep their CE gradient
  g = aux['feedback_grads'].block('a')
  want = jax.grad(lambda blk: hand_rec(h0, blk))(block)
  for key in ('rw0', 'rb0', 'rw1', 'rb1'):
    np.testing.assert_allclose(g[key], lam * want[key], rtol=1e-4, atol=1e-6)
  want_ce = jax.grad(lambda blk: signals.local_loss(h0, blk, y))(block)
  np.testing.assert_allclose(g['p'], want_ce['p'], rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match='needs the input images'):
    dfa.local_grads(forward, {'w': w}, fed, y, signal='local', recon_weight=lam)
