"""Every notebook in notebooks/ runs top to bottom on CPU with tiny settings.

The settings are injected after the cell tagged ``parameters`` (papermill's convention), and
cells appended by the test check what the notebook computed. The kernel is this interpreter.
"""
import json
import os
import sys

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'notebooks')
REPO = 'lrdfa-jax/lrdfa_jax'  # where the Colab badges point

CASES = {
    'quickstart.ipynb': (
        "SMOKE = True\nWORKDIR = {tmp!r}",
        # smoke data: both methods learn the class patterns (tests/main_test.py asserts >= 90 too)
        "assert set(summaries) == {'bp', 'ssa'}\n"
        "assert all(s['final_test_accuracy'] >= 90 for s in summaries.values()), summaries\n"
        "assert summaries['ssa']['trainable_params'] < summaries['bp']['trainable_params']"),
    'your_model.ipynb': (
        "STEPS = 12\nBATCH = 32\nSOURCE = 'synthetic'\nEVAL_EVERY = 6",
        "assert metrics.param_count(variables['params']) < metrics.param_count(dense_vars['params'])\n"
        "assert [h['step'] for h in history] == [0, 6, 11]\n"
        "names = set(history[0]) - {'step', 'accuracy'}\n"
        "assert {'Conv_1', 'Dense_0', 'Dense_1', 'BatchNorm_1'} <= names, names\n"
        # the head gets the exact error: its local update is backprop's gradient
        "assert all(h['Dense_1'] < 1.0 for h in history), history\n"
        # the hidden blocks get the fed-back signal, not backprop's gradient
        "assert all(1.0 < h[n] < 180 for h in history for n in ('Conv_1', 'Dense_0'))\n"
        # (a dozen steps do not train it; the quickstart's test asserts that training learns)
        "assert 0 <= final <= 100"),
}


def test_every_notebook_is_tested_and_committed_without_outputs():
  assert sorted(os.listdir(NOTEBOOKS)) == sorted(CASES)
  for name in CASES:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(not c.get('outputs') and c.get('execution_count') is None for c in code), name
    assert sum('parameters' in c.metadata.get('tags', []) for c in code) == 1, name
    badge = f'https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}'
    assert badge in nb.cells[0].source, name


def test_readme_links_every_notebook_with_a_colab_badge():
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  for name in CASES:
    assert f'(https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name})' in readme


@pytest.fixture(scope='module')
def kernel(tmp_path_factory):
  """A kernel spec that runs this interpreter (not whatever `python` is on PATH)."""
  root = tmp_path_factory.mktemp('jupyter')
  write_kernel_spec(str(root / 'kernels' / 'lrdfa'))
  spec = root / 'kernels' / 'lrdfa' / 'kernel.json'
  assert json.loads(spec.read_text())['argv'][0] == sys.executable
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('JUPYTER_PATH', str(root))
    yield 'lrdfa'


@pytest.mark.parametrize('name', sorted(CASES))
def test_notebook_runs_top_to_bottom(name, kernel, tmp_path, monkeypatch):
  """A failing cell, the appended checks included, raises CellExecutionError."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  settings, checks = CASES[name]
  at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(settings.format(tmp=str(tmp_path / 'runs'))))
  nb.cells.append(nbformat.v4.new_code_cell(checks))
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  NotebookClient(nb, kernel_name=kernel, timeout=600,
                 resources={'metadata': {'path': ROOT}}).execute()
