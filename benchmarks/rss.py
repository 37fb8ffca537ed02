r"""Peak resident memory of a real training run, per method, as ratios to backprop.

  python -m benchmarks.rss --config=configs/cifar10.py --methods=bp,svd_bp,dfa,ssa --steps=50 \
      --out=benchmarks/results/cpu_rss_small_conv.json
  python -m benchmarks.rss --config=configs/zoo.py:resnet56,cifar10 --steps=20 \
      --set=dfa.signal=local --out=...          # any config field, as --config.FIELD would

Each method trains in its own process (``python -m experiments.main`` on the config as given,
``train.stop_after_steps`` steps, a temporary workdir that is deleted afterwards), one after
the other, and the process's peak resident set size is read from the kernel when it ends
(``os.wait4``: ``ru_maxrss``). That figure is everything the run held at its peak: the Python
and XLA runtime, the decoded dataset and its batches, parameters, optimizer state, the
compiled programs and their temporaries (the final evaluation included), so differences between
methods are smaller than those of XLA's ``memory_analysis()`` estimate of one step
(``benchmarks.step``: ``temp_bytes``), which counts the step's temporaries only. Peak RSS does
not depend on the machine's load; the wall times do.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from benchmarks.step import machine_info, print_and_save
from lrdfa_jax import steps as steps_lib


def run_peak_rss(config: str, method: str, steps: int,
                 sets: Sequence[str] = ()) -> dict[str, Any]:
  """Trains ``steps`` steps of ``method`` in a child process; its peak RSS and wall time."""
  with tempfile.TemporaryDirectory(prefix='lrdfa-rss-') as tmp:
    cmd = [sys.executable, '-m', 'experiments.main', f'--config={config}',
           f'--workdir={os.path.join(tmp, "run")}', f'--config.dfa.method={method}',
           f'--config.train.stop_after_steps={steps}', '--config.train.progress_bar=False',
           *[f'--config.{s}' for s in sets]]
    log_path = os.path.join(tmp, 'stderr.txt')
    start = datetime.datetime.now()
    with open(log_path, 'w') as log:
      child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
      _, status, usage = os.wait4(child.pid, 0)
    wall = (datetime.datetime.now() - start).total_seconds()
    code = os.waitstatus_to_exitcode(status)
    if code:
      with open(log_path) as f:
        tail = f.read()[-2000:]
      raise RuntimeError(f'{method}: `{shlex.join(cmd)}` failed with exit code {code}:\n{tail}')
  return {'method': method, 'steps': steps, 'peak_rss_mib': usage.ru_maxrss / 1024,
          'wall_s': wall, 'command': shlex.join(cmd[1:])}


def markdown(doc: dict[str, Any]) -> str:
  lines = [f'Peak RSS of a training run (`{doc["config"]}`, {doc["steps"]} steps, each method '
           f'in its own process; {doc["machine"]["cpu"]}, jax {doc["machine"]["jax_version"]}).',
           '', f'`{doc["command"]}`', '', '| method | peak RSS MiB | × bp | wall s |',
           '|---|---|---|---|']
  lines += [f'| {r["method"]} | {r["peak_rss_mib"]:.0f} | {r["ratio_to_bp"]:.2f} | '
            f'{r["wall_s"]:.0f} |' for r in doc['records']]
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog='python -m benchmarks.rss', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/cifar10.py', help='config file[:arg]')
  p.add_argument('--methods', default=','.join(steps_lib.METHODS))
  p.add_argument('--steps', type=int, default=50)
  p.add_argument('--set', action='append', default=[], metavar='SECTION.FIELD=VALUE')
  p.add_argument('--out', help='JSON path; the markdown goes next to it (.md)')
  args = p.parse_args(argv)
  methods = [m for m in args.methods.split(',') if m]
  bad = [m for m in methods if m not in steps_lib.METHODS]
  if bad or 'bp' not in methods:
    p.error(f'--methods needs bp (the reference) and only {", ".join(steps_lib.METHODS)}; '
            f'got {args.methods!r}.')
  if args.steps < 1:
    p.error('--steps must be >= 1.')
  command = 'python -m benchmarks.rss ' + shlex.join(argv if argv is not None else sys.argv[1:])
  records = [run_peak_rss(args.config, m, args.steps, args.set) for m in methods]
  bp = next(r for r in records if r['method'] == 'bp')
  for r in records:
    r['ratio_to_bp'] = r['peak_rss_mib'] / bp['peak_rss_mib']
  doc = {'config': args.config, 'steps': args.steps, 'sets': args.set, 'command': command,
         'machine': machine_info(), 'loadavg_end': list(os.getloadavg()),
         'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'records': records}
  md = markdown(doc)
  print_and_save(args.out, doc, md)
  return doc


if __name__ == '__main__':
  main()
