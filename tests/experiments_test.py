"""experiments.tune / experiments.protocol: a diverged run is recorded and skipped, bad input is
one line (experiments.variants.run_or_diverge)."""
import json
import os
import subprocess
import sys

import pytest
from absl import app

from configs import default
from experiments import tune, variants
from lrdfa_jax import train
from tests.train_test import tiny_config


def _smoke(variant='ssa_local_pred_k2_bn'):
  c = variants.config_for(variant, 0, 1)
  default.apply_arg(c, 'smoke')
  c.train.epochs = 1
  return c


def test_run_or_diverge_turns_a_refused_config_into_one_line(tmp_path):
  c = _smoke()
  c.dfa.modules = 'conv1,conv2+conv3+fc1+head'  # a module of one block: refused by build
  workdir = tmp_path / 'bad_lr0.006'
  with pytest.raises(app.UsageError) as e:
    variants.run_or_diverge(str(workdir), c)
  text = str(e.value)
  assert text.startswith('bad_lr0.006: dfa.modules') and "'conv1'" in text
  assert '\n' not in text
  assert not workdir.exists()  # refused before anything is written


def test_run_or_diverge_reports_divergence_and_reuses_finished_runs(tmp_path, monkeypatch,
                                                                    capsys):
  c = tiny_config('ssa', train__epochs=1)

  def diverge(config, workdir):  # train_test.py checks when train_and_evaluate raises this
    raise train.DivergenceError('training diverged at step 3: loss nan (not finite).')
  monkeypatch.setattr(train, 'train_and_evaluate', diverge)
  assert variants.run_or_diverge(str(tmp_path / 'ssa_lr0.01'), c) is None
  assert capsys.readouterr().out == ('ssa_lr0.01: diverged: training diverged at step 3: '
                                     'loss nan (not finite).\n')
  c.opt.lr = 1e-3  # a finished run (its summary, as train_and_evaluate writes it) is reused
  ok = tmp_path / 'ssa_lr0.001'
  ok.mkdir()
  s = {'final_test_accuracy': 61.5, 'config': json.loads(c.to_json_best_effort())}
  (ok / 'summary.json').write_text(json.dumps(s))
  # (train_and_evaluate still raises: a finished run never calls it)
  assert variants.run_or_diverge(str(ok), c) == s
  c.opt.lr = 2e-3  # the finished run was made with another config: one line
  with pytest.raises(app.UsageError, match=r'^ssa_lr0.001: .*another config'):
    variants.run_or_diverge(str(ok), c)


def test_tune_never_chooses_a_diverged_rate_and_lists_it():
  runs = [{'name': f'ssa_lr{lr:g}', 'variant': 'ssa', 'tag': '', 'lr': lr, 'set': {},
           **({'validation_accuracy': acc, 'test_accuracy': acc - 1, 'wall_time_s': 10.0}
              if acc is not None else tune.DIVERGED)}
          for lr, acc in ((1e-3, 50.0), (3e-3, 55.5), (1e-2, None))]
  assert tune.best(runs) == {'ssa': {'lr': 3e-3, 'validation_accuracy': 55.5}}
  assert tune.best(runs[2:]) == {}  # every rate diverged: no choice
  md = tune.markdown({'validation_size': 5000, 'epochs': 3, 'runs': runs,
                      'best': tune.best(runs)})
  assert '| ssa | – | 0.01 | diverged | – | – |' in md
  assert '| ssa | – | 0.003 | 55.50 | 54.50 | 10 |' in md


