"""How large each SSA term's gradient is next to the local (DFA) update, per factored layer.

  python -m experiments.term_scales --run=runs/protocol/ssa_lr0.001_seed0 \
      --json=results/cifar10_small_conv/term_scales.json

Restores the run's last checkpoint, takes one training batch (seed 0, epoch 0) and writes, for
every factored layer and each of ``u``, ``s``, ``v``: the Frobenius norm of the DFA update, of
the backprop gradient, of ``orth_weight ·`` the orthogonality gradient and of ``align_weight ·``
the alignment gradient, with the run's weights: the parameter term the run trains
(``alignment.PARAM_TERMS``: ``subspace``, ``channel_subspace``, ``next``; ``subspace`` as a
reference for ``output``/``none`` runs), and of ``hoyer_weight ·`` the Hoyer gradient. Every
factored layer is measured, those inside residual blocks too. Adam rescales the sum per
coordinate, so a term whose norm is orders of magnitude below the DFA update barely moves the
factors. For each block with full-map structured feedback it also writes ``channel_top_k``:
the share of the feedback's channel second moment in its top ``k`` directions (the subspace
``channel_subspace`` aligns with), next to ``k / channels``, the share of any ``k`` directions
when the moment is isotropic.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from lrdfa_jax import alignment
from lrdfa_jax import data as data_lib
from lrdfa_jax import build, losses, train
from lrdfa_jax import metrics as metrics_lib, steps as steps_lib

_RUN = flags.DEFINE_string('run', None, 'A finished ssa run directory.', required=True)
_OUT = flags.DEFINE_string('json', None, 'JSON path to write (printed either way).')


def term_scales(run: str) -> dict:
  with open(os.path.join(run, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  state = train.restore_checkpoint(config, run)
  info = build.dataset_info(config)
  batch = next(data_lib.train_batches(build.load_data(config)['train'],
                                      batch_size=config.train.batch_size, seed=0, epoch=0,
                                      mean=info['mean'], std=info['std']))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  d = config.dfa
  # the run's own update (its signal source, readouts, similarity term), without alignment
  cfg = dataclasses.replace(steps_lib.StepConfig.from_config(config), method='ssa', align='none')
  # each gradient as one jitted program: op by op, a ResNet's step compiles hundreds of them
  updates = lambda c: jax.jit(lambda st, b: steps_lib.compute_updates(c, st, b)[0])(state, batch)
  local, bp = updates(cfg), updates(steps_lib.backprop_reference(cfg))
  svd = metrics_lib.svd_layers(state.params)  # every factored layer, nested ones included
  orth = jax.jit(jax.grad(lambda p: sum(losses.orthogonality(l['u'], l['v'])
                                        for l in metrics_lib.svd_layers(p).values())))(
      state.params)
  hoyer = jax.jit(jax.grad(lambda p: sum(losses.hoyer(l['s'])
                                         for l in metrics_lib.svd_layers(p).values())))(
      state.params)
  model = build.build_model(config, info['num_classes'])
  channels = alignment.tap_channels(build.tap_shapes(model, info['image_shape']))
  # the run's parameter term where it has one; subspace as the reference otherwise
  form = d.align if d.align in alignment.PARAM_TERMS else 'subspace'
  term = alignment.PARAM_TERMS[form]
  order = build.tap_order(model, info['image_shape'])
  align = jax.jit(jax.grad(lambda p, fb: term(p, fb, channels=channels, tap_order=order)))(
      state.params, state.feedback)
  out = {'run': run, 'step': int(state.step), 'orth_weight': d.orth_weight,
         'align_weight': d.align_weight, 'align': d.align, 'align_term': form,
         'hoyer_weight': d.hoyer_weight, 'layers': {},
         'channel_top_k': channel_top_k(state.feedback, channels)}
  # each term's gradient, by layer path, with the weight the run gives it
  terms = {'dfa': (local, 1.0), 'bp': (bp, 1.0), 'orth': (orth, d.orth_weight),
           'align': (align, d.align_weight), 'hoyer': (hoyer, d.hoyer_weight)}
  by_layer = {t: (metrics_lib.svd_layers(g), w) for t, (g, w) in terms.items()}
  for k, layer in svd.items():
    out['layers'][k] = {f: {t: w * float(jnp.linalg.norm(g[k][f])) for t, (g, w) in by_layer.items()}
                        for f in ('u', 's', 'v')}
    out['layers'][k]['orth_error'] = float(losses.orthogonality(layer['u'], layer['v']))
  return out


def channel_top_k(feedback, channels: dict[str, int]) -> dict[str, dict[str, float]]:
  """Per full-map block: the top-k share of the feedback's channel moment, and k / channels."""
  out = {}
  for name, c in channels.items():
    p = feedback.block(name).get('p')
    if p is None or not alignment.is_full_map(p.shape, c):  # dense, or one value per channel
      continue
    moment = jnp.linalg.eigvalsh(alignment.channel_moment(p, c))[::-1]
    k = min(p.shape[1], c)
    out[name] = {'top_k_share': float(moment[:k].sum() / moment.sum()), 'isotropic': k / c,
                 'k': k, 'channels': c}
  return out


def main(argv):
  del argv
  out = term_scales(_RUN.value)
  text = json.dumps(out, indent=1)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text + '\n')
  for k, v in out['layers'].items():
    for f in ('u', 's', 'v'):
      print(f'{k}/{f}: ' + '  '.join(f'{t} {v[f][t]:.2e}'
                                   for t in ('dfa', 'bp', 'orth', 'align', 'hoyer')))
  for k, v in out['channel_top_k'].items():
    print(f'{k}: top-{v["k"]} share of the feedback channel moment {v["top_k_share"]:.3f} '
          f'(isotropic {v["isotropic"]:.3f})')


if __name__ == '__main__':
  app.run(main)
