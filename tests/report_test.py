"""experiments.report: export of run dirs, the mean ± std table, plots."""
import json
import os

import numpy as np
import pytest
from absl import app

from experiments import report
from lrdfa_jax import train
from tests.train_test import tiny_config


def test_export_table_and_plots(tmp_path):
  runs = {}
  for name, method, seed in [('a', 'ssa', 0), ('b', 'ssa', 1), ('c', 'bp', 0)]:
    c = tiny_config(method, train__epochs=1, train__seed=seed, train__angle_every=3,
                    dfa__delivery='full')
    runs[name] = train.train_and_evaluate(c, str(tmp_path / 'runs' / name))
  out = tmp_path / 'results'
  for name in runs:
    report.export_run(str(tmp_path / 'runs' / name), str(out))
  results = report.load_results(str(out))
  assert len(results) == 3
  s = next(r for r in results if r['method'] == 'ssa' and r['seed'] == 0)
  for k in ('model', 'dataset', 'method', 'seed', 'final_test_accuracy', 'trainable_params',
            'epochs', 'wall_time_s', 'machine', 'config'):
    assert k in s
  assert s['curves']['test/accuracy'][-1][1] == s['final_test_accuracy']
  logged = [r['train/accuracy'] for r in report.read_jsonl(
      str(tmp_path / 'runs' / 'a' / 'metrics.jsonl')) if 'train/accuracy' in r]
  assert logged and s['curves']['train/accuracy'] == [[s['step'], pytest.approx(np.mean(logged))]]
  assert len(s['curves']['train/loss']) == 1
  md = report.table(results)
  accs = [runs['a']['final_test_accuracy'], runs['b']['final_test_accuracy']]
  row = next(l for l in md.splitlines() if l.startswith('| ssa rank 0.5 |'))  # tiny_config's
  assert f'{np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f}' in row
  assert '| 2 |' in row and '| 0.003 |' in row  # tiny_config's learning rate
  paths = report.plot(results, str(out))
  assert [os.path.basename(p) for p in paths] == ['accuracy.png', 'angles.png']
  assert all(os.path.getsize(p) > 1000 for p in paths)
  # a method at two sizes (a rank-reduced run): the accuracy-vs-parameters plot, and the
  # table gives the range of final sizes of one variant's seeds
  small = dict(s, trainable_params=s['trainable_params'] // 3,
               initial_trainable_params=s['trainable_params'])
  paths = report.plot(results + [small], str(out))
  assert os.path.basename(paths[-1]) == 'params.png' and os.path.getsize(paths[-1]) > 1000
  row = next(l for l in report.table(results + [small]).splitlines()
             if l.startswith('| ssa rank 0.5 |'))
  assert f'| {small["trainable_params"]:,}–{s["trainable_params"]:,} |' in row


