"""Mesh construction from axis sizes."""

import pytest

from xdyna_jax.sharding import make_mesh


def test_mesh_sizes():
    assert make_mesh(data=-1, tensor=2).shape == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh(data=3, tensor=2)
    with pytest.raises(ValueError, match="at most one -1"):
        make_mesh(data=-1, fsdp=-1)
