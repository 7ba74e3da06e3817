"""Ring attention on CPUs: a float64 chunk-pair attention (forward and backward, in PyTorch) to stand in for
the kernels, an in-process ring of threads, and a gloo worker for the multi-process tests."""
import queue
import threading

import torch

NEG_INF = float("-inf")


def _expand(k, v, heads):
    group = heads // k.shape[2]
    return k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)


def _scores(q, k, causal, scale, mask=None):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:  # bottom-right aligned, as the kernels' (the ring's chunk pairs have equal lengths)
        visible = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(k.shape[1] - q.shape[1])
        s = s.masked_fill(~visible, NEG_INF)
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    return s


def _probs(s, lse):
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.nan_to_num(p, nan=0.0)  # rows with no key: lse = -inf


def attend(q, k, v, causal, scale, mask=None):
    """(out, lse) of one chunk pair in float64 (mask: True where a query sees a key)."""
    k, v = _expand(k, v, q.shape[2])
    s = _scores(q, k, causal, scale, mask)
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bkhd->bqhd", _probs(s, lse), v), lse


def attend_backward(dout, q, k, v, out, lse, causal, scale, deterministic=False, mask=None):
    """(dq, dk, dv) of one chunk pair from the whole rows' out and lse (FlashAttention's backward)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    ke, ve = _expand(k, v, heads)
    p = _probs(_scores(q, ke, causal, scale, mask), lse)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, ve)
    delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)
    ds = p * (dp - delta)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    fold = lambda g: g.reshape(*g.shape[:2], kv_heads, heads // kv_heads, g.shape[-1]).sum(3)  # noqa: E731
    return dq, fold(dk), fold(dv)


def _element_mask(block_mask):
    return None if block_mask is None else torch.as_tensor(block_mask.to_element_mask())


def chunk_attend(q, k, v, step, scale, block_mask=None):
    """attend with the ring's signature (a _ring.Step; a cuflash.BlockMask as the kernels take it)."""
    return attend(q, k, v, step.causal, scale, _element_mask(block_mask))


def chunk_attend_backward(dout, q, k, v, out, lse, step, scale, deterministic=False, block_mask=None):
    return attend_backward(dout, q, k, v, out, lse, step.causal, scale, mask=_element_mask(block_mask))


def _documents(cu):
    return [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]


def varlen_attend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """flash_attn_varlen_func's contract in float64: packed (tokens, heads, d), lse (heads, tokens)."""
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(_documents(cu_q), _documents(cu_k)):
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        o, lse = attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, scale)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


def varlen_attend_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, deterministic):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (q0, q1), (k0, k1) in zip(_documents(cu_q), _documents(cu_k)):
        g = attend_backward(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1],
                            lse[None, :, q0:q1], causal, scale)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def document_mask(cu, n):
    """(n, n) True where two positions lie in one document."""
    doc = torch.searchsorted(torch.as_tensor(cu), torch.arange(n), right=True)
    return doc[:, None] == doc[None, :]


