"""Any Flax Linen model built from ``nn.Dense`` / ``nn.Conv``, put on local learning in one call.

``convert(MyNet(), rank=0.25)`` returns a module with the contract of our zoo
(``docs/blocks.md``): ``apply(variables, *args, local=False, **kwargs) -> (logits, taps)``,
ready for :func:`lrdfa_jax.dfa.local_grads`, without editing ``MyNet``'s code. It works by
intercepting the model's module calls (``nn.intercept_methods``):

* every ``nn.Dense`` / ``nn.Conv`` (2-D, ungrouped) becomes its SVD twin
  (:func:`lrdfa_jax.layers.svd_dense` / :func:`~lrdfa_jax.layers.svd_conv`) at the rank that
  ``rank`` and ``overrides`` give its path (``models.layer_rank``: fnmatch patterns, last wins,
  ``'dense'`` keeps a layer dense; ``rank=None`` keeps every layer dense, for plain DFA).
  The factors live where the layer's ``kernel`` would (``params['Dense_0']['u']``). For
  layers defined inline (``@nn.compact``) they come from the same ``kernel_init`` sample and
  bias draw, so at full rank the converted model starts as the original; submodules passed as
  fields draw from another rng stream under the wrapper. :func:`factorize` of the original's
  params gives its function exactly, at full rank, for any layout;
* the model is cut into **blocks**, in call order: each such layer is a block, or, for the
  submodules that a ``blocks`` pattern names (a residual block), the whole submodule. Under
  ``local=True`` every block's input is ``stop_gradient``-ed, and a block's **tap** is the
  input of the block called after it: its output after whatever the model applies in between
  (BatchNorm, activation, pooling, flatten), so the DFA signal enters after the activation as
  in our models. The block called last is the output block; it gets the exact error ``e``.

Parameters that are not in a block (a BatchNorm between a conv and its activation) belong to
the block whose tap their output reaches. ``init`` checks the cut on its inputs: each tap's
cotangent must reach its own block's parameters and nothing another output reaches, so a
residual add or a branch that bypasses a cut is refused with a one-line error naming the
parameter and the fix (declare the submodule that holds the skip as a block).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lrdfa_jax import layers, models

Array = jax.Array
LOGITS = '<logits>'


def convert(module: nn.Module, *, rank: layers.Rank | None = 0.25, overrides: Any = None,
            split: str = 'channel', blocks: Sequence[str] = (), check: bool = True) -> 'Converted':
  """``module`` (unbound) with factored layers, cut blocks and taps; see the module docstring.

  Args:
    module: a Flax Linen module whose ``__call__`` returns the logits (one array).
    rank: every converted layer's rank: an int, a fraction of its full rank, ``'full'``, or
      ``None`` to keep every layer dense (plain DFA on the user's model).
    overrides: ``{pattern: rank | 'dense'}`` on layer paths (``'Dense_1'``,
      ``'ResBlock_0/Conv_0'``), or the config's ``'pattern:value,...'`` string.
    split: conv factorisation, ``'channel'`` or ``'spatial'`` (:mod:`lrdfa_jax.layers`).
    blocks: fnmatch patterns on submodule paths; each match is one block (its layers learn
      through the block's own vjp, a residual add inside it is fine).
    check: whether ``init`` verifies, on its inputs, that nothing crosses a cut.
  """
  if isinstance(overrides, str):
    from lrdfa_jax.build import parse_overrides  # the config's 'pattern:value,...' parser
    overrides = parse_overrides(overrides)
  layers.conv_full_rank((1, 1, 1, 1), split)  # validates split
  if not isinstance(module, nn.Module):
    raise TypeError(f'convert takes a Flax Linen module (e.g. MyNet()), got {type(module)}.')
  return Converted(module=module, rank=rank, overrides=tuple((overrides or {}).items()),
                   split=split, blocks=tuple(blocks), check=check)


def _is_layer(m: nn.Module) -> bool:
  return type(m) in (nn.Dense, nn.Conv)  # subclasses may change the math: left as they are


def _pairs(value) -> tuple[int, ...]:
  """A flax Conv window argument (None, an int, or one int per dim) as a tuple for 2-D."""
  if value is None:
    return (1, 1)
  if isinstance(value, int):
    return (value, value)
  return tuple(value)


def _conv_padding(m: nn.Conv, path: str):
  p = m.padding
  if isinstance(p, str):
    if p.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"convert: {path} has padding {p!r}, which the factored conv cannot run; "
                       f"keep it dense with overrides={{'{path}': 'dense'}}.")
    return p.upper()
  if isinstance(p, int):
    return [(p, p), (p, p)]
  return [(q, q) if isinstance(q, int) else tuple(q) for q in p]


class Converted(nn.Module):
  """The module :func:`convert` returns; its params are laid out as the user model's."""
  module: nn.Module
  rank: Any = 0.25
  overrides: tuple = ()
  split: str = 'channel'
  blocks: tuple = ()
  check: bool = True

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, local: bool = False, **kwargs):
    if isinstance(local, (set, frozenset)):
      raise ValueError('convert: a converted model cuts every block or none (local=True/False); '
                       'dfa.modules (block-wise backprop) needs a model of lrdfa_jax.models.')
    units: list[str] = []   # blocks in call order
    taps: dict[str, Array] = {}
    active: list[nn.Module] = []  # declared blocks being called (their own methods pass through)
    overrides = dict(self.overrides)

    def rel_path(m: nn.Module) -> tuple[str, ...]:
      names = []
      while m is not None and m is not self.module:
        names.append(m.name)
        m = m.parent
      return tuple(reversed(names))

    def in_block(path: tuple[str, ...]) -> bool:
      return any(fnmatch.fnmatchcase('/'.join(path[:i]), b)
                 for i in range(1, len(path)) for b in self.blocks)

    def interceptor(next_fun, call_args, call_kwargs, context):
      m, method = context.module, context.method_name
      if m is self.module or method.startswith('_') and method != '__call__' \
          or method == 'setup' or any(a is m for a in active):
        return next_fun(*call_args, **call_kwargs)
      rel = rel_path(m)
      path = '/'.join(rel)
      inside = in_block(rel)  # the outermost match is the block ('*' also matches '/')
      declared = not inside and any(fnmatch.fnmatchcase(path, b) for b in self.blocks)
      if not declared and method != '__call__':
        return next_fun(*call_args, **call_kwargs)
      if declared or (_is_layer(m) and not inside):
        if path in units:
          raise ValueError(f'convert: {path} is called twice; a block must run once per forward '
                           '(shared weights cannot be trained by a block-local rule).')
        if not call_args:
          raise ValueError(f'convert: {path} must take its input as the first positional '
                           'argument, so it can be cut.')
        x = call_args[0]
        if units:
          taps[units[-1]] = x
        units.append(path)
        call_args = (jax.lax.stop_gradient(x) if local else x, *call_args[1:])
      if declared:
        active.append(m)
        try:
          return next_fun(*call_args, **call_kwargs)
        finally:
          active.pop()
      y = self._factored(m, path, overrides, call_args, call_kwargs) if _is_layer(m) else None
      return next_fun(*call_args, **call_kwargs) if y is None else y

    with nn.intercept_methods(interceptor):
      logits = self.module(*args, **kwargs)
    if not hasattr(logits, 'shape'):
      raise ValueError('convert: the model must return its logits as one array, got '
                       f'{type(logits).__name__}.')
    if not units:
      raise ValueError('convert: the model called no nn.Dense / nn.Conv and no declared block; '
                       'there is nothing to train locally.')
    return logits, taps

  def _factored(self, m: nn.Module, path: str, overrides, call_args, call_kwargs):
    """The SVD twin's output for layer ``m``, or None where the layer stays dense."""
    r = models.layer_rank(path, self.rank, overrides)
    if r is None or r == 'dense':
      return None
    if len(call_args) != 1 or call_kwargs:
      raise ValueError(f'convert: {path} is called with more than its input; keep it dense with '
                       f"overrides={{'{path}': 'dense'}}.")
    x = call_args[0]
    common = dict(use_bias=m.use_bias, kernel_init=m.kernel_init, bias_init=m.bias_init,
                  param_dtype=m.param_dtype)
    if isinstance(m, nn.Dense):
      y = layers.svd_dense(m, x, m.features, r, **common)
      return y if m.dtype is None else y.astype(m.dtype)
    ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)  # as flax
    if len(ks) != 2 or x.ndim != 4:
      raise ValueError(f'convert: {path} is not a 2-D conv on NHWC images (kernel {ks}, input '
                       f"rank {x.ndim}); keep it dense with overrides={{'{path}': 'dense'}}.")
    if m.feature_group_count != 1:  # depthwise / grouped: never factored, as in our models
      return None
    if _pairs(m.kernel_dilation) != (1, 1) or _pairs(m.input_dilation) != (1, 1) \
        or m.mask is not None:
      raise ValueError(f'convert: {path} is dilated or masked, which the factored conv cannot '
                       f"run; keep it dense with overrides={{'{path}': 'dense'}}.")
    y = layers.svd_conv(m, x, m.features, ks, r, strides=_pairs(m.strides),
                        padding=_conv_padding(m, path), split=self.split, **common)
    return y if m.dtype is None else y.astype(m.dtype)

  def init(self, rngs, *args, **kwargs):
    """``nn.Module.init``, then :func:`check_blocks` on random inputs of the same shapes.

    The check runs only where values are concrete: not under ``jax.jit``, ``eval_shape`` or a
    parent module's ``init``; call :func:`check_blocks` yourself there.
    """
    variables = super().init(rngs, *args, **kwargs)
    concrete = not any(isinstance(a, jax.core.Tracer)
                       for a in jax.tree.leaves((variables, args, kwargs)))
    if self.check and concrete:
      call = {k: v for k, v in kwargs.items()
              if k not in ('method', 'mutable', 'capture_intermediates')}
      other_rngs = {k: v for k, v in rngs.items() if k != 'params'} if isinstance(rngs, dict) \
          else {}
      check_blocks(self, variables, *probe_inputs(args), rngs=other_rngs, **call)
    return variables


