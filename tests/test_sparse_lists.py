"""The kernels' view of a block mask (cuflash._sparse): packed lists decode to the mask's block states
for every (batch, head) and GQA grouping, the causal intersection is exact, and bad masks are named."""
import numpy as np
import pytest

from cuflash import _dispatch, _sparse
from cuflash._arch import ARCHS
from cuflash._tiles import DTYPES, HEAD_DIM_BUCKETS, MASK_BLOCKS, Flags
from cuflash.masks import BlockMask, pack_bits, unpack_bits

from test_masks import band


def random_mask(mb, mh, sq, sk, bm, bn, seed):
    rng = np.random.default_rng(seed)
    nq, nk = -(-sq // bm), -(-sk // bn)
    states = rng.choice(3, size=(mb, mh, nq, nk))
    elements = np.repeat(np.repeat(states, bm, axis=2), bn, axis=3)
    elements = np.where(elements == 1, rng.random(elements.shape) < 0.5, elements == 2)
    return BlockMask.from_predicate(lambda b, h, q, kv: elements[b, h, q, kv], mb, mh, sq, sk, bm, bn)


def decode(buffer, lay: _sparse.ListsLayout, rows_b, rows_h, rows, bits_at, block_words):
    """{(b, h, row): {entry index: bits or None (full)}} from a packed buffer."""
    out = {}
    for b in range(rows_b):
        for h in range(rows_h):
            for r in range(rows):
                row = b * lay.b_stride + h * lay.h_stride + r
                n = buffer[lay.count + row]
                idx = buffer[lay.index + row * lay.cap:][:n]
                slot = buffer[lay.slot + row * lay.cap:][:n]
                out[b, h, r] = {int(i): (None if s < 0 else buffer[bits_at + s * block_words:][:block_words].copy())
                                for i, s in zip(idx, slot)}
                # partial entries come first
                assert all(s >= 0 for s in slot[:np.sum(slot >= 0)])
    return out


@pytest.mark.parametrize("mb, mh, kv_group", [(1, 1, 1), (1, 1, 3), (2, 4, 2), (2, 4, 1), (1, 6, 6)])
def test_packed_lists_decode_to_the_mask(mb, mh, kv_group):
    mask = random_mask(mb, mh, 300, 450, 64, 128, seed=mb * 10 + mh + kv_group)
    buffer, layout = _sparse.pack(mask, kv_group)
    states, slots = mask.to_dense(), mask.slot_matrix()
    _, _, nq, nk = states.shape
    words = mask.block_m * mask.block_n // 32
    bits = mask.partial_bits.reshape(len(mask.partial_bits), -1).view(np.int32)

    def expected_bits(b, h, qb, kb):
        return None if states[b, h, qb, kb] == 2 else bits[slots[b, h, qb, kb]]

    query = decode(buffer, layout.query, mb, mh, nq, layout.bits, words)
    for (b, h, qb), entries in query.items():
        assert set(entries) == set(np.flatnonzero(states[b, h, qb]))
        for kb, got in entries.items():
            exp = expected_bits(b, h, qb, kb)
            assert (got is None and exp is None) or np.array_equal(got, exp)

    # Key-major lists: entries g << group_shift | query block, element bits transposed (rows are keys).
    def expected_bits_t(b, h, qb, kb):
        if states[b, h, qb, kb] == 2:
            return None
        return pack_bits(unpack_bits(mask.partial_bits[slots[b, h, qb, kb]]).T).reshape(-1).view(np.int32)

    heads_k = mh // kv_group if mh > 1 else 1
    key = decode(buffer, layout.key, mb, heads_k, nk, layout.bits_t, words)
    for (b, hk, kb), entries in key.items():
        want = {}
        for g in range(kv_group):
            h = hk * kv_group + g if mh > 1 else 0
            for qb in np.flatnonzero(states[b, h, :, kb]):
                want[g << layout.key.group_shift | qb] = expected_bits_t(b, h, qb, kb)
        assert set(entries) == set(want)
        for e, got in entries.items():
            assert (got is None and want[e] is None) or np.array_equal(got, want[e])


@pytest.mark.parametrize("sq, sk", [(300, 300), (200, 450), (450, 200)])
def test_causal_intersection_is_exact(sq, sk):
    mask = random_mask(2, 1, sq, sk, 64, 64, seed=sq + sk)
    both = _sparse.effective_mask(mask, causal=True)
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    assert np.array_equal(both.to_element_mask(), mask.to_element_mask() & (j <= i + sk - sq))
    assert _sparse.effective_mask(mask, causal=True) is both  # cached
    assert _sparse.effective_mask(mask, causal=False) is mask


def test_check_mask_names_the_problem():
    with pytest.raises(TypeError, match="block_mask must be a cuflash.BlockMask"):
        _sparse.check_mask(np.ones((2, 2)), 1, 1, 128, 128)
    with pytest.raises(ValueError, match="block_mask: .*seqlens"):
        _sparse.check_mask(BlockMask.causal(128, 256), 1, 1, 128, 128)
    with pytest.raises(ValueError, match="block_mask.block_m must be a multiple of 64"):
        _sparse.check_mask(BlockMask.causal(128, 128, 32, 64), 1, 1, 128, 128)
    with pytest.raises(ValueError, match="heads"):
        _sparse.check_mask(BlockMask.from_dense(np.ones((1, 3, 1, 1), bool), 128, 128), 1, 2, 128, 128)


@pytest.mark.parametrize("blocks", MASK_BLOCKS)
def test_sparse_tiles_divide_the_mask_blocks(blocks):
    for dtype in DTYPES:
        for d in HEAD_DIM_BUCKETS:
            for arch in ARCHS:
                f = _dispatch.choose_fwd(dtype, d, Flags(mask_blocks=blocks), arch)
                assert f.sparse and not f.band and blocks[0] % f.block_m == 0 and blocks[1] % f.block_n == 0
                assert f.block_m % (16 * f.warps) == 0
            _, dkdv, dq = _dispatch.choose_bwd(dtype, d, Flags(mask_blocks=blocks))
            assert dkdv.sparse and dq.sparse and not (dkdv.band or dq.band)
            assert blocks[1] % dkdv.block_n == 0 and blocks[0] % dkdv.block_q == 0
            assert blocks[0] % dq.block_m == 0 and blocks[1] % dq.block_n == 0


def test_layout_round_trips_through_ints():
    _, layout = _sparse.pack(random_mask(1, 2, 200, 200, 64, 64, 0), 2)
    assert _sparse.PackedLayout.from_ints(layout.to_ints()) == layout
    assert all(type(i) is int for i in layout.to_ints())


def test_intersection_of_masks_without_partial_blocks():
    full = BlockMask.from_dense(np.ones((1, 2), bool), 1, 129)
    both = full & BlockMask.sliding_window(1, 129, -1, 30)
    i, j = np.arange(1)[:, None], np.arange(129)[None, :]
    assert np.array_equal(both.to_element_mask()[0, 0], j <= i + 128 + 30)
    assert np.array_equal((full & full).to_dense(), full.to_dense())


@pytest.mark.parametrize("window, causal", [((16, 0), False), ((0, -1), True), ((40, 7), True), ((3, 50), False),
                                            ((-1, 130), False)])
def test_varlen_window_is_each_sequences_ownband(window, causal):
    lengths_q, lengths_k = (5, 0, 130, 1, 77, 129), (9, 3, 130, 200, 0, 129)
    # No block mask: the kernels' band applies causal and the window per sequence themselves.
    for w in ((-1, -1), window):
        assert _sparse.varlen_mask(None, w, causal, lambda: pytest.fail("lengths read"), 130, 200) == (None, causal, w)
    # With a block mask (here one with every block), the window becomes each sequence's own band in it.
    full = BlockMask.from_dense(np.ones((2, 2), bool), 130, 200)
    mask, kernel_causal, kernel_window = _sparse.varlen_mask(full, window, causal, lambda: (lengths_q, lengths_k),
                                                             130, 200)
    assert not kernel_causal and kernel_window == (-1, -1)
    assert mask.shape[:2] == (6, 1) and (mask.seqlen_q, mask.seqlen_k) == (130, 200)
    elements = mask.to_element_mask()
    left, right = window
    if causal:
        right = 0 if right == -1 else min(right, 0)
    for b, (sq, sk) in enumerate(zip(lengths_q, lengths_k)):
        assert np.array_equal(elements[b, 0, :sq, :sk], band(sq, sk, left, right))


def test_varlen_mask_with_a_block_mask():
    lengths = ((100, 256, 3), (256, 40, 3))
    block = BlockMask.from_dense(np.tril(np.ones((2, 2), bool)) | np.eye(2, k=1, dtype=bool)[::-1], 256, 256)
    same, causal, window = _sparse.varlen_mask(block, (-1, -1), False, lambda: pytest.fail("lengths read"), 256, 256)
    assert same is block and causal is False and window == (-1, -1)  # nothing depends on the lengths: no host read
    mask, causal, window = _sparse.varlen_mask(block, (-1, -1), True, lambda: lengths, 256, 256)
    assert causal is False and window == (-1, -1)
    elements, dense = mask.to_element_mask(), block.to_element_mask()[0, 0]
    for b, (sq, sk) in enumerate(zip(*lengths)):
        assert np.array_equal(elements[b, 0, :sq, :sk], dense[:sq, :sk] & band(sq, sk, -1, 0))
    with pytest.raises(ValueError, match="longer than max_seqlen_q"):
        _sparse.varlen_mask(block, (8, 0), False, lambda: ((300,), (10,)), 256, 256)
    with pytest.raises(ValueError, match="block_mask was built for seqlens"):
        _sparse.varlen_mask(block, (8, 0), False, lambda: lengths, 128, 256)


def test_a_mask_without_partial_blocks_packs():
    mask = BlockMask.butterfly(512, 512, 64, 128)
    assert len(mask.partial_bits) == 0
    buffer, layout = _sparse.pack(mask, kv_group=2)
    assert layout.bits == layout.bits_t  # both empty
    assert buffer[layout.key.count:][:mask.to_dense().shape[-1]].sum() == 2 * (mask.to_dense() > 0).sum()


@pytest.mark.parametrize("kv_group", [1, 2])
def test_query_rows_run_heaviest_first(kv_group):
    mask = random_mask(2, 4, 300, 450, 64, 128, seed=kv_group)
    buffer, layout = _sparse.pack(mask, kv_group)
    lay, rows = layout.query, -(-300 // 64)
    for b in range(2):
        for h in range(4):
            base = b * lay.b_stride + h * lay.h_stride
            order, counts = buffer[lay.order + base:][:rows], buffer[lay.count + base:][:rows]
            assert sorted(order) == list(range(rows))
            assert all(np.diff(counts[order]) <= 0)
    assert layout.key.order == -1 and layout.lists_args(4096, key_major=True)[4] == 0  # key blocks run in order


def test_row_tiles_cover_every_tile_of_every_row_block():
    lists = (1,) * _dispatch.LISTS_ROW_BLOCK + (256, 128, 0)
    assert _dispatch.row_tiles(300, 128, lists) == 4  # two row blocks of 256 rows, two tiles each
    assert _dispatch.row_tiles(300, 128, _dispatch.NO_LISTS) == 3
