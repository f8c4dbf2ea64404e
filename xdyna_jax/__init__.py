"""xdyna-jax: X-Dyna human image animation in JAX/Flax NNX."""

from xdyna_jax.bundle import BundleError, load, save
from xdyna_jax.nn.compute import Compute

__all__ = ["BundleError", "Compute", "load", "save"]
__version__ = "0.1.0"