def probe_inputs(args, seed: int = 0):
  """Random arrays shaped like ``args``: an all-zero init input can leave a ReLU block with
  exactly zero gradients, which would read as a block its tap does not reach. Floats are
  N(0, 1); integers are drawn from ``[0, max(arg) + 1]`` (token ids stay in range)."""
  leaves, treedef = jax.tree.flatten(args)
  keys = jax.random.split(jax.random.key(seed), len(leaves) or 1)

  def draw(key, a):
    if not hasattr(a, 'shape'):
      return a
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating):
      return jax.random.normal(key, a.shape, a.dtype)
    if jnp.issubdtype(a.dtype, jnp.integer):
      return jax.random.randint(key, a.shape, 0, int(a.max()) + 2).astype(a.dtype)
    return a
  return jax.tree.unflatten(treedef, [draw(k, a) for k, a in zip(keys, leaves)])


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/')


def reached(model: nn.Module, variables: Any, *args, rngs: Any = None,
            **kwargs) -> dict[str, set[str]]:
  """Output (``'<logits>'`` or a tap name) -> the param leaves its local cotangent reaches.

  One ``vjp`` of the ``local=True`` forward per output, with a random cotangent on that output
  only; a leaf counts as reached when its gradient is not exactly zero.
  """
  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}
  mutable = list(state) or False

  def forward(p):
    out = model.apply({'params': p, **state}, *args, local=True, mutable=mutable,
                      rngs=rngs or None, **kwargs)
    return out[0] if mutable else out

  (logits, taps), vjp_fn = jax.vjp(forward, params)
  outputs = {LOGITS: logits, **taps}
  keys = dict(zip(outputs, jax.random.split(jax.random.key(0), len(outputs))))
  out = {}
  for name in outputs:
    cot = {n: (jax.random.normal(keys[n], o.shape, o.dtype) if n == name else jnp.zeros_like(o))
           for n, o in outputs.items()}
    (grads,) = vjp_fn((cot[LOGITS], {n: cot[n] for n in taps}))
    out[name] = {p for p, g in _flat(grads).items() if bool(jnp.any(g != 0))}
  return out


