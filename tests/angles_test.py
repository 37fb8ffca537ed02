"""experiments.angles: per-layer angle against accuracy, from exported summaries."""
import json

import numpy as np
import pytest

from experiments import angles


def fake_summary(seed, acc, conv1_angle, fc1_angle, epochs=2.0, steps=10):
  """A local run's exported summary: angles every 5 steps over `epochs` of `steps` steps; the
  first half of the measurements is far off, so only a tail average gives the set angle."""
  pts = range(5, int(epochs * steps) + 1, 5)
  def curve(a):
    return [[t, 170.0 if t <= epochs * steps / 2 else a + (1 if t % 10 else -1)] for t in pts]
  return {'model': 'small_conv', 'method': 'ssa', 'variant': f'v{seed}', 'seed': seed,
          'epochs': epochs, 'final_test_accuracy': acc, 'config': {'opt': {'lr': 1e-3}},
          'curves': {'steps_per_epoch': steps, 'test/accuracy': [[steps, acc]],
                     'angle/conv1': curve(conv1_angle), 'angle/conv1_bn': curve(10.0),
                     'angle/fc1': curve(fc1_angle), 'angle/head': curve(0.0)}}


def test_tail_mean_layers_and_rank_correlation(tmp_path):
  s = fake_summary(0, 60.0, 40.0, 50.0)
  assert angles.layers_of(s) == ['conv1', 'fc1']  # no BN companion, no head
  assert angles.run_angles(s, tail=0.5) == {'conv1': 40.0, 'fc1': 50.0}
  assert angles.run_angles(s, tail=1.0)['conv1'] == pytest.approx((2 * 170 + 41 + 39) / 4)
  s['curves']['angle/conv1'].insert(0, [0, 90.0])  # logged at step 0: counted at tail 1 only
  assert angles.run_angles(s, tail=1.0)['conv1'] == pytest.approx((90 + 2 * 170 + 41 + 39) / 5)
  assert angles.run_angles(s, tail=0.5)['conv1'] == 40.0
  folder = tmp_path / 'res'
  folder.mkdir()
  # conv1's angle falls as accuracy rises; fc1's is unrelated (equal in every run but one)
  for seed, (acc, a1, a2) in enumerate([(50, 80, 45), (55, 70, 60), (60, 60, 45), (70, 50, 45),
                                        (75, 30, 45)]):
    (folder / f'run{seed}.json').write_text(json.dumps(fake_summary(seed, acc, a1, a2)))
  (folder / 'bp.json').write_text(json.dumps(  # a bp run: no angles, not a row
      {**fake_summary(9, 80.0, 0, 0), 'curves': {'steps_per_epoch': 10}}))
  rows = angles.collect([str(folder)], epochs=2.0, tail=0.5)
  assert len(rows) == 5 and angles.collect([str(folder)], epochs=10.0, tail=0.5) == []
  corr = angles.correlations(rows)
  assert corr['conv1']['rho'] == pytest.approx(-1.0) and corr['conv1']['n'] == 5
  assert abs(corr['fc1']['rho']) < 0.5
  for r in rows:  # a layer whose angle is the same in every run has no rank correlation
    r['angles']['fc1'] = 45.0
  assert set(angles.correlations(rows)) == {'conv1'}
  rows = angles.collect([str(folder)], epochs=2.0, tail=0.5)
  out = tmp_path / 'out' / 'angles.md'
  md = angles.main([f'--folders={folder}', '--epochs=2', f'--out={out}'])
  assert out.read_text() == md
  assert '| conv1 | -1.00 |' in md and '| v4 | 0.001 | 4 | 2 | 75.00 | 30 | 45 |' in md
  assert (tmp_path / 'out' / 'angles.png').stat().st_size > 0
  assert np.isfinite(corr['fc1']['p'])


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
  with pytest.raises(ValueError, match='is not a results folder'):
    angles.write_report([str(tmp_path / 'missing')])
  with pytest.raises(ValueError, match='fewer than 3 local runs'):
    angles.write_report([str(tmp_path)])
  with pytest.raises(ValueError, match='--tail must be in'):
    angles.write_report([str(tmp_path)], tail=0.0)
  with pytest.raises(SystemExit):  # the command line: one line, no traceback
    angles.main([])
  assert 'error: --folders=FOLDER[,FOLDER...] is required.' in capsys.readouterr().err



def test_it_imports_beside_the_absl_entry_points():
  """absl flags are global (tune and report define --epochs, --results): angles takes argparse
  flags, so a process (this suite, a notebook) can import it with them."""
  import pathlib
  import re

  from experiments import report, tune  # noqa: F401
  folder = pathlib.Path(__file__).parent.parent / 'results' / 'cifar10_small_conv_local'
  md = angles.main([f'--folders={folder}', '--epochs=10'])  # the committed local runs
  assert re.search(r'^\| conv3 \| [+-]\d\.\d\d \| \d\.\d{3} \| \d+ \|$', md, re.M), md
