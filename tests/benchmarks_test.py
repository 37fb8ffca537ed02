"""The step benchmark: record fields, ratios, XLA statistics, rank search, CLI outputs.

No wall-clock limit is asserted anywhere: timings only have to exist and be positive.
"""
import json

import numpy as np
import pytest

from benchmarks import step
from configs import default

IMAGE_SHAPE, NUM_CLASSES = (8, 8, 3), 4
FIELDS = ('model', 'method', 'param_fraction', 'batch_size', 'device', 'step_time_median_s',
          'images_per_s', 'ratio_to_bp', 'temp_bytes', 'flops', 'argument_bytes', 'output_bytes',
          'param_bytes', 'opt_state_bytes', 'jax_version', 'jaxlib_version', 'cpu_count',
          'loadavg_start', 'loadavg_end', 'step_time_p25_s', 'step_time_p75_s')


def tiny_config(model='small_conv'):
  c = default.get_config()
  c.model.name = model
  c.model.kwargs = ({'features': (32, 32)} if model == 'mlp' else
                    {'widths': (4, 8, 8), 'hidden': 16})
  c.model.overrides = ''
  c.model.im2col_positions = 0        # every conv an HLO convolution, with XLA's gradients:
  c.model.conv_kernel_grad = 'xla'    # the conv counts below are about the method's structure
  c.opt.warmup_steps = 0
  return c


@pytest.fixture(scope='module')
def records():
  return step.benchmark(tiny_config(), ('bp', 'svd_bp', 'dfa', 'ssa'), (0.5,), batch_size=8,
                        steps=2, rounds=2, warmup=1, image_shape=IMAGE_SHAPE,
                        num_classes=NUM_CLASSES, log=lambda _: None)


def test_records_have_the_fields_and_sane_values(records):
  assert [r['method'] for r in records] == ['bp', 'svd_bp', 'dfa', 'ssa']
  for r in records:
    assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
    assert r['model'] == 'small_conv' and r['batch_size'] == 8
    assert r['step_time_median_s'] > 0 and r['images_per_s'] > 0
    assert len(r['step_time_round_medians_s']) == 2
    for k in ('flops', 'temp_bytes', 'argument_bytes', 'output_bytes', 'param_bytes',
              'opt_state_bytes'):
      assert r[k] > 0, (r['method'], k)
  json.dumps(records)  # serialisable as is


def test_ratios_and_param_fractions(records):
  by = {r['method']: r for r in records}
  assert by['bp']['ratio_to_bp'] == 1.0 and by['bp']['flops_ratio_to_bp'] == 1.0
  assert by['svd_bp']['ratio_to_svd_bp'] == 1.0
  assert by['dfa']['ratio_to_svd_bp'] is None  # a dense method has no factored twin
  for m in ('bp', 'dfa'):
    assert by[m]['param_fraction'] == 1.0 and by[m]['rank'] is None
  for m in ('svd_bp', 'ssa'):
    assert by[m]['target_param_fraction'] == 0.5
    assert 0.3 < by[m]['param_fraction'] < 0.7  # tiny layers: coarse rank steps
    assert by[m]['layer_ranks'] and by[m]['rank'] == by['svd_bp']['rank']
  np.testing.assert_allclose(by['ssa']['ratio_to_bp'],
                             by['ssa']['step_time_median_s'] / by['bp']['step_time_median_s'])


def test_local_steps_have_fewer_flops_than_backprop_on_the_same_weights(records):
  # structural: no input gradient between blocks (not a timing claim)
  by = {r['method']: r for r in records}
  assert by['dfa']['flops'] < by['bp']['flops']
  assert by['dfa']['hlo_convolutions'] < by['bp']['hlo_convolutions']
  assert by['ssa']['hlo_convolutions'] < by['svd_bp']['hlo_convolutions']


@pytest.mark.parametrize('fraction', [0.5, 0.25])
def test_rank_search_hits_the_parameter_fraction(fraction):
  c = tiny_config('mlp')
  rank, got = step.rank_for_fraction(c, fraction, IMAGE_SHAPE, NUM_CLASSES)
  assert 0 < rank <= 1 and abs(got - fraction) < 0.05
  dense = step.count_params(step.with_fields(c, dfa__method='bp'), IMAGE_SHAPE, NUM_CLASSES)
  svd = step.count_params(step.with_fields(c, dfa__method='ssa', model__rank=rank), IMAGE_SHAPE,
                          NUM_CLASSES)
  assert svd / dense == pytest.approx(got)


def test_unreachable_fraction_is_a_clear_error():
  c = tiny_config('mlp')
  c.model.overrides = 'dense1:dense'  # the 192x32 input layer alone is most of the params
  with pytest.raises(ValueError, match='out of reach'):
    step.rank_for_fraction(c, 0.01, IMAGE_SHAPE, NUM_CLASSES)


