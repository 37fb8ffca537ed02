"""The local update against hand-written DFA rules; locality; HLO convolution counts."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrdfa_jax import alignment
from lrdfa_jax import dfa, feedback as fb, layers, losses, models

B, D_IN, C = 6, 5, 3


def _forward(model, x, local):
  return lambda p: (model.apply({'params': p}, x, local=local), None)


def _setup(svd: bool, seed=0):
  dense = functools.partial(layers.SVDDense, rank='full') if svd else nn.Dense
  model = models.MLP(features=(4, 4), num_classes=C, dense=dense, act=jnp.tanh)
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (B, D_IN))
  y = jax.random.randint(k[1], (B,), 0, C)
  params = model.init(k[2], x)['params']
  feedback = fb.init_feedback(k[3], {'dense1': 4, 'dense2': 4}, C, kind='dense')
  return model, x, y, params, feedback


def _hidden_inputs(params, x, svd):
  """h_0, a_1, h_1, a_2 by hand."""
  def lin(p, h):
    if svd:
      return ((h @ p['v']) * p['s']) @ p['u'].T + p['bias']
    return h @ p['kernel'] + p['bias']
  a1 = lin(params['dense1'], x); h1 = jnp.tanh(a1)
  a2 = lin(params['dense2'], h1)
  return {'dense1': (x, a1), 'dense2': (h1, a2)}


@pytest.mark.parametrize('svd', [False, True])
def test_local_update_equals_hand_written_dfa(svd):
  model, x, y, params, feedback = _setup(svd)
  upd, aux = jax.jit(functools.partial(dfa.local_grads, _forward(model, x, True)))(
      params, feedback, y)
  e = losses.output_error(model.apply({'params': params}, x)[0], y)
  for name, (h, a) in _hidden_inputs(params, x, svd).items():
    F = fb.dense_matrix(feedback, name)
    delta = (e @ F.T) * (1 - jnp.tanh(a)**2) / B          # ((e Fᵀ) ⊙ φ'(a)) / B
    got = upd[name]
    np.testing.assert_allclose(got['bias'], delta.sum(0), rtol=1e-5, atol=1e-6)
    if not svd:
      np.testing.assert_allclose(got['kernel'], h.T @ delta, rtol=1e-5, atol=1e-6)  # (δ hᵀ)ᵀ
    else:
      p = params[name]
      hv = h @ p['v']; du = delta @ p['u']
      np.testing.assert_allclose(got['u'], delta.T @ (hv * p['s']), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got['s'], jnp.sum(du * hv, 0), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got['v'], h.T @ (du * p['s']), rtol=1e-5, atol=1e-6)
  # the output layer gets the exact backprop gradient of cross-entropy
  bp, _ = dfa.bp_grads(_forward(model, x, False), params, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               upd['head'], bp['head'])
  np.testing.assert_allclose(aux['loss'], losses.cross_entropy(aux['logits'], y), rtol=1e-6)
  # and the hidden updates are not the backprop ones
  assert not np.allclose(upd['dense1']['bias'], bp['dense1']['bias'], atol=1e-4)


def test_no_gradient_crosses_blocks():
  model, x, y, params, feedback = _setup(True)
  upd, _ = dfa.local_grads(_forward(model, x, True), params, feedback, y)
  other = fb.init_feedback(jax.random.key(99), {'dense1': 4, 'dense2': 4}, C, kind='dense')
  mixed = fb.Feedback(groups={'dense_d4': {'f': jnp.stack(
      [feedback.block('dense1')['f'], other.block('dense2')['f']])}}, index=feedback.index)
  upd2, _ = dfa.local_grads(_forward(model, x, True), params, mixed, y)
  np.testing.assert_array_equal(upd['dense1']['u'], upd2['dense1']['u'])
  np.testing.assert_array_equal(upd['head']['u'], upd2['head']['u'])
  assert not np.allclose(upd['dense2']['u'], upd2['dense2']['u'])


def test_missing_tap_is_clear_error():
  model, x, y, params, _ = _setup(False)
  bad = fb.init_feedback(jax.random.key(0), {'dense9': 4}, C)
  with pytest.raises(ValueError, match='does not tap'):
    dfa.local_grads(_forward(model, x, True), params, bad, y)


def _count_convs(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text().count('convolution(')


def test_dfa_step_has_fewer_convolutions_than_bp():
  model = models.SmallConv(num_classes=C, widths=(4, 6, 8), hidden=16)
  x = jnp.ones((2, 8, 8, 3)); y = jnp.array([0, 1])
  params = model.init(jax.random.key(0), x)['params']
  taps = jax.eval_shape(lambda p: model.apply({'params': p}, x)[1], params)
  feedback = fb.init_feedback(jax.random.key(1), dfa.tap_widths(taps), C)
  n_dfa = _count_convs(lambda p, f: dfa.local_grads(_forward(model, x, True), p, f, y)[0],
                       params, feedback)
  n_bp = _count_convs(lambda p: dfa.bp_grads(_forward(model, x, False), p, y)[0], params)
  # forward 3 + weight grads 3 for DFA; BP adds input grads of conv2 and conv3
  assert n_dfa == 6, n_dfa
  assert n_bp == 8, n_bp


def _factored_small_conv(**conv_kwargs):
  """A tiny SmallConv with rank-2 factored layers: model, x [2, 8, 8, 3], y, params, taps."""
  model = models.SmallConv(num_classes=C, widths=(4, 6, 8), hidden=16,
                           conv=functools.partial(layers.SVDConv, rank=2, **conv_kwargs),
                           dense=functools.partial(layers.SVDDense, rank=2))
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3)); y = jnp.array([0, 2])
  params = model.init(jax.random.key(0), x)['params']
  taps = jax.eval_shape(lambda p: model.apply({'params': p}, x)[1], params)
  return model, x, y, params, taps


@pytest.mark.parametrize('align', ['subspace', 'output'])
def test_alignment_terms_change_only_their_share(align):
  model, x, y, params, taps = _factored_small_conv()
  feedback = fb.init_feedback(jax.random.key(1), dfa.tap_widths(taps), C, ranks=2)
  fwd = _forward(model, x, True)
  base, _ = dfa.local_grads(fwd, params, feedback, y)
  upd, aux = dfa.local_grads(fwd, params, feedback, y, align=align, align_weight=0.5)
  assert float(aux['align_loss']) > 0
  if align == 'subspace':
    extra = jax.grad(lambda p: 0.5 * alignment.subspace_loss(p, feedback))(params)
    want = jax.tree.map(jnp.add, base, extra)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), upd, want)
  assert not np.allclose(upd['conv2']['u'], base['conv2']['u'])
  jax.tree.map(np.testing.assert_array_equal, upd['head'], base['head'])


def test_next_layer_alignment_reads_feedback_subspace():
  """align='next' pulls each reading layer's V diag(s) into span(P) of the block it reads."""
  model, x, y, params, taps = _factored_small_conv(split='channel')
  feedback = fb.init_feedback(jax.random.key(1), dfa.tap_widths(taps), C, ranks=2)
  order = ('conv1', 'conv2', 'conv3', 'fc1')
  # NumPy reference: reader rows are (position, channel), channel fastest
  want = 0.0
  for name, reader in zip(order, ['conv2', 'conv3', 'fc1', 'head']):
    r = params[reader]
    p = np.asarray(feedback.block(name)['p'])
    a = np.asarray(r['v'] * r['s']).reshape(-1, p.shape[0], r['s'].shape[0])
    a = a.transpose(1, 0, 2).reshape(p.shape[0], -1)
    want += np.sum((a - p @ (p.T @ a))**2) / np.sum(a**2)
  got = alignment.next_loss(params, feedback, order)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # the term moves only the readers' V and s, never U, and the dense stem gets nothing
  fwd = _forward(model, x, True)
  base, _ = dfa.local_grads(fwd, params, feedback, y)
  upd, aux = dfa.local_grads(fwd, params, feedback, y, align='next', align_weight=0.5,
                             tap_order=order)
  np.testing.assert_allclose(aux['align_loss'], want, rtol=1e-5)
  for layer in ('conv2', 'conv3', 'fc1', 'head'):
    np.testing.assert_array_equal(upd[layer]['u'], base[layer]['u'])
    assert not np.allclose(upd[layer]['v'], base[layer]['v'])
  jax.tree.map(np.testing.assert_array_equal, upd['conv1'], base['conv1'])
  with pytest.raises(ValueError, match='tap_order'):
    dfa.local_grads(fwd, params, feedback, y, align='next', align_weight=0.5)
  # descending the term alone lowers it
  step = jax.jit(jax.value_and_grad(lambda p: alignment.next_loss(p, feedback, order)))
  p = params
  for _ in range(50):
    value, g = step(p)
    p = jax.tree.map(lambda a, b: a - 0.5 * b, p, g)
  assert float(step(p)[0]) < 0.5 * float(want)