def check_blocks(model: nn.Module, variables: Any, *args, **kwargs) -> None:
  """Raises a one-line ``ValueError`` unless every block learns from its own tap alone."""
  by_output = reached(model, variables, *args, **kwargs)
  owner: dict[str, str] = {}
  for name, leaves in by_output.items():
    for leaf in sorted(leaves):
      if leaf in owner:
        nested = [n.rsplit('/', 1)[0] for n in (owner[leaf], name) if '/' in n]
        hint = (f"blocks=[{re.sub(r'_[0-9]+$', '_*', nested[-1])!r}]" if nested
                else "blocks=['ResBlock_*']")
        raise ValueError(
            f'convert: the local signals of {owner[leaf]!r} and {name!r} both reach parameter '
            f'{leaf}: a skip connection or branch bypasses the cut between blocks. Declare the '
            f'submodule that holds it as one block (convert(..., {hint})), or move the skip '
            'into a submodule.')
      owner[leaf] = name
  orphans = sorted(set(_flat(variables['params'])) - set(owner))
  if orphans:
    raise ValueError(
        f'convert: no block\'s signal reaches {orphans[0]}'
        f"{f' (and {len(orphans) - 1} more)' if len(orphans) > 1 else ''}, so it would never "
        'train: it sits before the first block (e.g. a normalisation of the input) or is unused. '
        'Declare a submodule holding it as a block, or leave it out of the model.')
  for tap in by_output:
    if tap == LOGITS:
      continue
    if not any(leaf.startswith(tap + '/') for leaf in by_output[tap]):
      raise ValueError(
          f'convert: the tap of block {tap!r} (the input of the block called after it) does not '
          f"depend on {tap!r}'s parameters: the model is not a chain of blocks there (a branch?). "
          'Declare the submodule that holds the branches as one block.')


