"""SVD-factored layers: every weight is kept as ``U diag(s) Vᵀ``.

Dense: ``W (out×in) = U diag(s) Vᵀ``; forward ``((x V) * s) Uᵀ + b``.

Conv, ``split='spatial'`` (Yang et al. 2020, arXiv 2004.09031): the kernel
``K[kh, kw, Cin, Cout]`` is viewed as the matrix ``M[(i, c), (j, o)]`` of shape
``(kh·Cin) × (kw·Cout)`` and factored as ``M = V diag(s) Uᵀ``. It runs as a ``kh×1``
conv from Cin to r channels (stride and padding of H), a scale by ``s``, then a ``1×kw``
conv from r to Cout (stride and padding of W). Exact at full rank.

Conv, ``split='channel'``: ``M[(i, j, c), o]`` of shape ``(kh·kw·Cin) × Cout``; a
``kh×kw`` conv to r channels, scale by ``s``, then a ``1×1`` conv to Cout.

Parameter names are ``u``, ``s``, ``v`` and ``bias`` everywhere, so optimizer masks and
losses find the factors by leaf name.

Every conv of the zoo, dense or factored, goes through :func:`conv_general_dilated`: on tiny
maps (≤ ``TINY_MAP`` output positions) it runs as im2col and one matmul, because XLA:CPU's
conv runs a 3×3 conv on 2×2 maps at ~0.3 GFLOP/s (VGG-13's stage 5; benchmarks/results).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Rank = int | float | str  # an int rank, a fraction in (0, 1), or 'full'
Padding = str | Sequence[tuple[int, int]]

_DN = ('NHWC', 'HWIO', 'NHWC')
# Output positions (H·W) at or below which a conv runs as im2col + matmul: 4×4 and smaller.
# Measured on this project's 2-core CPU, 3×3 conv forward + both gradients at batch 128:
# 2×2×512 5.5 s -> 0.12 s, 4×4×512 0.61 -> 0.56 s (benchmarks/results/cpu_conv.md).
TINY_MAP = 16
# SVDConv: two thin convs, the rebuilt kernel, or per shape (:func:`pick_conv_execution`)
CONV_EXECUTIONS = ('factored', 'kernel', 'auto')
# ``execution='auto'`` rebuilds the kernel of a factored conv whose dense form has at
# most this many channels in and out. Measured per shape (benchmarks/results/cpu_conv_layers*.md,
# 2-core CPU, batch 128, forward + all gradients): the rebuilt kernel wins only on ResNets'
# 32×32×16 -> 16 convs (0.53× the factored time at rank 7, 0.85× at 4, 0.92× at 2); it ties on
# 16 -> 32 at stride 2 and loses by 1.09-3.3× on every conv with 32 or more input channels.
KERNEL_MAX_CHANNELS = 16


# A conv's kernel gradient: XLA's, kh·kw shifted GEMMs, or per shape (:func:`pick_conv_form`);
# conv_general_dilated also takes 'im2col_gemm' (what 'auto' picks for a stem)
KERNEL_GRADS = ('xla', 'gemm', 'auto')
# ``kernel_grad='auto'`` on CPU (benchmarks/results/cpu_conv_forms.md, 2-core CPU, batch 128,
# 3×3 conv forward + both gradients against XLA's): a stem conv (Cin <= STEM_MAX_CHANNELS,
# Cout >= NARROW_CHANNELS) runs its forward as im2col and its kernel gradient as GEMMs, keeping
# only its input for the backward (0.62× on 32×32×3 -> 32; SmallConv's bp and ssa steps take
# 0.89× and 0.83× their all-GEMM times, with no more temp memory); a conv to fewer than
# NARROW_CHANNELS channels on a map of <= SMALL_MAP output positions keeps XLA's kernel
# gradient (the GEMMs take 1.07-1.50× its time on 8×8×64 -> 14, 25); every other conv takes the GEMMs (0.46-0.95× XLA's on most shapes; they
# lose on a few, e.g. 1.17× on 16×16×32 -> 7).
STEM_MAX_CHANNELS = 4
NARROW_CHANNELS = 32
SMALL_MAP = 64


def _unit(x) -> bool:
  return x is None or all(int(d) == 1 for d in x)


def _kernel_grad_gemm(x: Array, dy: Array, kernel_shape, strides, pads) -> Array:
  """``∂L/∂K`` of a NHWC/HWIO conv as ``kh·kw`` GEMMs ``x_shiftedᵀ dy`` over batch and space.

  Same value as the conv's own kernel gradient. The GEMMs run one after another in a
  ``lax.scan`` over the kernel offsets, so one shifted slice of ``x`` is alive at a time.
  """
  kh, kw, cin, cout = kernel_shape
  sh, sw = strides
  b, ho, wo, _ = dy.shape
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  dy_PxO = dy.reshape(-1, cout)
  window = (b, (ho - 1) * sh + 1, (wo - 1) * sw + 1, cin)

  def offset_gemm(carry, ij):
    shifted = lax.dynamic_slice(xp, (0, ij[0], ij[1], 0), window)[:, ::sh, ::sw, :]
    return carry, shifted.reshape(-1, cin).T @ dy_PxO
  offsets = jnp.array([(i, j) for i in range(kh) for j in range(kw)], jnp.int32)
  _, grads = lax.scan(offset_gemm, None, offsets)
  return grads.reshape(kh, kw, cin, cout)


def _im2col_conv(x: Array, kernel: Array, strides, pads, precision=None,
                 preferred_element_type=None) -> Array:
  """A NHWC/HWIO conv as one matmul on the ``kh·kw`` shifted maps stacked along channels."""
  kh, kw, cin, cout = kernel.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  ho = (x.shape[1] + pt + pb - kh) // sh + 1
  wo = (x.shape[2] + pl + pr - kw) // sw + 1
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
                          for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.matmul(cols, kernel.reshape(kh * kw * cin, cout), precision=precision,
                    preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_gemm_kernel_grad(x: Array, kernel: Array, strides, pads,
                           im2col_forward: bool = False) -> Array:
  if im2col_forward:  # the columns die after the matmul: the backward keeps only x
    return _im2col_conv(x, kernel, strides, pads)
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)


def _conv_gemm_fwd(x, kernel, strides, pads, im2col_forward):
  return _conv_gemm_kernel_grad(x, kernel, strides, pads, im2col_forward), (x, kernel)


def _conv_gemm_bwd(strides, pads, im2col_forward, res, dy):
  x, kernel = res
  input_transpose = jax.linear_transpose(  # the conv is linear in x: no forward recompute
      lambda x: lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN), x)
  (dx,) = input_transpose(dy)
  return dx, _kernel_grad_gemm(x, dy, kernel.shape, strides, pads).astype(kernel.dtype)


_conv_gemm_kernel_grad.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, *,
                         max_positions: int = TINY_MAP, kernel_grad: str = 'xla') -> Array:
  """``lax.conv_general_dilated``, run as im2col + one matmul when the output map is tiny.

  Same signature (``nn.Conv(conv_general_dilated=...)`` takes it) and the same result up to
  float rounding; its gradients are those of slices and a matmul. The im2col form is taken for
  NHWC/HWIO 2-D convs without dilation or groups whose output has ≤ ``max_positions``
  positions (``model.im2col_positions``; 0 never); everything else goes to
  ``lax.conv_general_dilated``. With ``kernel_grad='gemm'`` (``model.conv_kernel_grad``)
  such a conv's kernel gradient is computed as ``kh·kw`` GEMMs (:func:`_kernel_grad_gemm`):
  on this project's CPU a 3×3 conv's forward + gradients run 1.5–3.6× faster that way on maps
  of 16×16 and up (about as fast on 8×8), and a step's temp memory grows 3–9 %
  (benchmarks/results/cpu_conv.md, summary.md). ``kernel_grad='auto'`` (the default of
  ``model.conv_kernel_grad``) picks im2col, the GEMMs or XLA's per conv
  (:func:`pick_conv_form`).
  """
  def plain():
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)

  if (lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1
      or not _unit(lhs_dilation) or not _unit(rhs_dilation)
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)):
    return plain()
  kh, kw, cin, cout = rhs.shape
  sh, sw = window_strides
  pads = (lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
          if isinstance(padding, str) else [tuple(p) for p in padding])
  (pt, pb), (pl, pr) = pads
  ho = (lhs.shape[1] + pt + pb - kh) // sh + 1
  wo = (lhs.shape[2] + pl + pr - kw) // sw + 1
  if min(pt, pb, pl, pr) < 0:
    return plain()
  pads = ((pt, pb), (pl, pr))
  form = conv_form(rhs.shape, ho * wo, max_positions, kernel_grad)
  if form == 'im2col':
    return _im2col_conv(lhs, rhs, (sh, sw), pads, precision, preferred_element_type)
  if form in ('gemm', 'im2col_gemm') and precision is None and preferred_element_type is None:
    return _conv_gemm_kernel_grad(lhs, rhs, (sh, sw), pads, form == 'im2col_gemm')
  return plain()


def conv_form(kernel_shape: Sequence[int], positions: int, max_positions: int = TINY_MAP,
              kernel_grad: str = 'auto') -> str:
  """The form :func:`conv_general_dilated` runs an NHWC/HWIO conv in: ``'im2col'`` on maps of
  at most ``max_positions`` output positions, else ``kernel_grad``, with ``'auto'`` resolved
  by :func:`pick_conv_form` (never to im2col when ``max_positions`` is 0)."""
  if kernel_grad not in (*KERNEL_GRADS, 'im2col_gemm'):
    raise ValueError(f'unknown kernel_grad {kernel_grad!r}; choose one of {KERNEL_GRADS}.')
  if positions <= max_positions:
    return 'im2col'
  if kernel_grad != 'auto':
    return kernel_grad
  form = pick_conv_form(kernel_shape, positions)
  return 'gemm' if form == 'im2col_gemm' and max_positions <= 0 else form


def pick_conv_form(kernel_shape: Sequence[int], positions: int) -> str:
  """How ``kernel_grad='auto'`` runs a conv with more than ``max_positions`` output positions.

  ``'im2col_gemm'`` (the forward as one matmul on the stacked shifted maps, the kernel
  gradient as kh·kw GEMMs, XLA's input gradient; the columns are not kept for the backward),
  ``'gemm'`` (XLA's conv and input gradient, the GEMM kernel gradient) or ``'xla'`` (XLA's
  conv and gradients).
  On CPU, by the measured rule above :data:`STEM_MAX_CHANNELS`; on accelerators, where no
  rule is measured, XLA's.
  """
  if jax.default_backend() != 'cpu':
    return 'xla'
  _, _, cin, cout = kernel_shape
  if cin <= STEM_MAX_CHANNELS and cout >= NARROW_CHANNELS:
    return 'im2col_gemm'
  if positions <= SMALL_MAP and cout < NARROW_CHANNELS:
    return 'xla'
  return 'gemm'


def resolve_rank(rank: Rank, full_rank: int, *, name: str = 'layer') -> int:
  """Turns a rank into an int in ``[1, full_rank]``.

  An int, or an integer-valued float (``1.0`` from a float-typed config field), is that
  rank; a float in ``(0, 1)`` is a fraction of ``full_rank`` (rounded, at least 1);
  ``'full'`` is ``full_rank``. A rank above ``full_rank`` or not positive is a ``ValueError``.
  """
  if rank == 'full':
    return full_rank
  if isinstance(rank, bool) or not isinstance(rank, (int, float)):
    raise ValueError(f"{name}: rank must be an int, a fraction in (0, 1) or 'full', got "
                     f'{rank!r}.')
  if isinstance(rank, float) and rank.is_integer():
    rank = int(rank)  # e.g. 64.0 or 1.0 from a float-typed config field: that rank
  if isinstance(rank, float):
    if not 0.0 < rank < 1.0:
      raise ValueError(
          f'{name}: a fractional rank must lie in (0, 1), got {rank}. Pass an int for an '
          "absolute rank, or 'full'.")
    return max(1, int(round(rank * full_rank)))
  if rank < 1:
    raise ValueError(f'{name}: rank must be >= 1, got {rank}.')
  if rank > full_rank:
    raise ValueError(
        f'{name}: rank {rank} is above full rank {full_rank}; '
        f"use a rank <= {full_rank}, a fraction such as 0.25, or 'full'.")
  return int(rank)


def factor_matrix(w_MxN: Array, rank: int) -> tuple[Array, Array, Array]:
  """Truncated SVD ``w ≈ a diag(s) bᵀ``; returns ``(a_MxR, s_R, b_NxR)``."""
  a, s, bt = jnp.linalg.svd(w_MxN, full_matrices=False)
  return a[:, :rank], s[:rank], bt[:rank].T


def factor_dense_kernel(kernel_IxO: Array, rank: int) -> dict[str, Array]:
  """Factors a Flax Dense kernel ``[in, out]`` (``= Wᵀ``) into ``{'u','s','v'}``."""
  v_IxR, s_R, u_OxR = factor_matrix(kernel_IxO, rank)
  return {'u': u_OxR, 's': s_R, 'v': v_IxR}


def rebuild_dense_kernel(u: Array, s: Array, v: Array) -> Array:
  """Rebuilds the Flax Dense kernel ``[in, out] = V diag(s) Uᵀ`` from ``u [out, r]``, ``v [in, r]``."""
  return (v * s) @ u.T


def conv_full_rank(kernel_shape: Sequence[int], split: str) -> int:
  """Full rank of a ``[kh, kw, Cin, Cout]`` kernel under a split."""
  kh, kw, cin, cout = kernel_shape
  if split == 'spatial':
    return min(kh * cin, kw * cout)
  if split == 'channel':
    return min(kh * kw * cin, cout)
  raise ValueError(f"split must be 'spatial' or 'channel', got {split!r}.")


def _conv_matrix(kernel: Array, split: str) -> Array:
  kh, kw, cin, cout = kernel.shape
  if split == 'spatial':  # M[(i, c), (j, o)] = K[i, j, c, o]
    return kernel.transpose(0, 2, 1, 3).reshape(kh * cin, kw * cout)
  conv_full_rank(kernel.shape, split)  # validates split
  return kernel.reshape(kh * kw * cin, cout)


def factor_conv_kernel(kernel: Array, rank: int, split: str = 'spatial') -> dict[str, Array]:
  """Factors an HWIO conv kernel. ``v`` indexes the first conv's inputs, ``u`` the output side."""
  v, s, u = factor_matrix(_conv_matrix(kernel, split), rank)
  return {'u': u, 's': s, 'v': v}


def rebuild_conv_kernel(u: Array, s: Array, v: Array, kernel_size: Sequence[int],
                        split: str = 'spatial') -> Array:
  """Inverse of :func:`factor_conv_kernel`: the dense HWIO kernel ``[kh, kw, Cin, Cout]``."""
  kh, kw = kernel_size
  m = (v * s) @ u.T
  if split == 'spatial':
    cin, cout = v.shape[0] // kh, u.shape[0] // kw
    return m.reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)
  cin, cout = v.shape[0] // (kh * kw), u.shape[0]
  return m.reshape(kh, kw, cin, cout)