def test_update_angles():
  a = {'l': {'w': jnp.array([1.0, 0.0])}, 'm': {'w': jnp.array([1.0, 1.0])}}
  b = {'l': {'w': jnp.array([0.0, 2.0])}, 'm': {'w': jnp.array([3.0, 3.0])}}
  ang = dfa.update_angles(a, b)
  np.testing.assert_allclose(ang['l'], 90.0, atol=1e-4)
  np.testing.assert_allclose(ang['m'], 0.0, atol=1e-2)


def test_channel_marginal_recovers_the_channel_factor_of_a_kronecker_feedback():
  """P = a ⊗ Pc (one spatial profile times channel directions): the marginal spans Pc."""
  k = jax.random.split(jax.random.key(5), 2)
  a = jax.random.normal(k[0], (9,)); a = a / jnp.linalg.norm(a)          # 3×3 positions
  pc = fb._orthonormal(k[1], 7, 3)                                        # 7 channels, k = 3
  p = jnp.kron(a[:, None], pc)                                            # [positions·c, k], NHWC
  np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)
  basis = alignment.channel_marginal(p, 7)
  assert basis.shape == (7, 3)
  np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(basis @ basis.T, pc @ pc.T, atol=1e-5)      # same span
  # a full map that reaches one channel direction only: U there has no energy outside
  u = pc[:, :2]
  assert float(losses.alignment_subspace(u, jnp.ones(2), basis)) < 1e-8
  assert float(losses.alignment_subspace(u, jnp.ones(2), fb._orthonormal(k[0], 7, 3))) > 0.05


