"""Metric writers: JSON lines plus TensorBoard event files in the workdir; nothing without one."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def _scalar(v: Any) -> Any:
  if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, 'dtype'):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()
  return v


class MetricWriter:
  """Appends ``{'step': ..., **scalars}`` to ``metrics.jsonl`` and TensorBoard under ``tb/``."""

  def __init__(self, workdir: str | None):
    self.path = None
    self._tb = None
    if workdir is None:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    from tensorboardX import SummaryWriter  # imported lazily: optional at analysis time
    self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if self.path is None:
      return
    record = {'step': int(step), **{k: _scalar(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a ``metrics.jsonl``."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