def _split_padding(padding: Padding) -> tuple[Padding, Padding]:
  """Padding of the H conv and of the W conv for the spatial split."""
  if isinstance(padding, str):
    return padding, padding  # SAME/VALID computed per dim give the same pads as the full conv.
  (ph, pw) = padding
  return [tuple(ph), (0, 0)], [(0, 0), tuple(pw)]


def _conv(x: Array, kernel: Array, strides, padding, max_positions: int = TINY_MAP,
          kernel_grad: str = 'xla') -> Array:
  if isinstance(padding, str):
    padding = padding.upper()
  return conv_general_dilated(x, kernel, tuple(strides), padding, dimension_numbers=_DN,
                              max_positions=max_positions, kernel_grad=kernel_grad)


def _spectral_factors(module: nn.Module, init_fn: Callable[[], dict[str, Array]], *,
                      features: int, use_bias: bool, bias_init: Callable[..., Array],
                      param_dtype: Any = jnp.float32):
  """Creates ``u``, ``s``, ``v`` from one joint SVD at init time, and the bias (or None).

  The kernel sample takes the scope's first ``params`` key and the bias the second, as in
  ``nn.Dense`` / ``nn.Conv``, so a layer converted at full rank starts as the original.
  """
  bias_key = []
  if module.has_variable('params', 'u'):
    # Flax shape-checks existing params by tracing their init fn; hand it the param itself.
    factors = {k: module.get_variable('params', k) for k in ('u', 's', 'v')}
  else:
    factors = {k: f.astype(param_dtype) for k, f in init_fn().items()}
    if use_bias:
      bias_key.append(module.make_rng('params'))
  u, s, v = (module.param(k, lambda _rng, k=k: factors[k]) for k in ('u', 's', 'v'))
  bias = None
  if use_bias:
    bias = module.param('bias', lambda rng, shape: bias_init(bias_key[0] if bias_key else rng,
                                                             shape, param_dtype), (features,))
  return u, s, v, bias