def _shapes(module: nn.Module, *args, **kwargs):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))['params']


def factorize(model: Converted, dense_params: Any, *args, **kwargs) -> Any:
  """A trained param tree of ``model.module`` as ``model``'s factors (truncated SVD per layer).

  ``args``/``kwargs`` are example inputs (shapes only). Layers ``model`` keeps dense, and
  every other leaf, are copied.
  """
  target = _flat(_shapes(model, *args, **kwargs))
  flat = _flat(dense_params)
  out = {}
  for path, shape in target.items():
    layer, _, leaf = path.rpartition('/')
    factored = all(f'{layer}/{k}' in target for k in ('u', 's', 'v')) \
        and f'{layer}/kernel' in flat and path not in flat
    if factored:
      if leaf == 'u':
        kernel = flat[f'{layer}/kernel']
        r = target[f'{layer}/s'].shape[0]
        k32 = jnp.asarray(kernel, jnp.float32)  # the SVD runs in float32 (bf16 kernels too)
        f = (layers.factor_dense_kernel(k32, r) if kernel.ndim == 2
             else layers.factor_conv_kernel(k32, r, model.split))
        out.update({f'{layer}/{k}': f[k].astype(target[f'{layer}/{k}'].dtype)
                    for k in ('u', 's', 'v')})
    elif path in flat:
      out[path] = flat[path]
    else:
      raise ValueError(f'factorize: dense_params has no {path}; pass the params of the model '
                       'that was converted.')
  return traverse_util.unflatten_dict(out, sep='/')


def densify(model: Converted, params: Any, *args, **kwargs) -> Any:
  """``model``'s factors rebuilt into ``model.module``'s dense param tree (``V diag(s) Uᵀ``)."""
  target = _flat(_shapes(model.module, *args, **kwargs))
  flat = _flat(params)
  out = {}
  for path, shape in target.items():
    layer, _, leaf = path.rpartition('/')
    if leaf == 'kernel' and f'{layer}/u' in flat:
      u, s, v = (flat[f'{layer}/{k}'] for k in ('u', 's', 'v'))
      out[path] = (layers.rebuild_dense_kernel(u, s, v) if len(shape.shape) == 2 else
                   layers.rebuild_conv_kernel(u, s, v, shape.shape[:2], model.split))
    else:
      out[path] = flat[path]
  return traverse_util.unflatten_dict(out, sep='/')
