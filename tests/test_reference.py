"""The float64 reference against a direct loop, on the host."""
import math

import numpy as np
import pytest

from cuflash.reference import attention_reference, causal_mask


def loop_attention(q, k, v, causal, scale):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = np.zeros((b, sq, h, d))
    lse = np.full((b, h, sq), -np.inf)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                keys = [j for j in range(sk) if not causal or j <= i + sk - sq]
                if not keys:
                    continue
                s = np.array([q[bi, i, hi] @ k[bi, j, kh] * scale for j in keys])
                m = s.max()
                p = np.exp(s - m)
                lse[bi, hi, i] = m + math.log(p.sum())
                out[bi, i, hi] = sum(pj * v[bi, j, kh] for pj, j in zip(p / p.sum(), keys))
    return out, lse


@pytest.mark.parametrize("sq, sk", [(1, 1), (5, 3), (3, 7), (9, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_loops(sq, sk, causal):
    rng = np.random.default_rng(sq * 10 + sk)
    q = rng.standard_normal((2, sq, 4, 8))
    k = rng.standard_normal((2, sk, 2, 8))
    v = rng.standard_normal((2, sk, 2, 8))
    out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=0.3)
    out2, lse2 = loop_attention(q, k, v, causal, 0.3)
    np.testing.assert_allclose(out, out2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse2, rtol=1e-12)


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    m = causal_mask(4, 2)  # the first two queries see nothing
    assert m.sum(axis=1).tolist() == [0, 0, 1, 2]


def test_rows_that_see_nothing_are_zero_with_lse_minus_inf():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 1, 8))
    kv = rng.standard_normal((1, 2, 1, 8))
    out, lse = attention_reference(q, kv, kv, causal=True)
    assert not np.isnan(out).any()
    assert (out[0, :2] == 0).all() and np.isneginf(lse[0, 0, :2]).all()
    out, lse = attention_reference(q, kv[:, :0], kv[:, :0])
    assert (out == 0).all() and np.isneginf(lse).all()


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    from cuflash.reference import philox4x32_10

    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        assert tuple(int(x) for x in philox4x32_10(np.array(counter, np.uint32), np.array(key, np.uint32))) == expected


@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.5, 0.97])
def test_dropout_keep_mask_rate_and_independence(dropout_p):
    from cuflash.reference import dropout_keep_mask

    m = dropout_keep_mask(42, 8, 2, 3, 300, 500, dropout_p)
    assert m.shape == (2, 3, 300, 500) and m.dtype == bool
    keep = 1 - dropout_p
    assert abs(m.mean() - keep) <= 5 * np.sqrt(keep * (1 - keep) / m.size) + 1e-12
    if 0 < dropout_p:
        # Heads, batches, offsets and seeds get different masks; neighbours are uncorrelated.
        assert not np.array_equal(m[0, 0], m[0, 1]) and not np.array_equal(m[0], m[1])
        assert not np.array_equal(m, dropout_keep_mask(42, 12, 2, 3, 300, 500, dropout_p))
        assert not np.array_equal(m, dropout_keep_mask(43, 8, 2, 3, 300, 500, dropout_p))
        x = m.astype(float) - keep
        for a, b in ((x[..., 1:, :], x[..., :-1, :]), (x[..., 1:], x[..., :-1]), (x[..., 16:, :], x[..., :-16, :])):
            assert abs((a * b).mean()) < 5 * keep * (1 - keep) / np.sqrt(a.size)


def test_dropout_mask_is_a_function_of_the_element():
    """A smaller problem's mask is the corner of a larger one's: tiles cannot change the numbers."""
    from cuflash.reference import dropout_keep_mask

    big = dropout_keep_mask(7, 0, 1, 2, 100, 90, 0.3)
    np.testing.assert_array_equal(dropout_keep_mask(7, 0, 1, 2, 37, 21, 0.3), big[:, :, :37, :21])


def test_reference_dropout_scales_kept_probabilities():
    from cuflash.reference import attention_reference

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 5, 1, 8)) for _ in range(3))
    out, lse = attention_reference(q, k, v)
    keep_all = np.ones((1, 1, 5, 5), bool)
    out_d, lse_d = attention_reference(q, k, v, dropout_mask=keep_all, dropout_p=0.5)
    np.testing.assert_allclose(out_d, 2 * out)
    np.testing.assert_allclose(lse_d, lse)
