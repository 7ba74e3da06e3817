"""Ring attention with cuflash's kernels on each chunk pair, against the float64 reference with the 2x rule:
the ring simulated on one GPU (a thread per rank), ring_flash_attn_func over NCCL with one rank, and over
2 and 4 GPUs where that many are visible."""
import tempfile

import pytest

from gpu_helpers import assert_close_2x, grads, plain_attention, randn

pytest.importorskip("torch")  # (ring_helpers is PyTorch's)

import ring_helpers as rh  # noqa: E402

pytestmark = pytest.mark.gpu

CASES = [(1, "zigzag", True), (2, "zigzag", True), (3, "contiguous", True), (4, "zigzag", False),
         (4, "zigzag", True), (2, "contiguous", False)]


def _inputs(world_size, dtype, per_rank=256, batch=2, heads=4, kv_heads=2, d=64):
    import torch

    n = per_rank * world_size
    dt = getattr(torch, dtype)
    shapes = [(batch, n, heads, d), (batch, n, kv_heads, d), (batch, n, kv_heads, d), (batch, n, heads, d)]
    return [randn(s, dt, seed) for seed, s in enumerate(shapes)]


def _check_whole(got, q, k, v, dout, causal):
    def plain(a, b, c):
        return plain_attention(a, b, c, causal)

    ref = grads(plain, *(x.double() for x in (q, k, v)), dout.double())
    base = grads(plain, q, k, v, dout)
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert o.shape == r.shape and o.dtype == q.dtype, name
        assert_close_2x(o.to(r.device), r, p, name)


def _check_packed(got, cu, q, k, v, dout, causal):
    """got: packed (tokens, heads, d) results; against document-masked attention of the whole sequence."""
    import numpy as np
    import torch

    n = q.shape[0]
    doc = np.searchsorted(cu, np.arange(n), side="right")
    mask = torch.as_tensor(doc[:, None] == doc[None, :], device=q.device)

    def plain(a, b, c):
        return plain_attention(a, b, c, causal, mask=mask)

    batched = [x[None] for x in (q, k, v, dout)]
    ref = grads(plain, *(x.double() for x in batched[:3]), batched[3].double())
    base = grads(plain, *batched)
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert_close_2x(o[None].to(r.device), r, p, name)