def test_variant_labels():
  base = tiny_config('ssa')
  base.dfa.delivery = 'full'
  s = {'method': 'ssa', 'config': json.loads(base.to_json())}
  assert report.variant(s) == 'ssa rank 0.5'  # tiny_config's rank, not the default 1/4
  s['config']['model']['rank'] = 0.25
  assert report.variant(s) == 'ssa'
  s['config']['rank'].update(epochs=[3, 6], energy=0.9)
  s['config']['dfa']['hoyer_weight'] = 0.01
  assert report.variant(s) == 'ssa rank 0.25 reduced at epochs 3, 6 (energy 0.9) + Hoyer 0.01'
  s['config']['opt']['factor_lr_scale'] = 0.3
  assert report.variant(s).endswith('+ Hoyer 0.01 (factor lr ×0.3)')
  s['config']['opt']['factor_lr_scale'] = 1.0
  s['config']['rank'].update(epochs=[])
  s['config']['dfa']['hoyer_weight'] = 0.0
  s['config']['dfa']['orth_weight'] = 0.0
  assert report.variant(s) == 'ssa −orth'
  s['config']['dfa']['align'] = 'none'
  assert report.variant(s) == 'ssa −align −orth'
  s['config']['dfa'].update(align='subspace', orth_weight=0.1, delivery='channel')
  assert report.variant(s) == 'ssa (channel-broadcast feedback)'
  s['config']['dfa'].update(delivery='full')
  assert report.variant(s) == 'ssa'
  s['config']['dfa'].update(signal='local', delivery='channel')
  assert report.variant(s) == 'ssa + local error'
  s['config']['dfa'].update(sim_weight=0.99)
  assert report.variant(s) == 'ssa + local error + sim'
  s['config']['dfa'].update(learn_feedback='local')  # at the config's feedback_lr 1e-4
  assert report.variant(s) == 'ssa + local error + sim + learned readout (readout lr 0.0001)'
  s['config']['dfa'].update(feedback_lr=1e-3)  # the variants' rate: unmarked
  assert report.variant(s) == 'ssa + local error + sim + learned readout'
  s['config']['dfa'].update(feedback_lr=3e-3)
  assert report.variant(s) == 'ssa + local error + sim + learned readout (readout lr 0.003)'
  s['config']['dfa'].update(feedback_lr=1e-3, readout_dim=2048)
  assert report.variant(s) == 'ssa + local error (readout ≤ 2048) + sim + learned readout'
  s['config']['dfa'].update(readout_dim=512, readout_layers=2)
  assert report.variant(s) == 'ssa + local error (readout MLP, 2 hidden) + sim + learned readout'
  s['config']['dfa'].update(readout_layers=0, bp_blocks=['conv2'])
  assert report.variant(s) == 'ssa + local error + sim + learned readout (backprop on conv2)'
  s['config']['dfa'].update(bp_blocks=[], modules='conv1+conv2,conv3+fc1+head')
  assert report.variant(s) == ('ssa + local error + sim + learned readout '
                               '(modules conv1+conv2, conv3+fc1+head)')
  assert report.file_stem({'model': 'small_conv', 'seed': 0, 'variant': report.variant(s)}) == \
      'small_conv_ssa_local_error_sim_learned_readout_modules_conv1+conv2_conv3+fc1+head_seed0'
  s['config']['dfa'].update(overlap=True)
  assert report.variant(s).endswith('(modules conv1+conv2, conv3+fc1+head) + overlap')
  s['config']['dfa'].update(overlap=False, recon_weight=0.5)
  assert report.variant(s).startswith('ssa + local error + sim + reconstruction 0.5 + learned')
  s['config']['dfa'].update(recon_size=16)  # two sizes are two rows and two files
  assert ' + reconstruction 0.5 (to 16×16) + learned' in report.variant(s)
  s['config']['dfa'].update(recon_size=0)
  s['config']['dfa'].update(readout_dim=2048, recon_weight=0.0)
  assert report.file_stem({'model': 'small_conv', 'seed': 1, 'variant': report.variant(s)}) == (
      'small_conv_ssa_local_error_readout_max2048_sim_learned_readout_modules_conv1+conv2_'
      'conv3+fc1+head_seed1')  # ASCII file names
  s['config']['dfa'].update(modules='conv1+stage1_*,stage2_*')
  assert report.file_stem({'model': 'resnet20', 'seed': 0, 'variant': report.variant(s)}).endswith(
      'modules_conv1+stage1_all_stage2_all_seed0')  # no glob characters
  row = {'variant': report.variant(s), 'final_test_accuracy': 50.0, 'trainable_params': 10,
         'epochs': 1, 'wall_time_s': 1.0, 'machine': 'm', 'config': s['config']}
  line = report.table([row]).splitlines()[2]  # the pattern's * is no markdown emphasis
  assert r'(modules conv1+stage1_\*, stage2_\*) | 1 | 50.00 |' in line, line
  s['config']['dfa'].update(learn_feedback='none', modules='', readout_dim=512)
  s['config']['model'].update(kwargs={'norm': 'batch'}, act='leaky_relu')
  assert report.variant(s) == 'ssa + local error + sim (BN, leaky_relu)'
  s['method'] = 'bp'
  assert report.variant(s) == 'bp (BN, leaky_relu)'  # the model differs for every method
  s['config']['model'].update(kwargs={})
  assert report.variant(s) == 'bp'


