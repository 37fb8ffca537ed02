"""lrdfa_jax: local learning on low-rank manifolds (SSA) in JAX/Flax.

``from lrdfa_jax import layers, feedback, dfa, losses, optim, models``: pure functions on
plain pytrees, no global state.
"""
from lrdfa_jax import dfa, feedback, layers, losses, models, optim

__all__ = ['dfa', 'feedback', 'layers', 'losses', 'models', 'optim']
__version__ = '0.1.0'
