"""PyTorch checkpoint readers/writers and converters for xdyna-jax."""
