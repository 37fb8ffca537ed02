"""The README's Python snippet runs as written and does what it says."""
import os
import re

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_snippet_runs_and_updates_every_layer():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  marker = text.index('Using the pure pieces from your own JAX code')
  code = re.search(r'```python\n(.*?)```', text[marker:], re.S).group(1)
  ns: dict = {}
  exec(compile(code, 'README.md', 'exec'), ns)  # noqa: S102 (our own README)
  params0 = ns['model'].init(ns['key'], ns['x'])['params']
  assert jax.tree.structure(ns['updates']) == jax.tree.structure(params0)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(ns['updates']))
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), params0, ns['params'])
  assert all(jax.tree.leaves(moved['conv2'])) and all(jax.tree.leaves(moved['head']))
  assert 'kernel' in params0['conv1'] and 'u' in params0['conv2']  # as configs/cifar10.py


def test_readme_zoo_table_is_the_committed_results_table():
  """The README's zoo table is ``python -m experiments.zoo_table``'s, on the committed results."""
  from experiments import zoo_table
  columns = [(h, os.path.join(ROOT, folder), m, d) for h, folder, m, d in zoo_table.COLUMNS]
  table = zoo_table.tables(columns).split('\n\n')[0]
  with open(os.path.join(ROOT, 'README.md')) as f:
    assert table in f.read(), 'rerun python -m experiments.zoo_table and paste its first table'