def test_channel_subspace_aligns_full_map_conv_blocks_by_channel():
  """With full-map feedback 'subspace' skips the conv blocks; 'channel_subspace' reaches them."""
  model, x, y, params, taps = _factored_small_conv()
  channels = alignment.tap_channels(taps)
  assert channels == {'conv1': 4, 'conv2': 6, 'conv3': 8}
  fwd = _forward(model, x, True)
  for delivery, subspace_blocks in (('channel', ['conv1', 'conv2', 'conv3', 'fc1']),
                                    ('full', ['conv3', 'fc1'])):
    feedback = fb.init_feedback(jax.random.key(1), dfa.tap_widths(taps, delivery), C, ranks=2)
    assert alignment.subspace_blocks(params, feedback) == subspace_blocks
    assert alignment.subspace_blocks(params, feedback, channels) == \
        ['conv1', 'conv2', 'conv3', 'fc1']
    sub, _ = dfa.local_grads(fwd, params, feedback, y, align='subspace', align_weight=0.5)
    chan, aux = dfa.local_grads(fwd, params, feedback, y, align='channel_subspace',
                                align_weight=0.5)
    assert float(aux['align_loss']) > 0
    for name in ('conv3', 'fc1', 'head'):  # blocks both forms treat alike (conv3's tap is 1×1)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                   chan[name], sub[name])
    for name in ('conv1', 'conv2'):
      same = all(np.allclose(chan[name][f], sub[name][f], rtol=1e-5, atol=1e-7)
                 for f in ('u', 's'))
      assert same == (delivery == 'channel'), (delivery, name)


def test_channel_subspace_loss_matches_a_numpy_reference():
  """Full maps: P's rows are (position, channel), channel fastest; top-k moment eigenvectors."""
  _, _, _, params, taps = _factored_small_conv(split='channel')
  feedback = fb.init_feedback(jax.random.key(1), dfa.tap_widths(taps, 'full'), C, ranks=2)
  want = 0.0
  for name in ('conv1', 'conv2', 'conv3', 'fc1'):
    p = np.asarray(feedback.block(name)['p'])
    a = np.asarray(params[name]['u']) * np.asarray(params[name]['s'])
    c = a.shape[0]
    if p.shape[0] != c:  # conv1 (4×4 map) and conv2 (2×2); conv3's map is 1×1
      moment = sum(p[i * c:(i + 1) * c] @ p[i * c:(i + 1) * c].T for i in range(p.shape[0] // c))
      w, vecs = np.linalg.eigh(moment)
      p = vecs[:, np.argsort(w)[::-1][:p.shape[1]]]
    want += np.sum((a - p @ (p.T @ a))**2) / np.sum(a**2)
  got = alignment.subspace_loss(params, feedback, alignment.tap_channels(taps))
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
