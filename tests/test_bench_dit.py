"""bench/dit_cpu.py's full-size figure puts XLA's FLOP count of the DynamiCtrl forward next to an analytic count
written from the equations; the comparison means something only if the formula counts what the model runs.
Checked here on a small config whose work is matmul-dominated (width 256, head 64, fp32): XLA's count is the
analytic one plus ~2 % of elementwise work (norms, modulation, softmax, GELU), so a formula that drops or
doubles any part above ~1.5 % of the total (patch embeddings 6 %, attention 6 %, head 1.5 %, a layer's
projections or feed-forward) falls outside the band."""

from bench.dit_cpu import COGVIDEOX15_I2V, analytic_flops, xla_flops

SMALL = dict(
    COGVIDEOX15_I2V,
    num_attention_heads=4,
    attention_head_dim=64,
    time_embed_dim=64,
    ofs_embed_dim=64,
    text_embed_dim=128,
    num_layers=2,
    sample_height=32,
    sample_width=32,
)
LATENT, TEXT, BATCH = (2, 24, 16), 16, 2  # 96 video + 16 text tokens


def test_analytic_count_matches_xla_on_a_small_dynamictrl():
    analytic = analytic_flops(SMALL, LATENT, TEXT, batch=BATCH)["total"]
    xla, *_ = xla_flops(SMALL, LATENT, TEXT, BATCH, dtype="float32")
    assert 1.0 <= xla / analytic < 1.03, (xla, analytic)


def test_analytic_count_of_the_reference_size():
    # the reference's own figure for 1360x768 x 37 frames: ~416 TFLOP per single-sample forward
    parts = analytic_flops(dict(COGVIDEOX15_I2V, num_layers=42), (10, 170, 96), 226)
    assert abs(parts["total"] / 1e12 - 416) < 1