@pytest.mark.parametrize('module,flags,message', [
    ('report', ['--results={tmp}'], 'error: no run summaries in {tmp}.'),
    ('protocol', ['--only=nope', '--rundir={tmp}/runs'],
     "error: 'nope' is no variant of experiments/variants.py."),
    ('tune', ['--variants=ssa', '--set=model.rank=0.5', '--out={tmp}/t.json'],
     'error: --set needs a --tag to name the probe.'),
])
def test_commands_refuse_bad_input_in_one_line(tmp_path, module, flags, message):
  args = [f.format(tmp=tmp_path) for f in flags]
  p = subprocess.run([sys.executable, '-m', f'experiments.{module}', *args], capture_output=True,
                     text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
  assert p.returncode == 2
  assert p.stderr.strip() == message.format(tmp=tmp_path) and p.stdout == ''
  assert sorted(os.listdir(tmp_path)) == []  # nothing written


def test_tune_skip_done_matches_name_set_epochs_and_held_out_size():
  doc = {'epochs': 3, 'validation_size': 5000, 'runs': [
      {'name': 'ssa_lr0.001', 'set': {}, 'validation_accuracy': 50.0, 'epochs': 3,
       'validation_size': 5000},
      {'name': 'bp_r_lr0.01', 'set': {'model.rank': 0.5}, 'epochs': 1, 'validation_size': 100}]}
  assert tune.recorded(doc, 'ssa_lr0.001', {}, epochs=3, validation_size=5000) is doc['runs'][0]
  assert tune.recorded(doc, 'ssa_lr0.001', {}, epochs=10, validation_size=5000) is None
  assert tune.recorded(doc, 'ssa_lr0.001', {}, epochs=3, validation_size=1000) is None
  assert tune.recorded(doc, 'ssa_lr0.001', {'model.rank': 0.5}, epochs=3,
                       validation_size=5000) is None
  assert tune.recorded(doc, 'bp_r_lr0.01', {'model.rank': 0.5}, epochs=1,
                       validation_size=100) is doc['runs'][1]  # its own epochs, not the file's
  assert tune.recorded(doc, 'bp_r_lr0.01', {'model.rank': 0.5}, epochs=3,
                       validation_size=5000) is None
  assert tune.recorded(doc, 'ssa_lr0.003', {}, epochs=3, validation_size=5000) is None


def test_tune_load_keeps_the_files_epochs_with_its_older_records(tmp_path):
  path = tmp_path / 'tuning.json'
  path.write_text(json.dumps({'epochs': 3, 'validation_size': 5000, 'runs': [
      {'name': 'ssa_lr0.001', 'variant': 'ssa', 'tag': '', 'lr': 1e-3, 'set': {},
       'validation_accuracy': 50.0, 'test_accuracy': 49.0, 'wall_time_s': 10.0}]}))
  doc = tune.load(str(path), dataset='cifar10', model='small_conv')
  assert (doc['runs'][0]['epochs'], doc['runs'][0]['validation_size']) == (3, 5000)
  assert tune.recorded(doc, 'ssa_lr0.001', {}, epochs=3, validation_size=5000) is doc['runs'][0]
  doc.update(epochs=10)  # a 10-epoch probe joins the file: the 3-epoch run stays 3 epochs
  assert tune.recorded(doc, 'ssa_lr0.001', {}, epochs=10, validation_size=5000) is None
  doc['runs'].append({**doc['runs'][0], 'name': 'ssa_x_lr0.001', 'tag': 'x', 'epochs': 10})
  assert 'held out, 3 or 10 epochs per run' in tune.markdown({**doc, 'best': {}})


def test_tune_skip_done_trains_nothing_it_already_holds(tmp_path):
  out = tmp_path / 'tuning.json'
  run = {'name': 'ssa_lr0.001', 'variant': 'ssa', 'tag': '', 'lr': 1e-3, 'set': {},
         'validation_accuracy': 50.0, 'test_accuracy': 49.0, 'wall_time_s': 10.0}
  doc = {'epochs': 3, 'validation_size': 5000, 'dataset': 'cifar10', 'model': 'small_conv',
         'runs': [run], 'best': tune.best([run])}
  out.write_text(json.dumps(doc))
  p = subprocess.run([sys.executable, '-m', 'experiments.tune', '--skip_done', '--variants=ssa',
                      '--lrs=1e-3', f'--rundir={tmp_path}/runs', f'--out={out}'],
                     capture_output=True, text=True, timeout=120,
                     cwd=os.path.dirname(os.path.dirname(__file__)))
  assert p.returncode == 0, p.stderr
  assert p.stdout == f'ssa_lr0.001: kept from {out} (--skip_done)\n'
  assert not (tmp_path / 'runs').exists()  # nothing trained
  assert json.loads(out.read_text())['runs'] == [run]