def test_cli_writes_json_and_markdown(tmp_path):
  out = tmp_path / 'r.json'
  step.main(['--models=mlp', '--methods=bp,dfa', '--batch_size=4', '--steps=1', '--rounds=1',
             '--warmup=0', '--dataset=cifar10', '--set', 'model.kwargs={"features": (16,)}',
             f'--out={out}'])
  recs = json.loads(out.read_text())
  assert [r['method'] for r in recs] == ['bp', 'dfa']
  assert recs[0]['image_shape'] == [32, 32, 3]
  md = (tmp_path / 'r.md').read_text()
  assert '| mlp | dfa |' in md and 'Command: `python -m benchmarks.step --models=mlp' in md
  # --render rewrites the markdown from the JSON alone
  (tmp_path / 'r.md').unlink()
  step.main([f'--render={out}'])
  assert (tmp_path / 'r.md').read_text() == md


def test_profile_reads_instruction_names_from_hlo():
  import jax
  import jax.numpy as jnp
  from benchmarks import profile
  compiled = jax.jit(lambda x: jnp.tanh(x @ x.T).sum()).lower(jnp.ones((4, 3))).compile()
  instrs = profile.hlo_instructions(compiled.as_text())
  assert any(i['opcode'] in ('dot', 'fusion', 'custom-call') for i in instrs.values())
  assert all({'type', 'opcode', 'op_name'} <= set(i) for i in instrs.values())


def test_conv_benchmark_compares_both_forms_and_marks_the_library_choice(tmp_path, capsys):
  from benchmarks import conv
  out = tmp_path / 'conv.json'
  doc = conv.main(['--shapes=2x2x8,8x8x4,12x12x8:40,6x6x3:32', '--batch_size=4', '--steps=1',
                   '--rounds=2', f'--out={out}'])
  assert [r['library_form'] for r in doc['records']] == ['im2col', 'xla', 'gemm', 'im2col_gemm']
  assert [r['features'] for r in doc['records']] == [8, 4, 40, 32]
  for r in doc['records']:
    for form in conv.FORMS[1:]:
      assert r['lax_ms'] > 0 and r[f'{form}_ms'] > 0
      assert np.isclose(r[f'{form}_over_lax'], r[f'{form}_ms'] / r['lax_ms'])
  assert json.loads(out.read_text())['records'][0]['shape'] == [2, 2, 8]
  md = (tmp_path / 'conv.md').read_text()
  assert '| 2×2×8 |' in md and 'im2col |' in md and 'benchmarks.conv --shapes=2x2x8' in md
  table = [line for line in md.splitlines() if line.startswith('|')]
  assert len({line.count('|') for line in table}) == 1  # header, separator and rows agree
  (tmp_path / 'conv.md').unlink()
  conv.main([f'--render={out}'])
  assert (tmp_path / 'conv.md').read_text() == md
  with pytest.raises(SystemExit):
    conv.main(['--shapes=2x2'])
  assert 'give HxWxC maps' in capsys.readouterr().err


def test_conv_layers_benchmark_times_each_factored_conv_shape_once(tmp_path, capsys):
  from benchmarks import conv_layers
  out = tmp_path / 'layers.json'
  doc = conv_layers.main(['--models=resnet20', '--ranks=0.25', '--batch_size=2', '--steps=1',
                          '--rounds=1', f'--out={out}'])
  (m,) = doc['models']
  shapes = m['shapes']
  # ResNet-20: 18 factored 3×3 convs in 5 distinct shapes (two stride-2 entries to a stage)
  assert sum(r['count'] for r in shapes) == 18 and len(shapes) == 5
  assert [r['auto'] for r in shapes] == ['kernel'] + ['factored'] * 4  # only 16 -> 16 channels
  for r in shapes:
    assert r['factored_ms'] > 0 and r['kernel_ms'] > 0 and r['count'] == len(r['layers'])
  t = m['total_ms']
  assert np.isclose(t['factored'], sum(r['count'] * r['factored_ms'] for r in shapes))
  assert t['best'] <= min(t['factored'], t['kernel'], t['auto']) + 1e-9
  assert abs(m['param_fraction'] - 0.25) < 0.02
  assert json.loads(out.read_text())['models'][0]['model'] == 'resnet20'
  assert '| 32×32×16 | 16 | 1 |' in (tmp_path / 'layers.md').read_text()
  with pytest.raises(SystemExit):
    conv_layers.main(['--ranks=2'])
  assert 'fraction of the dense parameters' in capsys.readouterr().err