def test_protocol_variants_share_one_pipeline(tmp_path):
  from experiments import variants as protocol
  base = protocol.config_for('bp', 0, 10).to_dict()
  for name in protocol.VARIANTS:
    if not protocol.applies(name, 'small_conv'):  # one module per ResNet stage
      assert name in protocol.ONLY_ON and 'stages' in name
      assert protocol.applies(name, 'resnet20')
      continue
    c = protocol.config_for(name, 1, 10).to_dict()
    assert c['train']['epochs'] == 10 and c['train']['seed'] == 1
    for section in ('data', 'opt', 'model'):
      if section == 'model' and name.endswith('_bn'):  # the BN + LeakyReLU SmallConv
        assert c['model']['kwargs'] == {'norm': 'batch'} and c['model']['act'] == 'leaky_relu'
        continue
      if section == 'model' and ('_r8' in name or '_r2' in name or '_reduce' in name):  # ranks
        assert {k: v for k, v in c['model'].items() if k != 'rank'} == \
            {k: v for k, v in base['model'].items() if k != 'rank'}
        assert c['model']['rank'] == (0.125 if '_r8' in name else 0.5)
        continue
      assert c[section] == base[section], (name, section)
    if name.endswith('_reduce_h01'):  # the held-out probe's recipe
      assert c['rank']['epochs'] == (3, 6) and c['rank']['energy'] == protocol.PROBED_ENERGY
      assert c['dfa']['hoyer_weight'] == protocol.PROBED_HOYER
    elif '_reduce' in name:
      assert c['rank']['epochs'] == (3, 6) and c['rank']['energy'] == protocol.REDUCE_ENERGY
      assert c['dfa']['hoyer_weight'] == (protocol.HOYER_WEIGHT if 'hoyer' in name else 0.0)
    else:
      assert c['rank'] == base['rank'] and not c['dfa']['hoyer_weight'], name
    assert {k: v for k, v in c['train'].items() if k != 'seed'} == \
        {k: v for k, v in base['train'].items() if k != 'seed'}
  assert protocol.config_for('ssa_noorth', 0, 10).dfa.orth_weight == 0.0
  diag = protocol.config_for('ssa_local_pred_bp_conv2_bn', 0, 10).to_dict()  # the diagnosis
  plain = protocol.config_for('ssa_local_pred_bn', 0, 10).to_dict()
  assert diag['dfa'].pop('bp_blocks') == ('conv2',) and plain['dfa'].pop('bp_blocks') == ()
  assert diag == plain
  k2 = protocol.config_for('ssa_local_pred_k2_bn', 0, 10).to_dict()  # block-wise backprop
  assert k2['dfa'].pop('modules') == 'conv1+conv2,conv3+fc1+head'
  assert k2['dfa'].pop('bp_blocks') == ()
  assert k2 == {**plain, 'dfa': {k: v for k, v in plain['dfa'].items() if k != 'modules'}}
  c100 = protocol.config_for('ssa', 0, 10, dataset='cifar100').to_dict()  # CIFAR-100 (re-split)
  assert c100['data'] == base['data'] | {'name': 'cifar100'} and base['data']['name'] == 'cifar10'
  assert {k: v for k, v in c100.items() if k != 'data'} == \
      {k: v for k, v in protocol.config_for('ssa', 0, 10).to_dict().items() if k != 'data'}
  with pytest.raises(ValueError, match='not one of cifar10, cifar100'):
    protocol.config_for('ssa', 0, 10, dataset='mnist')
  from configs import zoo  # a zoo net: its run card with the variant's fields
  r20 = protocol.config_for('ssa_local_pred', 1, 10, 'cifar100', model='resnet20').to_dict()
  card = zoo.get_config('resnet20,cifar100').to_dict()
  assert r20['dfa'] == card['dfa'] | {'method': 'ssa', 'signal': 'local', 'learn_feedback': 'local',
                                      'feedback_lr': 1e-3, 'feedback_lr_decay': 1.0}
  assert r20['model'] == card['model'] and r20['data'] == card['data'] and r20['opt'] == card['opt']
  assert r20['train'] == card['train'] | {'seed': 1, 'epochs': 10, 'progress_bar': False}
  half = protocol.config_for('ssa_local_pred_k2_stages_overlap_r2', 0, 10, model='resnet32')
  k2 = protocol.config_for('ssa_local_pred_k2_stages_overlap', 0, 10, model='resnet32')
  assert half.model.rank == 0.5 and k2.model.rank == card['model']['rank'] == 0.25
  assert half.model.overrides == k2.model.overrides and half.dfa == k2.dfa  # rank only
  dense = protocol.config_for('dfa_local_pred_k2_stages_overlap', 0, 10, model='resnet32')
  assert dense.dfa.method == 'dfa' and dense.model == k2.model  # the method only: dense layers
  assert dense.dfa.to_dict() | {'method': 'ssa'} == k2.dfa.to_dict()
  tuning = tmp_path / 'tuning.json'  # the rank-1/2 and dense variants take their base's rate
  tuning.write_text(json.dumps({'best': {'ssa_local_pred_k2_stages_overlap': {'lr': 3e-3},
                                         'svd_bp': {'lr': 6e-3}}}))
  assert protocol.chosen_lr(str(tuning), 'ssa_local_pred_k2_stages_overlap_r2') == 3e-3
  assert protocol.chosen_lr(str(tuning), 'svd_bp_r2') == 6e-3
  assert protocol.chosen_lr(str(tuning), 'dfa_local_pred_k2_stages_overlap') == 3e-3
  with pytest.raises(ValueError,
                     match="sets model.act, model.kwargs of SmallConv.*'ssa_local_pred'"):
    protocol.config_for('ssa_local_pred_bn', 0, 10, model='resnet20')
  with pytest.raises(ValueError, match='not one of small_conv, resnet20'):
    protocol.config_for('ssa', 0, 10, model='resnet18')
  with pytest.raises(ValueError, match=r"applies to resnet20, resnet32, resnet56, not "
                                       r"small_conv \(one module per ResNet stage"):
    protocol.check_variants(['ssa', 'ssa_local_pred_stages'], 'small_conv')
  with pytest.raises(ValueError, match="'ssa_nope' is no variant"):
    protocol.check_variants(['ssa_nope'], 'small_conv')
  # the variants whose fields name blocks pass setup's checks on every model they apply to
  from lrdfa_jax import build
  for name, (fields, _) in protocol.VARIANTS.items():
    if fields.get('dfa.modules') or fields.get('dfa.bp_blocks'):
      for model in ('small_conv', 'resnet20'):
        if protocol.applies(name, model):
          build.validate(protocol.config_for(name, 0, 1, model=model))
  assert protocol.config_for('ssa_noalign', 0, 10).dfa.align == 'none'
  assert protocol.config_for('ssa', 0, 10).dfa.delivery == 'full'
  for name in ('ssa_channel', 'dfa_channel', 'ssa_channel_noalign', 'ssa_channel_noorth'):
    c = protocol.config_for(name, 0, 10)
    assert c.dfa.delivery == 'channel' and c.dfa.method == name.split('_')[0], name
  assert protocol.config_for('ssa_channel_noalign', 0, 10).dfa.align == 'none'
  assert protocol.config_for('ssa_channel_noorth', 0, 10).dfa.orth_weight == 0.0
  assert set(protocol.BASE) <= set(protocol.VARIANTS)
  for name in ('ssa_local', 'dfa_local', 'ssa_local_sim', 'ssa_local_bn'):
    c = protocol.config_for(name, 0, 10)
    assert c.dfa.signal == 'local' and c.dfa.method == name.split('_')[0], name
  assert protocol.config_for('ssa_local_sim', 0, 10).dfa.sim_weight == 0.99
  wide = protocol.config_for('ssa_local_pred_wide_bn', 0, 10)
  assert wide.dfa.readout_dim == protocol.WIDE_READOUT and wide.dfa.learn_feedback == 'local'
  assert protocol.config_differences(json.loads(wide.to_json()), json.loads(
      protocol.config_for('ssa_local_pred_bn', 0, 10).to_json())) == [
          f'dfa.readout_dim: {protocol.WIDE_READOUT} there, 512 now']
  assert protocol.config_for('ssa_mixed', 0, 10).dfa.signal == 'mixed'
  mlp = protocol.config_for('ssa_local_mlp_bn', 0, 10)
  assert protocol.config_differences(json.loads(mlp.to_json()), json.loads(
      protocol.config_for('ssa_local_pred_bn', 0, 10).to_json())) == [
          f'dfa.readout_layers: {protocol.READOUT_LAYERS} there, 0 now']


