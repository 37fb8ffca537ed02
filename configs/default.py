"""Shared base config: SmallConv on the offline CIFAR-10 copy, trained with SSA.

Variants import this and override fields. ``get_config('smoke')`` (``--config=...py:smoke``)
shrinks any config to synthetic data of the same shape and a handful of steps (seconds on CPU).
"""
import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.name = 'small_conv'      # small_conv | mlp
  m.rank = 0.25              # per-layer rank for svd_bp/ssa: an int (1.0 is rank 1), or a
  #                           fraction 0 < r < 1 of full rank; full rank: overrides '*:full,...'
  m.overrides = 'conv1:dense,head:dense'  # 'layer:rank|full|dense', comma separated, last wins
  m.split = 'channel'        # conv factorisation: spatial (kh×1 then 1×kw) | channel (kh×kw then 1×1)
  m.conv_execution = 'auto'  # factored convs: factored (two thin convs) | kernel (rebuilt, one
  #                           conv) | auto (kernel for convs of <= 16 channels on CPU, else factored)
  m.im2col_positions = 16    # convs with <= this many output positions run as im2col + matmul
  m.conv_kernel_grad = 'auto'  # conv kernel gradient: xla | gemm (kh·kw GEMMs) | auto (per conv
  #                           on CPU: stems' forward as im2col, narrow 8×8 convs XLA's, else gemm)
  m.act = 'tanh'             # relu | tanh | gelu | silu | leaky_relu (tanh trains better under DFA)
  m.kwargs = ml_collections.ConfigDict()  # extra constructor args, e.g. widths=(8, 16, 32);
  #                           small_conv: norm='batch' (BN after each conv, the LLS SmallConv)

  c.data = d = ml_collections.ConfigDict()
  d.source = 'offline'       # offline (../shared/data or $LRDFA_DATA_DIR) | tfds | synthetic
  d.name = 'cifar10'         # cifar10 | cifar100 | imagenet2012
  d.data_dir = ml_collections.config_dict.placeholder(str)   # None: the source's default
  d.cache_dir = ml_collections.config_dict.placeholder(str)  # None: $LRDFA_CACHE_DIR or ~/.cache
  d.augment = True           # pad-4 random crop + horizontal flip
  d.validation_size = 0      # hold out this many train images (fixed split) for tuning
  d.image_size = 0           # imagenet2012 crop size (0: 224); CIFAR keeps 32
  d.workers = 16             # threads decoding streamed (imagenet2012) records
  d.synthetic = s = ml_collections.ConfigDict()  # used when source == 'synthetic'
  s.num_train = 512
  s.num_test = 128
  s.image_shape = (32, 32, 3)
  s.num_classes = 10
  s.seed = 0
  s.cell = 1                 # side of the pattern's square cells in pixels (1: per pixel)

  c.dfa = f = ml_collections.ConfigDict()
  f.method = 'ssa'           # bp | svd_bp (factors, backprop) | dfa (dense, random feedback) | ssa
  f.feedback = 'auto'        # auto (ssa: structured, dfa: dense) | structured | dense
  f.feedback_rank = 0        # cap on k per block (0: min(layer rank, classes))
  f.feedback_scale = 1.0     # σ of structured feedback; std·sqrt(C) of dense feedback
  f.delivery = 'channel'     # channel (broadcast over space) | full (feature-map feedback)
  f.align = 'subspace'       # none | subspace | channel_subspace | output | next (docs/method.md)
  f.align_weight = 0.1
  f.orth_weight = 0.1        # ‖UᵀU−I‖²/r² + ‖VᵀV−I‖²/r², for factored methods
  f.hoyer_weight = 0.0       # ‖s‖₁/‖s‖₂ on singular values, for factored methods
  f.signal = 'global'        # global (output error) | local (fixed readout per block) | mixed
  f.signal_mix = 0.5         # mixed: the global error's share of the error sent to a block
  f.readout_dim = 512        # local readout: conv taps avg-pooled to g×g, largest g with g²c ≤ this
  f.readout_basis = 'sinusoidal'  # sinusoidal (LLS, as factors) | random (orthonormal P, Q)
  f.readout_norm = True      # per-sample L2 normalisation of the pooled readout features
  f.readout_layers = 0       # learned 1×1 ReLU layers on a conv block's pooled map (DGL's MLP-SR)
  f.readout_temperature = 0.5
  f.sim_weight = 0.0         # β of the similarity-matching term (Nøkland & Eidnes: 0.99)
  f.learn_feedback = 'none'  # none | local (readouts learn their CE: "pred") | global (DKP)
  f.recon_weight = 0.0       # λ of InfoPro's reconstruction term (a learned decoder per conv readout)
  f.recon_size = 0           # side of the image the decoders reconstruct (0: the input's)
  f.bp_blocks = ()           # diagnosis: these blocks (top-level param names) learn by backprop
  f.modules = ''             # 'conv1+conv2,conv3+fc1+head': backprop within each, a cut between
                             # (names may be fnmatch patterns: 'conv1+stage1_*,stage2_*,...')
  f.overlap = False          # LoCo: the gradient at a cut also trains the block below (small_conv, resnets)
  f.blockwise = False        # resnets, local signal: each block's update right after its forward
  f.feedback_lr = 1e-4       # learned feedback: AdamW (DKP's recipe: 1e-4, wd 1e-6, ×0.8/epoch)
  f.feedback_weight_decay = 1e-6
  f.feedback_lr_decay = 0.8  # per epoch

  c.opt = o = ml_collections.ConfigDict()
  o.name = 'adam'            # adam | adamw | sgd
  o.lr = 1e-3                # ssa's held-out choice: results/cifar10_small_conv/tuning.md
  o.schedule = 'cosine'      # cosine | constant, after a linear warmup
  o.warmup_steps = 200
  o.b1 = 0.9
  o.b2 = 0.999
  o.momentum = 0.9           # sgd only
  o.weight_decay = 0.0       # adamw only
  o.clip_norm = 0.0          # 0: no clipping
  o.retract_every = 0        # exact QR retraction of the factors every N steps (0: never)
  o.factor_lr_scale = 1.0    # the u, s, v leaves step at this fraction of opt.lr (1: the same)

  c.rank = r = ml_collections.ConfigDict()  # rank reduction during training (svd_bp/ssa)
  r.epochs = ()              # reduce after these epochs, e.g. '(3, 6)'; (): the rank is fixed
  r.energy = 0.95            # each layer keeps its smallest rank holding this share of Σ s²
  r.floor = 1.0              # never below: an int rank, or a fraction 0 < f < 1 of full rank

  c.train = t = ml_collections.ConfigDict()
  t.epochs = 10
  t.batch_size = 128         # global; divisible by the device count
  t.seed = 0
  t.log_every = 50           # steps between train metrics
  t.angle_every = 500        # steps between DFA-vs-BP angle measurements (0: never)
  t.eval_every_epochs = 1
  t.checkpoint_every_epochs = 1
  t.keep_checkpoints = 2
  t.stop_after_steps = 0     # end early (drills, quick looks); the schedule still uses epochs
  t.num_devices = 0          # 0: all devices
  t.distributed = False      # call jax.distributed.initialize() (multi-process, multi-host)
  t.coordinator_address = ''  # 'host:port' of process 0 where JAX cannot auto-detect it
  t.num_processes = 0        # with coordinator_address: how many processes
  t.process_id = -1          # with coordinator_address: this process's index
  t.timeout_s = 300          # how long processes wait for each other: to join, after setup
  t.heartbeat_s = 100        # a dead process makes the others abort after this many seconds
  t.progress_bar = True
  t.xla_scheduler = 'auto'   # auto | default | memory: XLA:CPU's scheduler for the train step
  #                           (same update; auto: compile under both, keep the program with fewer
  #                           temporary bytes: two compiles per program; docs/benchmarks.md)
  t.max_loss = 0.0           # stop (diverged) when the train loss exceeds it; 0: 20 × ln(classes)

  if arg:
    apply_arg(c, arg)
  return c