def full_attention(q, k, v, causal, scale, mask=None):
    """Differentiable float64 attention of whole sequences (mask: (seqlen_q, seqlen_k), True = visible)."""
    k, v = _expand(k, v, q.shape[2])
    p = torch.nan_to_num(torch.softmax(_scores(q, k, causal, scale, mask), -1), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


class QueueRing:
    """A ring of threads in one process: pass_on puts copies in the next rank's queue."""

    def __init__(self, rank, inboxes):
        self.rank, self.size, self.inboxes = rank, len(inboxes), inboxes

    def pass_on(self, tensors):
        self.inboxes[(self.rank + 1) % self.size].put(tuple(t.clone() for t in tensors))
        return self

    def wait(self):
        return self.inboxes[self.rank].get(timeout=60)


def run_ranks(world_size, fn):
    """fn(rank, ring) on world_size threads joined by a QueueRing; their results in rank order."""
    inboxes = [queue.Queue() for _ in range(world_size)]
    results, errors = [None] * world_size, []

    def run(rank):
        try:
            results[rank] = fn(rank, QueueRing(rank, inboxes))
        except BaseException as e:  # noqa: BLE001 - reraised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def ring_worker(rank, world_size, init_file, case, out_dir):
    """One rank of ring_flash_attn_func: over gloo on CPUs with the float64 chunk attention in place of the
    kernels, or over NCCL with one GPU a rank (case["backend"]). case["group"]: the ranks of a process group
    to run it in (the others only help create the group). Saves this rank's out, lse and gradients, as
    <rank in the group>.pt, for the test to compare."""
    import os

    import torch.distributed as dist

    import cuflash.distributed as cd

    for var in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS"):  # no NVLink multicast (device README)
        os.environ.setdefault(var, "0" if var.startswith("NCCL") else "1")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    backend = case.get("backend", "gloo")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        if backend == "gloo":
            cd._LOCAL = (chunk_attend, chunk_attend_backward)
            cd._LOCAL_VARLEN = (varlen_attend, varlen_attend_backward)
            cd._CHECK = lambda q, k, v: None
            device, dtype = "cpu", torch.float64
        else:
            torch.cuda.set_device(rank)
            device, dtype = f"cuda:{rank}", getattr(torch, case["dtype"])
        members = case.get("group", list(range(world_size)))
        group = dist.new_group(members) if "group" in case else None  # (every rank takes part in new_group)
        if rank not in members:
            return
        ring_rank, ring_size = members.index(rank), len(members)
        cu_seqlens = case.get("cu_seqlens")
        dim = 1 if cu_seqlens is None else 0
        q, k, v, dout = (cd.shard(x, ring_size, ring_rank, dim, case["layout"]).to(device, dtype)
                         for x in case["inputs"])
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        kw = dict(group=group, causal=case["causal"], layout=case["layout"], return_lse=True)
        if cu_seqlens is None:
            out, lse = cd.ring_flash_attn_func(q, k, v, block_mask=case.get("block_mask"), **kw)
        else:
            out, lse = cd.ring_flash_attn_varlen_func(q, k, v, cu_seqlens, **kw)
        out.backward(dout)
        saved = dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad)
        torch.save({key: x.cpu() for key, x in saved.items()}, f"{out_dir}/{ring_rank}.pt")
    finally:
        dist.destroy_process_group()


