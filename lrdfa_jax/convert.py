"""Any Flax Linen model built from ``nn.Dense`` / ``nn.Conv``, put on local learning in one call.

``convert(MyNet(), rank=0.25)`` returns a module with the contract of our zoo
(``docs/blocks.md``): ``apply(variables, *args, local=False, **kwargs) -> (logits, taps)``,
ready for :func:`lrdfa_jax.dfa.local_grads`, without editing ``MyNet``'s code. It works by
intercepting the model's module calls (``nn.intercept_methods``):

* every ``nn.Dense`` / ``nn.Conv`` (2-D, ungrouped) becomes its SVD twin
  (:func:`lrdfa_jax.layers.svd_dense` / :func:`~lrdfa_jax.layers.svd_conv`) at the rank that
  ``rank`` and ``overrides`` give its path (``models.layer_rank``: fnmatch patterns, last wins,
  ``'dense'`` keeps a layer dense; ``rank=None`` keeps every layer dense, for plain DFA).
  The factors live where the layer's ``kernel`` would (``params['Dense_0']['u']``), drawn
  from the same ``kernel_init`` sample, so at full rank the converted model computes the
  original's function;
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
    from lrdfa_jax.train import parse_overrides  # the config's 'pattern:value,...' parser
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
    root = len(self.module.scope.path)
    units: list[str] = []   # blocks in call order
    taps: dict[str, Array] = {}
    overrides = dict(self.overrides)

    def in_block(path: tuple[str, ...]) -> bool:
      return any(fnmatch.fnmatchcase('/'.join(path[:i]), b)
                 for i in range(1, len(path)) for b in self.blocks)

    def interceptor(next_fun, call_args, call_kwargs, context):
      m = context.module
      if context.method_name != '__call__' or m is self.module:
        return next_fun(*call_args, **call_kwargs)
      rel = tuple(m.scope.path[root:])
      path = '/'.join(rel)
      declared = any(fnmatch.fnmatchcase(path, b) for b in self.blocks)
      if (declared or _is_layer(m)) and not in_block(rel):
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
    x, dtype = call_args[0], m.dtype
    if isinstance(m, nn.Dense):
      y = layers.svd_dense(m, x, m.features, r, use_bias=m.use_bias, kernel_init=m.kernel_init,
                           bias_init=m.bias_init)
      return y if dtype is None else y.astype(dtype)
    ks = _pairs(m.kernel_size)
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
                        padding=_conv_padding(m, path), split=self.split, use_bias=m.use_bias,
                        kernel_init=m.kernel_init, bias_init=m.bias_init)
    return y if dtype is None else y.astype(dtype)

  def init(self, rngs, *args, **kwargs):
    variables = super().init(rngs, *args, **kwargs)
    concrete = not any(isinstance(a, jax.core.Tracer)
                       for a in jax.tree.leaves((variables, args, kwargs)))  # not under jit/eval_shape
    if self.check and concrete:
      # on random inputs of the init's shapes: an all-zero init input can leave a ReLU block
      # with exactly zero gradients, which would read as a block its tap does not reach
      keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(args)) or 1))
      probe = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype)
                           if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, args)
      check_blocks(self, variables, *probe, **kwargs)
    return variables


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/')


def reached(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, set[str]]:
  """Output (``'<logits>'`` or a tap name) -> the param leaves its local cotangent reaches.

  One ``vjp`` of the ``local=True`` forward per output, with a random cotangent on that output
  only; a leaf counts as reached when its gradient is not exactly zero.
  """
  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}
  mutable = list(state) or False

  def forward(p):
    out = model.apply({'params': p, **state}, *args, local=True, mutable=mutable, **kwargs)
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
    layer, leaf = path.rsplit('/', 1)
    if leaf in ('u', 's', 'v'):
      if leaf == 'u':
        kernel = flat.get(f'{layer}/kernel')
        if kernel is None:
          raise ValueError(f'factorize: dense_params has no {layer}/kernel; pass the params of '
                           'the model that was converted.')
        r = target[f'{layer}/s'].shape[0]
        f = (layers.factor_dense_kernel(kernel, r) if kernel.ndim == 2
             else layers.factor_conv_kernel(kernel, r, model.split))
        out.update({f'{layer}/{k}': f[k] for k in ('u', 's', 'v')})
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
    layer, leaf = path.rsplit('/', 1)
    if leaf == 'kernel' and f'{layer}/u' in flat:
      u, s, v = (flat[f'{layer}/{k}'] for k in ('u', 's', 'v'))
      out[path] = (layers.rebuild_dense_kernel(u, s, v) if len(shape.shape) == 2 else
                   layers.rebuild_conv_kernel(u, s, v, shape.shape[:2], model.split))
    else:
      out[path] = flat[path]
  return traverse_util.unflatten_dict(out, sep='/')