def zoo_cifar(name: str, **kwargs) -> ml_collections.ConfigDict:
  """The shared CIFAR-10 recipe of the model-zoo configs (ReLU + BN nets, 100 epochs)."""
  c = get_config()
  c.model.name = name
  c.model.act = 'relu'       # the architectures' own; BN keeps ReLU stable under DFA here
  c.model.rank = 0.25
  c.model.overrides = 'conv1:dense,head:dense'  # fnmatch patterns on layer paths, last wins
  c.model.kwargs = ml_collections.ConfigDict(kwargs)
  c.data.name = 'cifar10'
  c.data.source = 'offline'
  c.opt.lr = 1e-3
  c.opt.warmup_steps = 500
  c.train.epochs = 100
  return c


def apply_arg(c: ml_collections.ConfigDict, arg: str) -> None:
  """Config-file arguments, comma separated: ``smoke``.

  ``smoke``: synthetic data of the config's image shape and classes whose class patterns are
  8-pixel cells (16 for ImageNet shapes), no augmentation (a crop or flip would move the
  pattern), 6 short epochs: bp and ssa reach ≥ 90 % on it in seconds, so a smoke run shows
  that training works (tests/main_test.py).
  """
  for a in filter(None, arg.split(',')):
    if a == 'smoke':
      c.data.synthetic.image_shape = {'imagenet2012': (64, 64, 3)}.get(c.data.name, (32, 32, 3))
      c.data.synthetic.num_classes = {'cifar100': 100, 'imagenet2012': 1000}.get(c.data.name, 10)
      c.data.source = 'synthetic'
      c.data.synthetic.num_train = 256
      c.data.synthetic.num_test = 64
      c.data.synthetic.cell = 16 if c.data.name == 'imagenet2012' else 8
      c.data.augment = False
      c.train.epochs = 6
      c.train.batch_size = 32
      c.train.log_every = 2
      c.train.angle_every = 4
      c.opt.warmup_steps = 2
    else:
      raise ValueError(f'unknown config argument {a!r}; known: smoke.')