def test_peak_rss_of_real_runs_per_method(tmp_path):
  from benchmarks import rss
  out = tmp_path / 'rss.json'
  # one XLA scheduler and no angle step: one compile of the step per run, not up to six
  # ('auto' compiles each of the train step and the angle step's two updates twice)
  doc = rss.main(['--config=configs/cifar10.py:smoke', '--methods=bp,ssa', '--steps=2',
                  '--set=train.xla_scheduler=default', '--set=train.angle_every=0',
                  f'--out={out}'])
  assert [r['method'] for r in doc['records']] == ['bp', 'ssa']
  bp, ssa = doc['records']
  assert bp['ratio_to_bp'] == 1.0 and ssa['ratio_to_bp'] == ssa['peak_rss_mib'] / bp['peak_rss_mib']
  assert all(100 < r['peak_rss_mib'] < 24 * 1024 and r['wall_s'] > 0 for r in doc['records'])
  assert json.loads(out.read_text())['records'] == doc['records']
  assert '| ssa |' in (tmp_path / 'rss.md').read_text()
  with pytest.raises(SystemExit):
    rss.main(['--methods=ssa'])  # no bp to compare with
  with pytest.raises(RuntimeError, match='exit code'):
    rss.run_peak_rss('configs/cifar10.py:smoke', 'ssa', 1, ['dfa.align=sideways'])


def test_stacked_blocks_give_the_unrolled_update(tmp_path, capsys):
  import jax
  import jax.numpy as jnp

  from benchmarks import stacked_blocks
  from lrdfa_jax import models
  out = tmp_path / 'stacked.json'
  doc = stacked_blocks.main(['--model=resnet32', '--width=0.25', '--batch_size=2', '--steps=1',
                             '--rounds=2', '--stages=2', f'--out={out}'])
  # ResNet-32: 5 blocks a stage, the 4 after the first share a shape; stage 2 is 32 × 0.25 wide
  assert [(r['stage'], r['blocks'], r['map']) for r in doc['records']] == [(2, 4, [16, 16, 8])]
  model = models.build_model('resnet20', num_classes=10, rank=0.25, width=0.25)
  blocks = stacked_blocks.stage_blocks(model)
  assert blocks == {s: [f'stage{s}_block1', f'stage{s}_block2'] for s in (1, 2, 3)}
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  block = jax.eval_shape(lambda: stacked_blocks.stage_block(model, 2, 'stage2_block1').init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 8)), True))
  for n in blocks[2]:  # the block on its own has the model's params and statistics
    for col in ('params', 'batch_stats'):
      assert jax.tree.map(lambda a: a.shape, params[col][n]) == \
          jax.tree.map(lambda a: a.shape, block[col])
  for r in doc['records']:
    assert r['max_relative_difference'] < 1e-4, r  # one vmap = the blocks one by one
    assert r['max_difference_leaf'].startswith('[')  # updates and BN statistics compared
    assert r['unrolled_ms'] > 0 and r['stacked_ms'] > 0
    assert np.isclose(r['stacked_over_unrolled'], r['stacked_ms'] / r['unrolled_ms'])
  assert '| resnet32 | 2 | 4 | 16×16×8 |' in (tmp_path / 'stacked.md').read_text()
  with pytest.raises(SystemExit):
    stacked_blocks.main(['--model=vgg13'])
  assert 'choose one of resnet20' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    stacked_blocks.main(['--model=resnet20', '--stages=4'])
  assert 'resnet20 has stages [1, 2, 3]' in capsys.readouterr().err


def test_target_table_checks_local_signal_memory_flat_in_depth():
  """The depth sweep's memory targets (local signal): ResNet-56 ≤ 0.2× bp, ≤ 1.2× ResNet-20."""
  def rec(model, method, temp, ratio, signal='local'):
    return {'model': model, 'method': method, 'temp_bytes': temp, 'temp_ratio_to_bp': ratio,
            'config': {'signal': signal}, 'param_fraction': 0.25, 'target_param_fraction': None}
  good = [rec('resnet20', 'ssa', 100, 0.38), rec('resnet56', 'ssa', 110, 0.14)]
  table = step.target_table(good)
  assert ('| resnet56 | ssa temp bytes / bp temp bytes, local signal | 0.14 | ≤ 0.20 | yes |'
          in table)
  assert ('| resnet56 | ssa temp bytes / ResNet-20 ssa temp bytes, local signal | 1.10 | '
          '≤ 1.20 | yes |' in table)
  bad = step.target_table([rec('resnet20', 'ssa', 100, 0.5), rec('resnet56', 'ssa', 130, 0.27)])
  assert bad.count('**no**') == 2
  assert 'local signal' not in step.target_table(
      [rec('resnet56', 'ssa', 110, 0.14, signal='global')])