def test_finished_runs_are_reused_only_with_their_config(tmp_path):
  from experiments import variants
  c = variants.config_for('ssa', 0, 10)
  assert variants.finished_summary(str(tmp_path), c) is None  # nothing there
  old = variants.config_for('ssa_channel', 0, 10)
  old.train.angle_every = 200  # monitoring only: not a different run
  (tmp_path / 'summary.json').write_text(json.dumps(
      {'final_test_accuracy': 50.0, 'config': json.loads(old.to_json())}))
  with pytest.raises(ValueError, match="dfa.delivery: 'channel' there, 'full' now"):
    variants.finished_summary(str(tmp_path), c)
  assert variants.finished_summary(str(tmp_path), variants.config_for('ssa_channel', 0, 10))
  bp_old = variants.config_for('bp', 0, 10)
  bp_old.dfa.delivery = 'channel'  # backprop never reads it
  (tmp_path / 'summary.json').write_text(json.dumps({'config': json.loads(bp_old.to_json())}))
  assert variants.finished_summary(str(tmp_path), variants.config_for('bp', 0, 10))
  bp = variants.config_for('bp', 0, 10)
  bp.opt.lr = 3e-3
  with pytest.raises(ValueError, match='opt.lr'):
    variants.finished_summary(str(tmp_path), bp)


