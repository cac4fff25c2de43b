"""jaxlm: a JAX/Flax trainer for causal language-model pretraining."""

__version__ = '0.1.0'
