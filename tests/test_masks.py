"""Block masks: builders against brute-force element masks, the transposed lists, and errors."""
import numpy as np
import pytest

from cuflash.masks import BlockMask


def band(sq, sk, left, right):
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    d = sk - sq
    ok = np.ones((sq, sk), bool)
    if left >= 0:
        ok &= j >= i + d - left
    if right >= 0:
        ok &= j <= i + d + right
    return ok


def check_consistent(m: BlockMask):
    """Lists, transposed lists, states and bits describe the same mask."""
    states = m.to_dense()
    # transposed lists = lists of the transposed states
    t = np.zeros(states.transpose(0, 1, 3, 2).shape, np.int8)
    for index, count, value in ((m.t_partial_index, m.t_partial_count, 1), (m.t_full_index, m.t_full_count, 2)):
        b, h, k, s = np.nonzero(np.arange(index.shape[-1]) < count[..., None])
        t[b, h, k, index[b, h, k, s]] = value
    assert np.array_equal(t, states.transpose(0, 1, 3, 2))
    # lists are ascending and padded with -1
    for index, count in ((m.full_index, m.full_count), (m.partial_index, m.partial_count)):
        valid = np.arange(index.shape[-1]) < count[..., None]
        assert (index[~valid] == -1).all()
        assert all(np.all(np.diff(row[row >= 0]) > 0) for row in index.reshape(-1, index.shape[-1]))
    # every transposed partial entry points at the same bits as the forward entry
    b, h, k, s = np.nonzero(np.arange(m.t_partial_index.shape[-1]) < m.t_partial_count[..., None])
    for bb, hh, kk, ss in zip(b, h, k, s):
        q = m.t_partial_index[bb, hh, kk, ss]
        fwd_slot = m.partial_slot[bb, hh, q][list(m.partial_index[bb, hh, q]).index(kk)]
        assert fwd_slot == m.t_partial_slot[bb, hh, kk, ss]
    assert m.density == pytest.approx((states > 0).mean())


@pytest.mark.parametrize("sq, sk", [(1, 1), (17, 300), (300, 17), (1000, 1000), (1023, 1024), (640, 512)])
@pytest.mark.parametrize("block", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("window", [(-1, 0), (100, 0), (64, 64), (0, 0), (-1, 37)])
def test_band_builders_are_exact(sq, sk, block, window):
    m = BlockMask.sliding_window(sq, sk, *window, *block)
    assert np.array_equal(m.to_element_mask()[0, 0], band(sq, sk, *window))
    check_consistent(m)
    states = m.to_dense()[0, 0]
    # full blocks really are full and skipped blocks really are empty
    e = np.zeros((states.shape[0] * block[0], states.shape[1] * block[1]), bool)
    e[:sq, :sk] = band(sq, sk, *window)
    valid = np.zeros_like(e)
    valid[:sq, :sk] = True
    for qb, kb in np.ndindex(states.shape):
        blk = e[qb * block[0]:(qb + 1) * block[0], kb * block[1]:(kb + 1) * block[1]]
        vb = valid[qb * block[0]:(qb + 1) * block[0], kb * block[1]:(kb + 1) * block[1]]
        assert (states[qb, kb] == 0) == (not blk.any())
        assert (states[qb, kb] == 2) == (blk.any() and (blk | ~vb).all())


def test_causal_is_the_bottom_right_band():
    m = BlockMask.causal(300, 500, 64, 64)
    assert np.array_equal(m.to_element_mask()[0, 0], band(300, 500, -1, 0))


@pytest.mark.parametrize("block", [(64, 64), (128, 128)])
def test_predicate_builder_matches_brute_force(block):
    rng = np.random.default_rng(0)
    b, h, sq, sk = 2, 3, 200, 333
    dense = rng.random((b, h, sq, sk)) < 0.3
    dense[..., :64, :] = False  # some empty rows
    dense[0, 0, 100:, 128:256] = True  # some full blocks

    def predicate(bi, hi, qi, ki):
        return dense[bi, hi, np.minimum(qi, sq - 1), np.minimum(ki, sk - 1)]

    m = BlockMask.from_predicate(predicate, b, h, sq, sk, *block)
    assert m.shape[:2] == (b, h)
    assert np.array_equal(m.to_element_mask(), dense)
    check_consistent(m)


def test_predicate_builder_broadcasts_over_batch_and_heads():
    m = BlockMask.from_predicate(lambda b, h, q, k: k <= q, 1, 1, 257, 257, 64, 64)
    assert m.shape[:2] == (1, 1)
    assert np.array_equal(m.to_dense(), BlockMask.causal(257, 257, 64, 64).to_dense())
    m.check(batch=4, nheads=8, seqlen_q=257, seqlen_k=257)


def test_dense_and_patterns():
    blocks = np.eye(4, dtype=bool)
    m = BlockMask.from_dense(blocks, 512, 512, 128, 128)
    assert m.density == 0.25 and m.partial_count.sum() == 0
    assert np.array_equal(m.to_element_mask()[0, 0], np.kron(blocks, np.ones((128, 128), bool)))
    bf = BlockMask.butterfly(2048, 2048).to_dense()[0, 0] > 0
    for r, c in zip(*np.nonzero(bf)):
        x = r ^ c
        assert x & (x - 1) == 0
    assert bf.sum() == 16 * 5  # identity plus 4 butterfly factors
    lgr = BlockMask.local_global_random(4096, 4096, local_blocks=1, global_blocks=1, random_blocks=2, seed=3)
    states = lgr.to_dense()[0, 0] > 0
    assert states[0].all() and states[:, 0].all()
    assert all(states[r, max(0, r - 1):r + 2].all() for r in range(32))
    assert (states.sum(1)[1:] >= 3).all()
    assert np.array_equal(states, BlockMask.local_global_random(4096, 4096, 1, 1, 2, seed=3).to_dense()[0, 0] > 0)
    check_consistent(lgr)


def test_64k_masks_build_quickly():
    import time

    t0 = time.perf_counter()
    m = BlockMask.sliding_window(65536, 65536, 1024, 0)
    BlockMask.local_global_random(65536, 65536, 2, 1, 2)
    assert time.perf_counter() - t0 < 10
    assert 0.015 < m.density < 0.03


def test_repr_shows_sparsity():
    r = repr(BlockMask.causal(256, 256, 128, 128))
    assert "density=0.750" in r and "full=1" in r and "partial=2" in r
    assert "█" in r and "░" in r


def test_errors():
    with pytest.raises(ValueError, match="block_m must be a positive multiple of 16"):
        BlockMask.causal(100, 100, 50, 64)
    with pytest.raises(ValueError, match="block_n must be a multiple of 32"):
        BlockMask.causal(100, 100, 64, 48)
    with pytest.raises(ValueError, match=r"must have 2 x 2 blocks"):
        BlockMask.from_dense(np.ones((3, 3), bool), 200, 200, 128, 128)
    m = BlockMask.causal(256, 256, 128, 128)
    with pytest.raises(ValueError, match=r"built for seqlens \(256, 256\)"):
        m.check(1, 1, 256, 300)
    m2 = BlockMask.from_dense(np.ones((2, 3, 2, 2), bool), 256, 256, 128, 128)
    with pytest.raises(ValueError, match=r"\(batch, heads\) = \(2, 3\) must be 1 or match"):
        m2.check(2, 4, 256, 256)
