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
