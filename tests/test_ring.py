"""Ring attention (cuflash.distributed, _ring.py) on CPUs: the chunk plan covers every visible (query, key)
pair once, the merge is exact where rows saw nothing, and the ring's forward and backward over 1-4 ranks
(threads in one process, and processes over gloo) equal whole-sequence attention, with a float64 chunk
attention in place of the kernels (tests/test_ring_gpu.py runs the kernels)."""
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cuflash import _ring  # noqa: E402
import cuflash.distributed as cd  # noqa: E402
from cuflash.distributed import ring_flash_attn_func, ring_flash_attn_varlen_func, shard, unshard  # noqa: E402

import ring_helpers as rh  # noqa: E402

LAYOUTS = ("zigzag", "contiguous")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_then_unshard_is_the_identity(layout, world_size):
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    parts = [shard(x, world_size, r, layout=layout) for r in range(world_size)]
    assert all(p.shape == (2, 24 // world_size, 3) for p in parts)
    assert torch.equal(unshard(parts, layout=layout), x)
    if layout == "zigzag" and world_size == 2:  # chunks 0 and 3, 1 and 2
        assert parts[0][0, :, 0].tolist() == [3 * t for t in [*range(6), *range(18, 24)]]


def test_shard_refuses_what_does_not_split():
    x = torch.zeros(1, 10, 2)
    with pytest.raises(ValueError, match="10 tokens"):
        shard(x, 3, 0, layout="contiguous")
    with pytest.raises(ValueError, match="4 equal chunks"):
        shard(torch.zeros(1, 6, 2), 2, 0)
    with pytest.raises(ValueError, match="rank"):
        shard(x, 2, 2, layout="contiguous")
    with pytest.raises(ValueError, match="layout"):
        shard(x, 2, 0, layout="striped")


def _positions(layout, world_size, rank, n):
    return shard(torch.arange(n), world_size, rank, dim=0, layout=layout).numpy()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_steps_cover_each_visible_pair_once(layout, world_size, causal):
    """Over all ranks and steps, the planned chunk pairs cover exactly the pairs the mask shows, once each."""
    n = 4 * world_size
    seqlen = n // world_size
    count = np.zeros((n, n), dtype=int)
    for rank in range(world_size):
        q_pos = _positions(layout, world_size, rank, n)
        for source in range(world_size):
            step = _ring.plan(rank, source, seqlen, causal, layout)
            if step is None:
                continue
            k_pos = _positions(layout, world_size, source, n)
            rows, cols = q_pos[step.q_rows], k_pos[step.kv_rows]
            visible = np.tril(np.ones((len(rows), len(cols)), dtype=bool)) if step.causal else True
            count[np.ix_(rows, cols)] += visible
    expected = np.tril(np.ones((n, n), dtype=int)) if causal else np.ones((n, n), dtype=int)
    assert np.array_equal(count, expected)


def test_zigzag_spreads_causal_work_evenly():
    world_size, seqlen = 4, 8
    work = []
    for rank in range(world_size):
        pairs = 0
        for source in range(world_size):
            s = _ring.plan(rank, source, seqlen, True, "zigzag")
            if s is not None:
                rows, cols = s.q_rows.stop - s.q_rows.start, s.kv_rows.stop - s.kv_rows.start
                pairs += rows * cols // (2 if s.causal else 1)
        work.append(pairs)
    assert len(set(work)) == 1, work


def test_merge_of_rows_that_saw_nothing():
    """-inf on both sides stays 0 and -inf (no NaN); -inf on one side takes the other's result as it is."""
    out = torch.zeros(1, 3, 1, 2)
    lse = torch.tensor([[[float("-inf"), float("-inf"), 0.5]]])
    part_out = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]])
    part_lse = torch.tensor([[[float("-inf"), 1.0, float("-inf")]]])
    out[0, 2, 0] = torch.tensor([7.0, 8.0])
    _ring.merge(out, lse, part_out, part_lse)
    assert torch.equal(out, torch.tensor([[[[0.0, 0.0]], [[3.0, 4.0]], [[7.0, 8.0]]]]))
    assert torch.equal(lse, torch.tensor([[[float("-inf"), 1.0, 0.5]]]))