def test_tuning_choice_and_overrides(tmp_path):
  from experiments import tune, variants
  runs = [dict(variant='ssa', tag='', lr=lr, validation_accuracy=acc)
          for lr, acc in [(3e-4, 40.0), (1e-3, 47.5), (3e-3, 45.0)]]
  runs += [dict(variant='bp', tag='', lr=3e-4, validation_accuracy=60.0),
           dict(variant='ssa', tag='rank0.5', lr=1e-3, validation_accuracy=50.0)]
  best = tune.best(runs)
  assert best == {'bp': {'lr': 3e-4, 'validation_accuracy': 60.0},
                  'ssa': {'lr': 1e-3, 'validation_accuracy': 47.5},
                  'ssa/rank0.5': {'lr': 1e-3, 'validation_accuracy': 50.0}}
  path = tmp_path / 'tuning.json'
  path.write_text(json.dumps({'best': best}))
  assert variants.chosen_lr(str(path), 'ssa_noorth') == 1e-3  # ablations use their method's
  assert variants.chosen_lr(str(path), 'bp') == 3e-4
  assert variants.chosen_lr(str(path), 'dfa') is None
  assert variants.chosen_lr(str(path), 'ssa_channel') is None  # no choice of its own yet
  best['ssa_channel'] = {'lr': 5e-4, 'validation_accuracy': 45.0}
  path.write_text(json.dumps({'best': best}))
  assert variants.chosen_lr(str(path), 'ssa_channel_noorth') == 5e-4  # its base variant's
  assert variants.chosen_lr(str(path), 'ssa_noorth') == 1e-3
  assert variants.chosen_lr(str(tmp_path / 'missing.json'), 'bp') is None
  assert variants.tuned_model(str(path)) == 'small_conv'  # files from before --model
  path.write_text(json.dumps({'best': best, 'model': 'resnet20'}))
  assert variants.tuned_model(str(path)) == 'resnet20'
  assert variants.tuned_model(str(tmp_path / 'missing.json')) is None
  assert tune.parse_set(['model.rank=0.5', 'dfa.align=next', 'model.act=relu']) == {
      'model.rank': 0.5, 'dfa.align': 'next', 'model.act': 'relu'}
  with pytest.raises(ValueError, match='section.field'):
    tune.parse_set(['rank=0.5'])
  md = tune.markdown({'validation_size': 5000, 'epochs': 3, 'model': 'resnet20', 'runs': [],
                      'best': {}})
  assert md.startswith('Held-out tuning of resnet20 on cifar10: 5000 training images held out')
  # a new tuning file takes any model; an old one only its own
  fresh = str(tmp_path / 'r20' / 'tuning.json')
  assert tune.load(fresh, dataset='cifar10', model='resnet20') == {'runs': []}
  path.write_text(json.dumps({'runs': [], 'best': best}))  # from before 'model': SmallConv
  assert tune.load(str(path), dataset='cifar10', model='small_conv')['best'] == best
  with pytest.raises(app.UsageError, match='holds small_conv runs; pass another --out'):
    tune.load(str(path), dataset='cifar10', model='resnet20')
  with pytest.raises(app.UsageError, match='holds cifar10 runs'):
    tune.load(str(path), dataset='cifar100', model='small_conv')


@pytest.mark.parametrize('delivery,align', [('channel', 'subspace'), ('full', 'subspace'),
                                             ('full', 'channel_subspace')])