class SVDDense(nn.Module):
  """Dense layer kept as ``U diag(s) Vᵀ``: params ``u [out, r]``, ``s [r]``, ``v [in, r]``, ``bias``.

  ``rank`` is an int, a fraction in (0, 1) of ``min(in, out)``, or ``'full'``. Initialised
  by the SVD of a ``kernel_init`` sample (spectral init), keeping the top r triplets.
  """
  features: int
  rank: Rank = 'full'
  use_bias: bool = True
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return svd_dense(self, x, self.features, self.rank, use_bias=self.use_bias,
                     kernel_init=self.kernel_init, bias_init=self.bias_init)


class SVDConv(nn.Module):
  """Conv layer kept as ``V diag(s) Uᵀ`` of the reshaped kernel (see module docstring).

  Params: spatial split ``v [kh·Cin, r]``, ``u [kw·Cout, r]``; channel split
  ``v [kh·kw·Cin, r]``, ``u [Cout, r]``; plus ``s [r]`` and ``bias [Cout]``.

  ``im2col_positions``, ``kernel_grad``: see :func:`conv_general_dilated`.
  ``execution``: ``'factored'`` runs the two thin convs; ``'kernel'`` rebuilds the dense
  kernel ``V diag(s) Uᵀ`` each call and runs one conv (more FLOPs, but XLA:CPU runs convs to
  few channels slowly; the params and their gradients are the same up to float rounding);
  ``'auto'`` picks one of the two by the conv's shape (:func:`pick_conv_execution`).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  rank: Rank = 'full'
  strides: Sequence[int] = (1, 1)
  padding: Padding = 'SAME'
  split: str = 'spatial'
  execution: str = 'factored'
  im2col_positions: int = TINY_MAP
  kernel_grad: str = 'xla'
  use_bias: bool = True
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return svd_conv(self, x, self.features, self.kernel_size, self.rank, strides=self.strides,
                    padding=self.padding, split=self.split, execution=self.execution,
                    im2col_positions=self.im2col_positions, kernel_grad=self.kernel_grad,
                    use_bias=self.use_bias, kernel_init=self.kernel_init,
                    bias_init=self.bias_init)


def pick_conv_execution(kernel_shape: Sequence[int]) -> str:
  """``'kernel'`` or ``'factored'``: how ``execution='auto'`` runs a factored conv.

  ``kernel_shape`` is the dense ``(kh, kw, Cin, Cout)``. The rebuilt kernel for narrow convs
  (``Cin, Cout <= KERNEL_MAX_CHANNELS``): the dense conv there does little arithmetic per byte,
  so the factored form's second pass over the maps and its rank-r intermediate cost more than
  the FLOPs it saves. The factored form everywhere else, and on accelerators, where the rule
  is not measured.
  """
  if jax.default_backend() != 'cpu':
    return 'factored'
  _, _, cin, cout = kernel_shape
  return 'kernel' if max(cin, cout) <= KERNEL_MAX_CHANNELS else 'factored'


def svd_dense(module: nn.Module, x: Array, features: int, rank: Rank, *, use_bias: bool = True,
              kernel_init: Callable[..., Array] = nn.initializers.lecun_normal(),
              bias_init: Callable[..., Array] = nn.initializers.zeros_init(),
              param_dtype: Any = jnp.float32) -> Array:
  """:class:`SVDDense`'s forward, creating ``u``, ``s``, ``v``, ``bias`` in ``module``'s scope.

  ``module`` is any bound module inside its ``__call__`` (``lrdfa_jax.convert`` passes a
  user's ``nn.Dense``, so the factors live where its ``kernel`` would).
  """
  n_in = x.shape[-1]
  r = resolve_rank(rank, min(n_in, features), name=module.name or 'SVDDense')

  def init():
    kernel = kernel_init(module.make_rng('params'), (n_in, features), jnp.float32)
    return factor_dense_kernel(kernel, r)

  u_OxR, s_R, v_IxR, bias = _spectral_factors(module, init, features=features, use_bias=use_bias,
                                               bias_init=bias_init, param_dtype=param_dtype)
  y = ((x @ v_IxR) * s_R) @ u_OxR.T
  return y if bias is None else y + bias


def svd_conv(module: nn.Module, x: Array, features: int, kernel_size: Sequence[int], rank: Rank,
             *, strides: Sequence[int] = (1, 1), padding: Padding = 'SAME',
             split: str = 'spatial', execution: str = 'factored',
             im2col_positions: int = TINY_MAP, kernel_grad: str = 'xla',
             use_bias: bool = True,
             kernel_init: Callable[..., Array] = nn.initializers.lecun_normal(),
             bias_init: Callable[..., Array] = nn.initializers.zeros_init(),
             param_dtype: Any = jnp.float32) -> Array:
  """:class:`SVDConv`'s forward, creating its params in ``module``'s scope (see :func:`svd_dense`)."""
  if execution not in CONV_EXECUTIONS:
    raise ValueError(f'conv execution must be one of {CONV_EXECUTIONS}, got {execution!r}.')
  kh, kw = kernel_size
  cin = x.shape[-1]
  shape = (kh, kw, cin, features)
  r = resolve_rank(rank, conv_full_rank(shape, split), name=module.name or 'SVDConv')

  def init():
    kernel = kernel_init(module.make_rng('params'), shape, jnp.float32)
    return factor_conv_kernel(kernel, r, split)

  u, s_R, v, bias = _spectral_factors(module, init, features=features, use_bias=use_bias,
                                      bias_init=bias_init, param_dtype=param_dtype)
  sh, sw = strides
  if execution == 'auto':
    execution = pick_conv_execution(shape)
  if execution == 'kernel':
    y = _conv(x, rebuild_conv_kernel(u, s_R, v, kernel_size, split), strides, padding,
              im2col_positions, kernel_grad)
  elif split == 'spatial':
    pad_h, pad_w = _split_padding(padding)
    k1 = v.reshape(kh, 1, cin, r)                                 # kh×1: Cin -> r
    k2 = u.reshape(1, kw, features, r).transpose(0, 1, 3, 2)      # 1×kw: r -> Cout
    y = _conv(x, k1, (sh, 1), pad_h, im2col_positions, kernel_grad) * s_R
    y = _conv(y, k2, (1, sw), pad_w, im2col_positions, kernel_grad)
  else:
    k1 = v.reshape(kh, kw, cin, r)
    y = _conv(x, k1, (sh, sw), padding, im2col_positions, kernel_grad) * s_R
    y = y @ u.T                                                   # 1×1: r -> Cout
  return y if bias is None else y + bias


def svd_param_count(n_in: int, n_out: int, rank: int, use_bias: bool = True) -> int:
  """``r(m + n + 1)`` factor params plus the bias."""
  return rank * (n_in + n_out + 1) + (n_out if use_bias else 0)


def is_svd_layer(tree: Any) -> bool:
  """True for a param dict holding ``u``, ``s`` and ``v``."""
  return isinstance(tree, dict) and {'u', 's', 'v'} <= set(tree)