def test_merge_is_the_softmax_over_both_key_sets():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    whole_out, whole_lse = rh.attend(q, k, v, False, 0.5)
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full((2, 3, 5), float("-inf"))
    for part in (slice(0, 2), slice(2, 5)):
        o, l = rh.attend(q, k[:, part], v[:, part], False, 0.5)
        _ring.merge(out, lse, o.float(), l.float())
    torch.testing.assert_close(out.double(), whole_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), whole_lse, rtol=1e-6, atol=1e-6)


def _inputs(world_size, heads, kv_heads, seed, per_rank=6, batch=2, d=8):
    g = torch.Generator().manual_seed(seed)
    n = per_rank * world_size
    shapes = [(batch, n, heads, d), (batch, n, kv_heads, d), (batch, n, kv_heads, d), (batch, n, heads, d)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _whole(q, k, v, dout, causal, scale):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = rh.full_attention(q, k, v, causal, scale)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_simulated_ring_equals_whole_attention(world_size, layout, causal, heads, kv_heads):
    """The ring's loops on threads in one process (one per rank), forward and backward."""
    scale = 0.4
    q, k, v, dout = _inputs(world_size, heads, kv_heads, seed=world_size)

    def rank_fn(rank, ring):
        mine = [shard(x, world_size, rank, layout=layout) for x in (q, k, v, dout)]
        out, lse = _ring.ring_forward(*mine[:3], ring, rh.chunk_attend, causal, layout, scale)
        grads = _ring.ring_backward(mine[3], *mine[:3], out, lse, ring, rh.chunk_attend_backward, causal, layout,
                                    scale)
        return (out,) + grads

    per_rank = rh.run_ranks(world_size, rank_fn)
    got = [unshard([r[i] for r in per_rank], layout=layout) for i in range(4)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, _whole(q, k, v, dout, causal, scale)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # (the merge runs in float32)


def test_ranks_whose_chunks_see_nothing():
    """Contiguous causal: rank 0's rows see only its own chunk, and its later steps are skipped; a query row
    that sees no key at all (here none: every row sees itself) would keep out 0 (merge test above)."""
    assert _ring.plan(0, 1, 8, True, "contiguous") is None
    assert _ring.plan(1, 0, 8, True, "contiguous") == _ring.Step(slice(0, 8), slice(0, 8), False, 0)


def test_distributed_world_size_one_over_gloo(monkeypatch):
    """ring_flash_attn_func itself, one rank (no transfers), gloo, the float64 chunk attention."""
    import torch.distributed as dist

    import cuflash.distributed as cd

    monkeypatch.setattr(cd, "_LOCAL", (rh.chunk_attend, rh.chunk_attend_backward))
    monkeypatch.setattr(cd, "_CHECK", lambda q, k, v: None)
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            q, k, v, dout = _inputs(1, 4, 2, seed=3)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = ring_flash_attn_func(*leaves, causal=True, softmax_scale=0.3)
            out.backward(dout)
        finally:
            dist.destroy_process_group()
    for name, a, b in zip(("out", "dq", "dk", "dv"), [out.detach()] + [x.grad for x in leaves],
                          _whole(q, k, v, dout, True, 0.3)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("world_size, layout, causal", [(2, "zigzag", True), (3, "contiguous", True),
                                                        (4, "zigzag", False)])
def test_distributed_ring_over_gloo_processes(world_size, layout, causal, tmp_path):
    """ring_flash_attn_func on world_size processes that pass chunks with gloo's send and receive."""
    import torch.multiprocessing as mp

    inputs = _inputs(world_size, 4, 2, seed=world_size)
    case = dict(inputs=inputs, layout=layout, causal=causal)
    mp.spawn(rh.ring_worker, args=(world_size, str(tmp_path / "init"), case, str(tmp_path)), nprocs=world_size)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world_size)]
    got = [unshard([r[key] for r in results], layout=layout) for key in ("out", "dq", "dk", "dv")]
    scale = 1 / inputs[0].shape[-1] ** 0.5
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, _whole(*inputs, causal, scale)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _block_masks(n, block):
    from cuflash import BlockMask

    window = BlockMask.sliding_window(n, n, 3 * block // 2, 0, block, block)  # partial blocks on its edge
    sparse = BlockMask.local_global_random(n, n, local_blocks=0, global_blocks=1, random_blocks=1, seed=3,
                                           block_m=block, block_n=block)
    return {"window": window, "local_global_random": sparse}


@pytest.mark.parametrize("mask", ["window", "local_global_random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_simulated_ring_with_a_block_mask(world_size, layout, causal, mask):
    """A block mask of the whole sequence: each chunk pair takes its part (pairs it leaves empty are skipped;
    rows it leaves empty come out 0); the whole equals masked attention."""
    block = 32
    per_rank = 4 * block if layout == "zigzag" else 2 * block
    q, k, v, dout = _inputs(world_size, 4, 2, seed=20 + world_size, per_rank=per_rank)
    n, scale = q.shape[1], 0.4
    bm = _block_masks(n, block)[mask]

    def rank_fn(rank, ring):
        mine = [shard(x, world_size, rank, layout=layout) for x in (q, k, v, dout)]
        pairs = cd._MaskedPairs(bm, ring, mine[0].shape[1], layout)
        out, lse = _ring.ring_forward(*mine[:3], ring, pairs.attend, causal, layout, scale)
        backward = lambda *chunks: pairs.attend_backward(*chunks, False)  # noqa: E731
        return (out,) + _ring.ring_backward(mine[3], *mine[:3], out, lse, ring, backward, causal, layout, scale)

    import unittest.mock

    with unittest.mock.patch.object(cd, "_LOCAL", (rh.chunk_attend, rh.chunk_attend_backward)):
        per_rank_results = rh.run_ranks(world_size, rank_fn)
    got = [unshard([r[i] for r in per_rank_results], layout=layout) for i in range(4)]
    whole = q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()
    out = rh.full_attention(*whole, causal, scale, torch.as_tensor(bm.to_element_mask()))
    out.backward(dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, [out.detach()] + [x.grad for x in whole]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_block_mask_over_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    world_size, layout = 2, "zigzag"
    inputs = _inputs(world_size, 4, 2, seed=5, per_rank=128)
    bm = _block_masks(inputs[0].shape[1], 32)["window"]
    case = dict(inputs=inputs, layout=layout, causal=True, block_mask=bm)
    mp.spawn(rh.ring_worker, args=(world_size, str(tmp_path / "init"), case, str(tmp_path)), nprocs=world_size)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world_size)]
    got = [unshard([r[key] for r in results], layout=layout) for key in ("out", "dq", "dk", "dv")]
    leaves = [x.clone().requires_grad_() for x in inputs[:3]]
    out = rh.full_attention(*leaves, True, 1 / 8 ** 0.5, torch.as_tensor(bm.to_element_mask()))
    out.backward(inputs[3])
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, [out.detach()] + [x.grad for x in leaves]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_block_masks_must_fit_the_chunks(monkeypatch):
    from cuflash import BlockMask

    ring = rh.QueueRing(0, [None, None])
    with pytest.raises(ValueError, match="whole sequence"):
        cd._MaskedPairs(BlockMask.causal(64, 64, 32, 32), ring, 64, "zigzag")
    with pytest.raises(ValueError, match="must divide"):
        cd._MaskedPairs(BlockMask.causal(96, 96, 32, 32), ring, 48, "zigzag")


def test_document_offsets_cut_documents_to_a_chunk_pair():
    cu = [0, 3, 3, 10, 16]  # documents 0-2, (empty), 3-9, 10-15
    cu_q, cu_k, max_q, max_k = _ring.document_offsets(cu, np.arange(4, 8), np.arange(0, 6))
    assert cu_q.tolist() == [0, 0, 4] and cu_k.tolist() == [0, 3, 6]  # the first two documents present
    assert (max_q, max_k) == (4, 3) and cu_q.dtype == np.int32
    cu_q, cu_k, _, _ = _ring.document_offsets(cu, np.array([2, 12]), np.array([11, 13, 14]))
    assert cu_q.tolist() == [0, 1, 2] and cu_k.tolist() == [0, 0, 3]


def _packed(world_size, seed, per_rank=12, heads=4, kv_heads=2, d=8):
    g = torch.Generator().manual_seed(seed)
    n = per_rank * world_size
    cuts = sorted(torch.randint(0, n + 1, (world_size + 2,), generator=g).tolist())
    cu = [0, *cuts, n]  # random documents, some spanning ranks, some maybe empty
    shapes = [(n, heads, d), (n, kv_heads, d), (n, kv_heads, d), (n, heads, d)]
    return cu, [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _whole_packed(cu, q, k, v, dout, causal, scale):
    mask = rh.document_mask(cu, q.shape[0])
    q, k, v = (x[None].clone().requires_grad_() for x in (q, k, v))
    out = rh.full_attention(q, k, v, causal, scale, mask)
    out.backward(dout[None])
    return [x[0] for x in (out.detach(), q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_simulated_ring_over_packed_documents(world_size, layout, causal, monkeypatch):
    """Documents packed into one sequence across the ranks: each chunk pair a packed call over the parts of
    the documents it holds; the whole equals document-masked attention."""
    monkeypatch.setattr(cd, "_LOCAL_VARLEN", (rh.varlen_attend, rh.varlen_attend_backward))
    cu, (q, k, v, dout) = _packed(world_size, seed=10 + world_size)
    scale = 0.4

    def rank_fn(rank, ring):
        mine = [shard(x, world_size, rank, dim=0, layout=layout)[None] for x in (q, k, v, dout)]
        docs = cd._Documents(np.asarray(cu), ring, mine[0].shape[1], layout, "cpu")
        out, lse = _ring.ring_forward(*mine[:3], ring, docs.attend, causal, layout, scale)
        backward = lambda *chunks: docs.attend_backward(*chunks, False)  # noqa: E731
        grads = _ring.ring_backward(mine[3], *mine[:3], out, lse, ring, backward, causal, layout, scale)
        return [x[0] for x in (out, *grads)]

    per_rank = rh.run_ranks(world_size, rank_fn)
    got = [unshard([r[i] for r in per_rank], dim=0, layout=layout) for i in range(4)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, _whole_packed(cu, q, k, v, dout, causal, scale)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_ring_over_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    world_size, layout, causal = 3, "zigzag", True
    cu, inputs = _packed(world_size, seed=7)
    case = dict(inputs=inputs, layout=layout, causal=causal, cu_seqlens=cu)
    mp.spawn(rh.ring_worker, args=(world_size, str(tmp_path / "init"), case, str(tmp_path)), nprocs=world_size)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world_size)]
    got = [unshard([r[key] for r in results], dim=0, layout=layout) for key in ("out", "dq", "dk", "dv")]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, _whole_packed(cu, *inputs, causal, 1 / 8 ** 0.5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    lse = torch.cat([r["lse"] for r in results], 1)
    assert lse.shape == (4, 3 * 12)


def test_packed_offsets_are_checked():
    q = torch.zeros(6, 4, 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        ring_flash_attn_varlen_func(q, q, q, [0, 4, 2, 6])
    with pytest.raises(ValueError, match="tokens, heads"):
        ring_flash_attn_varlen_func(q[None], q[None], q[None], [0, 6])


def test_what_the_kernels_refuse_is_raised_before_the_ring_starts():
    """Host tensors (here: this machine has no GPU) are named before any transfer is posted: no process group
    is needed to see it."""
    q = torch.zeros(1, 6, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q must be on a CUDA device"):
        ring_flash_attn_func(q, q, q)
    with pytest.raises(TypeError, match="q must be on a CUDA device"):
        ring_flash_attn_varlen_func(q[0], q[0], q[0], [0, 6])


def test_ring_in_a_process_group_of_some_ranks(tmp_path):
    """group=: ranks 1 and 3 of 4 form the ring (its neighbours are global ranks 3 and 1)."""
    import torch.multiprocessing as mp

    inputs = _inputs(2, 4, 2, seed=11)
    case = dict(inputs=inputs, layout="zigzag", causal=True, group=[1, 3])
    mp.spawn(rh.ring_worker, args=(4, str(tmp_path / "init"), case, str(tmp_path)), nprocs=4)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    got = [unshard([r[key] for r in results]) for key in ("out", "dq", "dk", "dv")]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, _whole(*inputs, True, 1 / 8 ** 0.5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_chunks_are_checked_before_anything_runs():
    q = torch.zeros(1, 6, 4, 8)
    with pytest.raises(ValueError, match="k and v"):
        ring_flash_attn_func(q, q, q[..., :4])
    with pytest.raises(ValueError, match="one sequence"):
        ring_flash_attn_func(q, q[:, :4], q[:, :4])
    with pytest.raises(ValueError, match="divide"):
        ring_flash_attn_func(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="even"):
        ring_flash_attn_func(q[:, :5], q[:, :5], q[:, :5])
    with pytest.raises(ValueError, match="layout"):
        ring_flash_attn_func(q, q, q, layout="striped")
