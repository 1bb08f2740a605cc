"""featx.encoders.pooling against a numpy reference: padding never enters the mean."""
import numpy as np
import torch

from featx.encoders.pooling import cls, masked_mean, pool


def test_masked_mean_and_cls_match_numpy_and_ignore_padding():
    rng = np.random.default_rng(0)
    L, B, T, D = 3, 5, 7, 4
    hidden = rng.standard_normal((L, B, T, D)).astype(np.float32)
    lengths = np.array([7, 1, 3, 6, 2])
    mask = np.arange(T)[None, :] < lengths[:, None]
    hidden[:, ~mask] = 1e6  # padding holds junk: it must not reach the mean
    got = masked_mean([torch.from_numpy(h) for h in hidden], torch.from_numpy(mask)).numpy()
    want = np.stack([[hidden[layer, b, :lengths[b]].mean(0) for layer in range(L)] for b in range(B)])
    assert got.shape == (B, L, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    first = cls([torch.from_numpy(h) for h in hidden]).numpy()
    np.testing.assert_array_equal(first, hidden[:, :, 0].transpose(1, 0, 2))
    both = pool([torch.from_numpy(h).to(torch.bfloat16) for h in hidden[:, :, :1]],
                torch.ones(B, 1, dtype=torch.bool), ["mean", "cls"])
    assert both["mean"].dtype == torch.float32 and torch.equal(both["mean"], both["cls"])


def test_masked_mean_stays_float32_inside_a_half_precision_autocast():
    # bmm is on autocast's half-precision list: without care the means would be rounded to bf16
    torch.manual_seed(0)
    hidden = [torch.randn(4, 50, 16) for _ in range(3)]
    mask = torch.arange(50)[None, :] < torch.tensor([50, 7, 33, 1])[:, None]
    want = masked_mean(hidden, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = masked_mean(hidden, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_last_is_the_last_valid_position_under_left_and_right_padding():
    rng = np.random.default_rng(1)
    L, B, T, D = 2, 4, 6, 3
    hidden = rng.standard_normal((L, B, T, D)).astype(np.float32)
    lengths = np.array([6, 1, 4, 2])
    right = np.arange(T)[None, :] < lengths[:, None]
    left = right[:, ::-1].copy()
    for mask in (right, left):
        got = pool([torch.from_numpy(h) for h in hidden], torch.from_numpy(mask), ["last"])["last"].numpy()
        at = np.array([np.nonzero(row)[0].max() for row in mask])
        want = np.stack([hidden[:, b, at[b]] for b in range(B)])
        np.testing.assert_array_equal(got, want)


def test_layers_of_differing_widths_are_zero_padded_to_the_width():
    hidden = [torch.ones(2, 3, 4), 2 * torch.ones(2, 3, 6)]
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = pool(hidden, mask, ["mean", "cls", "last"], width=6)
    for v in out.values():
        assert v.shape == (2, 2, 6)
        assert torch.equal(v[:, 0, 4:], torch.zeros(2, 2)) and torch.equal(v[:, 0, :4], torch.ones(2, 4))
        assert torch.equal(v[:, 1], 2 * torch.ones(2, 6))
