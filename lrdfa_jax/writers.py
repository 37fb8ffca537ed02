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
  """Appends ``{'step': ..., **scalars}`` to ``metrics.jsonl`` and TensorBoard under ``tb/``.

  ``resume_step``: the step a resumed run restarts from. Records after it (written before
  an interruption, and about to be written again) are dropped from ``metrics.jsonl`` and
  purged from TensorBoard, so no step appears twice. ``write=False`` (the other processes of
  a multi-process run) reads what was kept and writes nothing.
  """

  def __init__(self, workdir: str | None, resume_step: int | None = None, write: bool = True):
    self.path = None
    self._tb = None
    self._kept: dict[int, dict[str, Any]] = {}
    if workdir is None:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    if resume_step is not None and os.path.exists(path):
      records = [r for r in read_jsonl(path) if r['step'] <= resume_step]
      if write:
        write_jsonl(path, records)
      for r in records:
        if r['step'] == resume_step:
          self._kept.setdefault(r['step'], {}).update(r)
    if not write:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = path
    from tensorboardX import SummaryWriter  # imported lazily: optional at analysis time
    self._tb = SummaryWriter(os.path.join(workdir, 'tb'),
                             purge_step=None if resume_step is None else resume_step + 1)

  def logged(self, step: int, prefix: str) -> bool:
    """Whether a record kept from before the resume has a key starting with ``prefix``."""
    return any(k.startswith(prefix) for k in self._kept.get(step, ()))

  def kept_value(self, step: int, key: str) -> Any:
    """``key``'s value in a record kept from before the resume at ``step`` (None if none)."""
    return self._kept.get(step, {}).get(key)

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


def write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
  """Replaces ``path`` with ``records``, one JSON per line, atomically (tmp file + rename)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a ``metrics.jsonl``."""
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  out = []
  for i, line in enumerate(lines):
    try:
      out.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise
      # only the last line may be cut off (an interruption mid-write): it is dropped
  return out