@pytest.mark.parametrize("world_size, layout, causal", CASES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_simulated_ring_with_the_kernels(world_size, layout, causal, dtype):
    from cuflash import _ring
    from cuflash.distributed import _cuflash_attend, _cuflash_attend_backward, shard, unshard

    q, k, v, dout = _inputs(world_size, dtype)
    scale = q.shape[-1] ** -0.5

    def rank_fn(rank, ring):
        mine = [shard(x, world_size, rank, layout=layout) for x in (q, k, v, dout)]
        out, lse = _ring.ring_forward(*mine[:3], ring, _cuflash_attend, causal, layout, scale)
        backward = lambda *chunks: _cuflash_attend_backward(*chunks, True)  # noqa: E731
        return (out,) + _ring.ring_backward(mine[3], *mine[:3], out, lse, ring, backward, causal, layout, scale)

    per_rank = rh.run_ranks(world_size, rank_fn)
    got = [unshard([r[i] for r in per_rank], layout=layout) for i in range(4)]
    _check_whole(got, q, k, v, dout, causal)


@pytest.mark.parametrize("world_size, layout, causal", [(1, "zigzag", True), (3, "zigzag", True),
                                                        (4, "contiguous", True), (2, "zigzag", False)])
def test_simulated_ring_over_packed_documents_with_the_kernels(world_size, layout, causal):
    """Packed documents across the ranks (some spanning several, one empty), each chunk pair one packed
    call of the kernels; against document-masked attention."""
    import numpy as np

    from cuflash import _ring
    import cuflash.distributed as cd

    n = 256 * world_size
    cu = np.array([0, 100, 100, n // 3 + 7, n - 90, n])
    q, k, v, dout = (x[0] for x in _inputs(world_size, "bfloat16", batch=1))
    scale = q.shape[-1] ** -0.5

    def rank_fn(rank, ring):
        mine = [cd.shard(x, world_size, rank, 0, layout)[None] for x in (q, k, v, dout)]
        docs = cd._Documents(cu, ring, mine[0].shape[1], layout, q.device)
        out, lse = _ring.ring_forward(*mine[:3], ring, docs.attend, causal, layout, scale)
        backward = lambda *chunks: docs.attend_backward(*chunks, True)  # noqa: E731
        grads = _ring.ring_backward(mine[3], *mine[:3], out, lse, ring, backward, causal, layout, scale)
        return [x[0] for x in (out, *grads)]

    per_rank = rh.run_ranks(world_size, rank_fn)
    got = [cd.unshard([r[i] for r in per_rank], 0, layout) for i in range(4)]
    _check_packed(got, cu, q, k, v, dout, causal)


@pytest.mark.parametrize("world_size, layout, causal", [(2, "zigzag", True), (4, "contiguous", False),
                                                        (3, "zigzag", False)])
@pytest.mark.parametrize("mask", ["window", "local_global_random"])
def test_simulated_ring_with_a_block_mask_and_the_kernels(world_size, layout, causal, mask):
    """A block mask of the whole sequence (a window with partial blocks, or a sparse one), each chunk pair
    with its part of it; against masked attention."""
    import torch

    from cuflash import BlockMask, _ring
    import cuflash.distributed as cd

    q, k, v, dout = _inputs(world_size, "bfloat16")
    n, scale = q.shape[1], q.shape[-1] ** -0.5
    bm = (BlockMask.sliding_window(n, n, 200, 0) if mask == "window"
          else BlockMask.local_global_random(n, n, local_blocks=1, global_blocks=1, random_blocks=1, seed=1))

    def rank_fn(rank, ring):
        mine = [cd.shard(x, world_size, rank, layout=layout) for x in (q, k, v, dout)]
        pairs = cd._MaskedPairs(bm, ring, mine[0].shape[1], layout)
        out, lse = _ring.ring_forward(*mine[:3], ring, pairs.attend, causal, layout, scale)
        backward = lambda *chunks: pairs.attend_backward(*chunks, True)  # noqa: E731
        return (out,) + _ring.ring_backward(mine[3], *mine[:3], out, lse, ring, backward, causal, layout, scale)

    per_rank = rh.run_ranks(world_size, rank_fn)
    got = [cd.unshard([r[i] for r in per_rank], 1, layout) for i in range(4)]
    element_mask = torch.as_tensor(bm.to_element_mask(), device=q.device)

    def plain(a, b, c):
        return plain_attention(a, b, c, causal, mask=element_mask)

    ref = grads(plain, *(x.double() for x in (q, k, v)), dout.double())
    base = grads(plain, q, k, v, dout)
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert_close_2x(o, r, p, name)


def test_one_rank_over_nccl_is_flash_attn_func():
    """With one rank the ring is one chunk pair: the kernels' own results, bit for bit."""
    import torch
    import torch.distributed as dist

    import cuflash
    from cuflash.distributed import ring_flash_attn_func

    q, k, v, dout = _inputs(1, "bfloat16")
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("nccl", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out, lse = ring_flash_attn_func(*leaves, causal=True, deterministic=True, return_lse=True)
            out.backward(dout)
            summed = [x.clone().requires_grad_() for x in (q, k, v)]  # a sum's gradient has zero strides
            ring_flash_attn_func(*summed, causal=True, deterministic=True).sum().backward()
        finally:
            dist.destroy_process_group()
    ref_out, ref_lse, _ = cuflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref_grads = cuflash.flash_attn_backward(dout, q, k, v, ref_out, ref_lse, causal=True, deterministic=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    for name, a, b in zip(("dq", "dk", "dv"), [x.grad for x in leaves], ref_grads):
        assert torch.equal(a, b), name
    ones = torch.ones_like(dout)
    for name, a, b in zip(("dq", "dk", "dv"), [x.grad for x in summed],
                          cuflash.flash_attn_backward(ones, q, k, v, ref_out, ref_lse, causal=True, deterministic=True)):
        assert torch.equal(a, b), f"{name} of a sum"


@pytest.mark.parametrize("world_size, layout, causal, packed", [(2, "zigzag", True, False), (4, "zigzag", True, False),
                                                                (4, "contiguous", False, False),
                                                                (2, "zigzag", True, True)])
def test_ring_over_nccl_on_several_gpus(world_size, layout, causal, packed, tmp_path):
    import torch
    import torch.multiprocessing as mp

    from cuflash.distributed import unshard

    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, {torch.cuda.device_count()} visible")
    inputs = _inputs(world_size, "bfloat16", batch=1 if packed else 2)
    n = inputs[0].shape[1]
    cu = [0, 100, n // 2 + 9, n] if packed else None
    if packed:
        inputs = [x[0] for x in inputs]
    case = dict(inputs=[x.cpu() for x in inputs], layout=layout, causal=causal, backend="nccl", dtype="bfloat16",
                cu_seqlens=cu)
    mp.spawn(rh.ring_worker, args=(world_size, str(tmp_path / "init"), case, str(tmp_path)), nprocs=world_size)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world_size)]
    dim = 0 if packed else 1
    got = [unshard([r[key] for r in results], dim, layout) for key in ("out", "dq", "dk", "dv")]
    if packed:
        _check_packed(got, cu, *inputs, causal)
    else:
        _check_whole(got, *inputs, causal)


@pytest.mark.parametrize("masked", [False, True])
def test_jax_ring_on_one_gpu_is_the_attention(masked):
    """ring_attention over a mesh of one GPU under jax.jit: cuflash.jax.attention's results, bit for bit;
    masked: with a sliding-window block mask (partial blocks on its edge)."""
    jax = pytest.importorskip("jax")
    from cuflash import BlockMask

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import cuflash.jax as cj
    import cuflash.jax_distributed as jd

    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(2, 512, 4, 64), (2, 512, 2, 64), (2, 512, 2, 64), (2, 512, 4, 64)]
    q, k, v, dout = (jax.random.normal(key, s, jnp.float32).astype(jnp.bfloat16) for key, s in zip(keys, shapes))
    mesh = jax.make_mesh((1,), ("sp",))
    spec = P(None, "sp")
    q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))  # shard_map takes placed inputs
    mask = BlockMask.sliding_window(512, 512, 192, 0, 128, 128) if masked else None
    ring = jax.shard_map(lambda a, b, c: jd.ring_attention(a, b, c, "sp", causal=True, deterministic=True,
                                                           block_mask=mask),
                         mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, P(None, None, "sp")))

    def loss(fn):
        return lambda a, b, c: (fn(a, b, c)[0].astype(jnp.float32) * dout.astype(jnp.float32)).sum()

    whole = lambda a, b, c: cj.attention(a, b, c, causal=True, deterministic=True, block_mask=mask)  # noqa: E731
    for got, want in zip(jax.jit(ring)(q, k, v), whole(q, k, v)):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    got = jax.jit(jax.grad(loss(ring), (0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(whole), (0, 1, 2)))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_jax_ring_over_packed_documents_on_one_gpu():
    """Packed documents, a mesh of one GPU: cuflash.jax.attention's packed call, bit for bit."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import cuflash.jax as cj
    import cuflash.jax_distributed as jd

    keys = jax.random.split(jax.random.key(1), 3)
    shapes = [(1024, 4, 64), (1024, 2, 64), (1024, 2, 64)]
    q, k, v = (jax.random.normal(key, s, jnp.float32).astype(jnp.bfloat16) for key, s in zip(keys, shapes))
    cu = np.array([0, 300, 300, 901, 1024])
    mesh = jax.make_mesh((1,), ("sp",))
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P("sp"))) for x in (q, k, v))
    ring = jax.shard_map(lambda a, b, c: jd.ring_attention(a, b, c, "sp", causal=True, cu_seqlens=cu),
                         mesh=mesh, in_specs=(P("sp"),) * 3, out_specs=(P("sp"), P(None, "sp")))
    cu_dev = jnp.asarray(cu, jnp.int32)
    want = cj.attention(q, k, v, causal=True, cu_seqlens=(cu_dev, cu_dev), max_seqlen=(601, 601))
    for got, ref in zip(jax.jit(ring)(q, k, v), want):
        assert np.array_equal(np.asarray(got), np.asarray(ref))


def _merge_on_host(out, lse, part_out, part_lse):
    """The merge in float64 on the CPU (the CPU path of _ring.merge, whose exactness test_ring.py checks)."""
    from cuflash import _ring

    out, lse = out.double().cpu(), lse.double().cpu()
    _ring.merge(out, lse, part_out.double().cpu(), part_lse.double().cpu())
    return out, lse


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [1, 40, 128])
def test_merge_kernel_is_the_merge(dtype, d):
    """kernels/ring_merge.cu against the float64 merge, on views (a slice of the running rows, as the ring
    merges a half chunk), with rows empty on either side or both, and a part that is not contiguous."""
    import torch

    from cuflash import _ring

    batch, seqlen, heads = 2, 37, 3
    g = torch.Generator(device="cuda").manual_seed(d)
    out = torch.randn(batch, 2 * seqlen, heads, d, device="cuda", generator=g)
    lse = torch.randn(batch, heads, 2 * seqlen, device="cuda", generator=g) * 4
    part_out = torch.randn(batch, heads, seqlen, d, device="cuda", generator=g).to(getattr(torch, dtype))
    part_out = part_out.transpose(1, 2)  # (batch, seqlen, heads, d), heads outermost in memory
    part_lse = torch.randn(batch, heads, seqlen, device="cuda", generator=g) * 4
    rows = slice(seqlen, 2 * seqlen)
    lse[:, :, rows][:, :, :5] = float("-inf")  # empty so far
    part_lse[:, :, 3:9] = float("-inf")  # empty in the part (rows 3, 4: empty on both sides)
    out[:, rows][:, :5] = 0
    part_out[:, 3:9] = 0
    want_out, want_lse = _merge_on_host(out[:, rows], lse[:, :, rows], part_out, part_lse)
    untouched = out[:, :seqlen].clone(), lse[:, :, :seqlen].clone()
    _ring.merge(out[:, rows], lse[:, :, rows], part_out, part_lse)
    torch.testing.assert_close(out[:, rows].double().cpu(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :, rows].double().cpu(), want_lse, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, :seqlen], untouched[0]) and torch.equal(lse[:, :, :seqlen], untouched[1])
    both_empty = lse[:, :, rows][:, :, 3:5]
    assert torch.all(both_empty == float("-inf")) and torch.all(out[:, rows][:, 3:5] == 0)