def test_term_scales_on_a_finished_run(tmp_path, delivery, align):
  from experiments import term_scales
  run = str(tmp_path / 'ssa')
  train.train_and_evaluate(tiny_config('ssa', train__epochs=1, dfa__delivery=delivery,
                                       dfa__align=align), run)
  out = term_scales.term_scales(run)
  assert out['step'] == 8  # tiny_config factors every layer
  assert set(out['layers']) == {'conv1', 'conv2', 'conv3', 'fc1', 'head'}
  # 8×8 images: conv3's tap is 1×1, so only conv1 and conv2 get full maps wider than channels
  aligned = {'conv1', 'conv2', 'conv3', 'fc1'} if (delivery, align) != ('full', 'subspace') \
      else {'conv3', 'fc1'}
  for k, v in out['layers'].items():
    assert v['u']['dfa'] > 0 and v['u']['bp'] > 0 and v['orth_error'] >= 0
    assert v['s']['orth'] == 0.0 and v['v']['align'] == 0.0  # terms touch only their factors
    assert (v['u']['align'] > 0) == (k in aligned)  # the head has no feedback
  shares = out['channel_top_k']
  assert set(shares) == (set() if delivery == 'channel' else {'conv1', 'conv2'})
  for v in shares.values():  # the top k directions hold at least their isotropic share
    assert v['isotropic'] - 1e-6 <= v['top_k_share'] <= 1 + 1e-6


def test_term_scales_measures_nested_layers_and_the_terms_the_run_trains(tmp_path):
  """A ResNet's factored convs sit inside blocks; an 'next' run with Hoyer trains those terms."""
  import ml_collections

  from experiments import term_scales
  run = str(tmp_path / 'resnet')
  c = tiny_config('ssa', train__epochs=1, dfa__align='next', dfa__hoyer_weight=0.1)
  c.model.name = 'resnet20'
  c.model.kwargs = ml_collections.ConfigDict(dict(width=0.25, stage_sizes=(1, 1),
                                                  widths=(16, 32)))
  train.train_and_evaluate(c, run)
  out = term_scales.term_scales(run)
  assert out['align_term'] == 'next' and out['hoyer_weight'] == 0.1
  nested = [k for k in out['layers'] if '/' in k]
  assert {'stage1_block0/conv1', 'stage2_block0/conv2'} <= set(nested), sorted(out['layers'])
  for k, v in out['layers'].items():
    assert v['u']['dfa'] > 0 and v['s']['hoyer'] > 0 and v['u']['hoyer'] == 0.0, k
  # 'next' pulls the input factor V of each block's reading layer: stage2's first conv reads
  # stage1's output
  assert out['layers']['stage2_block0/conv1']['v']['align'] > 0
  assert out['layers']['stage2_block0/conv1']['u']['align'] == 0.0


def test_train_curves_are_per_epoch_means_at_the_epochs_last_step():
  recs = [{'step': 0, 'angle/a': 1.0},  # no train record at step 0 counts
          {'step': 2, 'train/accuracy': 10.0, 'train/loss': 2.0},
          {'step': 4, 'train/accuracy': 30.0, 'train/loss': 1.0, 'epoch': 1.0},  # epoch 1's last
          {'step': 4, 'test/accuracy': 5.0},
          {'step': 6, 'train/accuracy': 40.0, 'train/loss': 0.7},
          {'step': 6, 'train/accuracy': 50.0, 'train/loss': 0.5}]  # logged again after a resume
  c = report.train_curves(recs, steps_per_epoch=4.0)
  assert c['train/accuracy'] == [[4, 20.0], [8, 50.0]]
  assert c['train/loss'] == [[4, 1.5], [8, 0.5]]
  assert report.train_curves([{'step': 3, 'test/accuracy': 1.0}], 4.0) == {}
  assert report.by_step(recs + [{'step': 1, 'train/loss': 9.0}], 'train/loss') == {
      1: 9.0, 2: 2.0, 4: 1.0, 6: 0.5}