def jax_ring_check(world_size, layout, causal, heads=4, kv_heads=2, packed=False, mask=None):
    """In a process of its own with world_size host devices (XLA_FLAGS) and float64: ring_attention under
    jax.jit(jax.shard_map) with a float64 chunk attention in place of the kernels, its out, lse and
    gradients (jax.grad through the ring's custom VJP) against whole-sequence attention; raises if they
    differ. packed: random documents packed into one sequence (cu_seqlens). mask: "window" or
    "local_global_random", a block mask of the whole sequence (blocks of 32; 4 a device)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import cuflash.jax_distributed as jd

    def expand(k, v, h):
        return jnp.repeat(k, h // k.shape[-2], -2), jnp.repeat(v, h // v.shape[-2], -2)

    def scores(q, k, causal, scale):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        return jnp.where(jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)), s, -jnp.inf) if causal else s

    def softmax_parts(s):  # (P, lse) with rows that see nothing as zeros and -inf
        lse = jax.nn.logsumexp(s, -1)
        return jnp.nan_to_num(jnp.exp(s - lse[..., None]), nan=0.0), lse

    def masked(s, block_mask):
        return s if block_mask is None else jnp.where(block_mask.to_element_mask(), s, -jnp.inf)

    def attend(q, k, v, causal, scale, block_mask=None):
        k, v = expand(k, v, q.shape[2])
        p, lse = softmax_parts(masked(scores(q, k, causal, scale), block_mask))
        return jnp.einsum("bhqk,bkhd->bqhd", p, v), lse

    def grads_from(p, dout, q, ke, ve, out, scale, kv_heads):
        heads = q.shape[-2]
        ds = p * (jnp.einsum("bqhd,bkhd->bhqk", dout, ve) - (dout * out).sum(-1).transpose(0, 2, 1)[..., None])
        fold = lambda g: g.reshape(*g.shape[:2], kv_heads, heads // kv_heads, g.shape[-1]).sum(3)  # noqa: E731
        return (jnp.einsum("bhqk,bkhd->bqhd", ds, ke) * scale, fold(jnp.einsum("bhqk,bqhd->bkhd", ds, q) * scale),
                fold(jnp.einsum("bhqk,bqhd->bkhd", p, dout)))

    def attend_backward(dout, q, k, v, out, lse, causal, scale, deterministic, block_mask=None):
        ke, ve = expand(k, v, q.shape[2])
        p = jnp.nan_to_num(jnp.exp(masked(scores(q, ke, causal, scale), block_mask) - lse[..., None]), nan=0.0)
        return grads_from(p, dout, q, ke, ve, out, scale, k.shape[2])

    def varlen_scores(q, k, cu_q, cu_k, causal, scale):
        """cuflash's packed contract with traced offsets: documents by position, causal bottom-right in each."""
        doc_q = jnp.searchsorted(cu_q, jnp.arange(q.shape[0]), side="right") - 1
        doc_k = jnp.searchsorted(cu_k, jnp.arange(k.shape[0]), side="right") - 1
        visible = doc_q[:, None] == doc_k[None, :]
        if causal:
            i = jnp.arange(q.shape[0]) - cu_q[doc_q]
            j = jnp.arange(k.shape[0]) - cu_k[doc_k]
            shift = (cu_k[doc_q + 1] - cu_k[doc_q]) - (cu_q[doc_q + 1] - cu_q[doc_q])
            visible &= j[None, :] <= (i + shift)[:, None]
        s = jnp.einsum("qhd,khd->hqk", q, k)[None] * scale
        return jnp.where(visible, s, -jnp.inf)

    def varlen_attend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        k, v = expand(k, v, q.shape[1])
        p, lse = softmax_parts(varlen_scores(q, k, cu_q, cu_k, causal, scale))
        return jnp.einsum("bhqk,khd->qhd", p, v), lse[0]

    def varlen_attend_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, deterministic):
        ke, ve = expand(k, v, q.shape[1])
        p = jnp.nan_to_num(jnp.exp(varlen_scores(q, ke, cu_q, cu_k, causal, scale) - lse[None, ..., None]), nan=0.0)
        return tuple(g[0] for g in grads_from(p, dout[None], q[None], ke[None], ve[None], out[None], scale,
                                              k.shape[1]))

    jd._LOCAL = (attend, attend_backward)
    jd._LOCAL_VARLEN = (varlen_attend, varlen_attend_backward)
    rng = np.random.default_rng(world_size)
    n, d, scale = (128 if mask else 6) * world_size, 8, 0.35
    batch = () if packed else (2,)
    q, dout = (jnp.asarray(rng.standard_normal((*batch, n, heads, d))) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((*batch, n, kv_heads, d))) for _ in range(2))
    cu = [0, *sorted(rng.integers(0, n + 1, world_size + 2).tolist()), n] if packed else None
    block_mask = None
    if mask is not None:
        from cuflash import BlockMask

        block_mask = {"window": lambda: BlockMask.sliding_window(n, n, 48, 0, 32, 32),  # partial edge blocks
                      "local_global_random": lambda: BlockMask.local_global_random(
                          n, n, local_blocks=0, global_blocks=1, random_blocks=1, seed=3, block_m=32, block_n=32),
                      }[mask]()
        mask = block_mask.to_element_mask()
    if packed:
        doc = np.searchsorted(cu, np.arange(n), side="right")
        mask = doc[:, None] == doc[None, :]

    def whole(q, k, v):
        if packed:
            q, k, v = q[None], k[None], v[None]
        k, v = expand(k, v, q.shape[2])
        s = scores(q, k, causal, scale)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        p, lse = softmax_parts(s)
        out = jnp.einsum("bhqk,bkhd->bqhd", p, v)
        return (out[0], lse[0]) if packed else (out, lse)

    mesh = jax.make_mesh((world_size,), ("sp",))
    seq = P("sp") if packed else P(None, "sp")
    lse_spec = P(None, "sp") if packed else P(None, None, "sp")
    ring = jax.shard_map(lambda a, b, c: jd.ring_attention(a, b, c, "sp", causal=causal, softmax_scale=scale,
                                                           layout=layout, cu_seqlens=cu, block_mask=block_mask),
                         mesh=mesh, in_specs=(seq, seq, seq), out_specs=(seq, lse_spec))
    axis = 0 if packed else 1
    placed = [jax.device_put(jd.to_layout(x, world_size, layout, axis), NamedSharding(mesh, seq))
              for x in (q, k, v, dout)]

    def ring_loss(a, b, c):
        return (ring(a, b, c)[0] * placed[3]).sum()

    out, lse = jax.jit(ring)(*placed[:3])
    grads = jax.jit(jax.grad(ring_loss, (0, 1, 2)))(*placed[:3])
    want_out, want_lse = whole(q, k, v)
    want_grads = jax.grad(lambda a, b, c: (whole(a, b, c)[0] * dout).sum(), (0, 1, 2))(q, k, v)
    gathered = [np.asarray(x) for x in (out, *grads, lse)]
    got = [jd.from_layout(x, world_size, layout, axis) for x in gathered[:4]]
    got.append(jd.from_layout(gathered[4], world_size, layout, axis + 1))
    for name, a, b in zip(("out", "dq", "dk", "dv", "lse"), got, (want_out, *want_grads, want_lse)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name)
