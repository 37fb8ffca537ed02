"""What a run measures and reports: layer statistics, evaluation, train logs, the run summary."""
from __future__ import annotations

import json
import os
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrdfa_jax import data as data_lib
from lrdfa_jax import losses
from lrdfa_jax import rank as rank_lib
from lrdfa_jax.steps import shard_batch


def svd_layers(params: Any) -> dict[str, Any]:
  """``'stage1_block0/conv1'`` -> factored layer (:func:`lrdfa_jax.rank.svd_layers`)."""
  return {'/'.join(p): l for p, l in rank_lib.svd_layers(params).items()}


def layer_stats(params: Any) -> dict[str, jax.Array]:
  """Orthogonality error ``‖UᵀU−I‖²/r² + ‖VᵀV−I‖²/r²`` and rank of every factored layer."""
  out = {}
  for name, l in svd_layers(params).items():
    out[f'orth/{name}'] = losses.orthogonality(l['u'], l['v'])
    out[f'rank/{name}'] = jnp.asarray(l['s'].shape[0])
    out[f'eff_rank/{name}'] = jnp.sum(jnp.abs(l['s']) > 1e-3 * jnp.max(jnp.abs(l['s'])))
  return out


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def cpu_model(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The host CPU's model name (``'AMD EPYC'``), or the architecture where ``cpuinfo`` names
  none (macOS, some containers). Wall times only compare on the same model."""
  try:
    with open(cpuinfo) as f:
      names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
  except OSError:
    names = []
  return names[0] if names and names[0] else platform.processor() or platform.machine()


def machine() -> str:
  """``'1x cpu (AMD EPYC, x86_64, 2 CPUs)'``: the devices and host CPU a run saw, for its
  summary."""
  dev = jax.devices()[0]
  kind = getattr(dev, 'device_kind', dev.platform)
  host = dict.fromkeys((cpu_model(), platform.machine()))  # the model, unless it is the arch
  return f'{jax.device_count()}x {kind} ({", ".join(host)}, {os.cpu_count()} CPUs)'


def evaluate(eval_fn, state, source, *, batch_size, info, mesh,
             workers: int = 16) -> dict[str, float]:
  """Top-1/top-5 accuracy (percent) and mean loss over every example of ``source``."""
  totals = None
  for batch in data_lib.eval_batches(source, batch_size=batch_size, mean=info['mean'],
                                     std=info['std'], process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     image_size=info['image_shape'][0], workers=workers):
    out = eval_fn(state, shard_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  n = float(totals['count'])
  return {'accuracy': 100.0 * float(totals['top1_sum']) / n,
          'top5': 100.0 * float(totals['top5_sum']) / n, 'loss': float(totals['loss_sum']) / n}


def log_train(writer, step, metrics, state, *, dt, lr, batch_size, epoch) -> float:
  """Writes train metrics and layer stats. Returns the loss."""
  metrics = jax.device_get(metrics)
  loss = float(metrics['loss'])
  scalars = {**{f'train/{k}': v for k, v in metrics.items()}, 'lr': lr, 'step_time_s': dt,
             'images_per_s': batch_size / dt, 'epoch': epoch}
  scalars.update(jax.device_get(layer_stats(state.params)))
  writer.write(step, scalars)
  return loss


def run_summary(config, *, method: str, step: int, steps_per_epoch: int, test: dict,
                validation: dict, params: Any, reductions: list[dict], wall_time_s: float,
                aligned, changes: dict | None, wall_time_since_step: int | None = None) -> dict:
  """The ``summary.json`` of a run: final accuracies, params, wall time, machine and config.

  ``reductions``: the run's rank reductions (:mod:`lrdfa_jax.rank`); ``aligned``: the blocks
  subspace alignment reaches; ``changes``: a resume's config changes (``{'step', 'changes'}``).
  ``wall_time_s`` sums every invocation of the run; ``wall_time_since_step``: the step from
  which it counts when the time before a resume is unknown (a checkpoint from an older version).
  """
  return {
      'model': config.model.name, 'dataset': config.data.name, 'source': config.data.source,
      'method': method, 'seed': config.train.seed, 'step': step,
      'epochs': step / steps_per_epoch,
      'final_test_accuracy': test.get('accuracy'), 'final_test_top5': test.get('top5'),
      'final_test_loss': test.get('loss'),
      'final_validation_accuracy': validation.get('accuracy'),
      'final_validation_loss': validation.get('loss'),
      'trainable_params': param_count(params),
      **({'initial_trainable_params': reductions[0]['params_before'],
          'rank_reductions': reductions} if reductions else {}),
      'wall_time_s': wall_time_s, 'machine': machine(),
      **({'wall_time_since_step': wall_time_since_step} if wall_time_since_step else {}),
      'subspace_align_blocks': aligned,
      'config': json.loads(config.to_json_best_effort()),
      **({'config_changes': changes} if changes else {}),
  }