def test_zoo_table_cells_come_from_matching_summaries(tmp_path):
  from experiments import zoo_table
  from experiments.variants import config_for

  def summary(v, model, dataset, seed, acc, epochs=10, lr=None):
    c = config_for(v, seed, epochs, dataset, model)
    c.opt.lr = lr or c.opt.lr
    return {'model': model, 'dataset': dataset, 'method': c.dfa.method, 'seed': seed,
            'epochs': float(epochs), 'final_test_accuracy': acc, 'machine': 'test host',
            'config': c.to_dict()}

  r20, vgg = tmp_path / 'r20', tmp_path / 'vgg'
  runs = {r20: [summary('bp', 'resnet20', 'cifar10', 0, 80.0),
                summary('bp', 'resnet20', 'cifar10', 1, 82.0),
                summary('bp', 'resnet20', 'cifar10', 2, 99.0, epochs=30),  # another protocol
                summary('svd_bp_r2', 'resnet20', 'cifar10', 0, 77.5, lr=3e-3),
                summary('ssa', 'resnet20', 'cifar100', 0, 11.0),  # another dataset
                summary('ssa_local_pred', 'resnet20', 'cifar10', 0, 44.5)],  # no row
          vgg: [summary('dfa', 'vgg13', 'cifar10', 0, 60.25)]}
  for folder, summaries in runs.items():
    folder.mkdir()
    for i, s in enumerate(summaries):
      (folder / f'{i}.json').write_text(json.dumps(s))
  columns = (('R20', str(r20), 'resnet20', 'cifar10'), ('VGG', str(vgg), 'vgg13', 'cifar10'))
  md = zoo_table.tables(columns)
  acc, rates = md.split('Learning rates')
  row = {l.split('`')[1]: [c.strip() for c in l.split('|')[2:-1]]
         for l in acc.splitlines() if l.startswith('| `')}
  assert row['bp'] == ['81.00 ± 1.41 (2 seeds)', 'not run']
  assert row['svd_bp_r2'] == ['77.50', 'not run']
  assert row['svd_bp'] == ['not run', 'not run']  # the rank-1/2 run is not the rank-1/4 row
  assert row['ssa'] == ['not run', 'not run']
  assert row['dfa'] == ['not run', '60.25']
  assert row['ssa_local_pred_k2_stages_overlap'] == ['not run', '—']  # per-stage: ResNets only
  assert '| `svd_bp_r2` | 0.003 |  |' in rates
  assert 'Machine: test host' in md
  others = md.split('no row shows')[1].strip().splitlines()[2:]
  assert others == ['- R20: ssa + local error + learned readout, seed 0, lr 0.001: 44.50']
  again = summary('svd_bp_r2', 'resnet20', 'cifar10', 0, 78.0, lr=1e-2)
  (r20 / 'again.json').write_text(json.dumps(again))
  with pytest.raises(app.UsageError, match='runs of svd_bp_r2 at rates 0.003, 0.01'):
    zoo_table.tables(columns)  # the same seed at another rate: not a second seed


def _recorded_fields_differ(recorded, card, path=''):
  """The fields a committed summary recorded whose value the card now sets differently (fields
  added to the library after the run are absent from the summary and not compared, and so is a
  field the card no longer has)."""
  out = []
  for key, value in recorded.items():
    if key not in card:
      continue
    if isinstance(value, dict) and isinstance(card[key], dict):
      out += _recorded_fields_differ(value, card[key], f'{path}{key}.')
    elif value != card[key]:
      out.append(f'{path}{key}: ran {value!r}, card {card[key]!r}')
  return out


# configs/zoo.py quotes its cells too, but from protocol runs of 10 epochs at each variant's rate,
# not of the card's own 100 epochs and rate, so it is not in this list
@pytest.mark.parametrize('card_name, summary_path', [
    ('cifar10', 'results/main_cifar10/small_conv_ssa_seed0.json'),
    ('cifar100', 'results/cifar100_small_conv/small_conv_ssa_seed0.json'),
])
def test_run_cards_quote_runs_of_their_own_config(card_name, summary_path):
  """A card's "expected" line quotes these runs, so the card must be the config they ran."""
  import importlib
  card = json.loads(json.dumps(importlib.import_module(f'configs.{card_name}').get_config()
                               .to_dict()))  # tuples as JSON lists, as in the summary
  with open(summary_path) as f:
    recorded = json.load(f)['config']
  recorded['train'].pop('progress_bar')  # the protocol turns the bar off; output only
  assert _recorded_fields_differ(recorded, card) == []
  assert recorded['data']['name'] == card_name and recorded['dfa']['method'] == 'ssa'
