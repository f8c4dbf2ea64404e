"""Context windows against the release's uniform schedule (written in oracle.py as that code loops)."""

import numpy as np
import pytest
from oracle import release_context_windows

from xdyna_jax.sampling.windows import context_windows, frame_counts, num_windows, window_length


def test_windows_and_counts_equal_the_release_for_every_length_and_offset():
    for n in range(1, 61):
        for offset in range(16):
            ref = list(release_context_windows(0, n, offset=offset))
            got = context_windows(n, offset=offset if n > 16 else 0)
            np.testing.assert_array_equal(got, np.array(ref), err_msg=f"N={n} offset={offset}")
            assert got.shape == (num_windows(n), window_length(n))
            counts = np.zeros(n, int)
            for w in ref:
                for f in w:
                    counts[f] += 1
            np.testing.assert_array_equal(frame_counts(got, n), counts)
            assert counts.min() >= 1  # every frame is denoised by some window


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 1 driven frame"):
        context_windows(0)
    with pytest.raises(ValueError, match="overlap < window"):
        context_windows(40, window=8, overlap=8)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 16\)"):
        context_windows(40, offset=16)
