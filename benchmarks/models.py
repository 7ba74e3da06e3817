"""Model-level benchmarks, the FlashAttention paper's section 4.1 re-measured: whole training steps, where
attention is one part among the projections, MLPs, normalisation and the optimiser.

- gpt2: GPT-2 small (12 layers, 768 wide, 12 heads) and medium (24 layers, 1024 wide, 16 heads) training
  steps (forward, backward, AdamW) in bf16 autocast through HuggingFace transformers, with its eager
  attention, PyTorch SDPA and cuflash (registered as a transformers attention function), at 1K and 4K
  tokens (the paper: up to 3x over HuggingFace's eager attention). Without transformers, the same shapes
  in a plain PyTorch GPT-2 (the result says which).
- lra: a Long-Range-Arena-shaped encoder (4 layers, 256 wide, 4 heads of 64, non-causal) training step at
  1K, 2K and 4K tokens, 32K tokens a batch (the paper: 2.4x over standard attention).
- path: one encoder layer (512 wide, 8 heads of 64) forward+backward at Path-X's 16K and Path-256's 64K
  tokens, batch 1: time and peak memory, or out of memory.

Times are medians over steps after warm-up, with fresh random tokens each step; memory is PyTorch's peak.

    PYTHONPATH=src python benchmarks/models.py [--suites gpt2 lra path] [--json benchmarks/results/GPU-models.json]
"""
import argparse
import math
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import cuflash
from cuflash import _bench

IMPLS = ("standard", "sdpa", "cuflash")


def attention(impl, q, k, v, causal):
    """Attention on (batch, seqlen, heads, headdim): standard (the score matrix in memory), SDPA or cuflash."""
    if impl == "cuflash":
        return cuflash.flash_attn_func(q, k, v, causal=causal)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if impl == "sdpa":
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    s = (qt @ kt.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (torch.softmax(s.float(), -1).to(v.dtype) @ vt).transpose(1, 2)


class Layer(nn.Module):
    """Pre-norm transformer layer: attention and a 4x MLP, each with a residual."""

    def __init__(self, width, heads, impl, causal):
        super().__init__()
        self.heads, self.impl, self.causal = heads, impl, causal
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        x = x + self.out(attention(self.impl, q, k, v, self.causal).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """Token and position embeddings, layers, a linear head: a GPT-2 (causal) or an LRA encoder."""

    def __init__(self, vocab, context, width, heads, layers, impl, causal):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.layers = nn.ModuleList(Layer(width, heads, impl, causal) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def hf_gpt2(layers, width, heads, context, impl):
    """A transformers GPT-2 with attention `impl` (eager, sdpa or cuflash), or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    if impl == "cuflash":
        def cuflash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            # transformers passes (batch, heads, seqlen, headdim) and a causal mask (no padding here, so the
            # mask is causal=True), and takes (batch, seqlen, heads, headdim) back.
            out = cuflash.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                          dropout_p=dropout, softmax_scale=scaling, causal=True)
            return out, None

        # (Registered under a name without "flash": transformers takes such names for its FlashAttention kernels.)
        transformers.AttentionInterface.register("cu_attention", cuflash_attention)
        if hasattr(transformers, "AttentionMaskInterface"):  # no mask is built for it: causal=True is the mask
            transformers.AttentionMaskInterface.register("cu_attention", lambda *args, **kwargs: None)
    config = transformers.GPT2Config(n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_impl = {"standard": "eager", "cuflash": "cu_attention"}.get(impl, impl)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=hf_impl)


def train_step_ms(model, vocab, batch, context, steps=12, warmup=3):
    """Median ms of a bf16-autocast training step (forward, loss, backward, AdamW) and peak GiB."""
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        idx = torch.randint(0, vocab, (batch, context + 1), device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(idx[:, :-1])
            logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def measure(row, make_model, vocab, batch, context):
    """Time a training step of make_model() into row (or record that it ran out of memory)."""
    try:
        model = make_model()
        row["step_ms"], row["peak_gib"] = train_step_ms(model, vocab, batch, context)
        _bench.log(f"  {row['suite']} {row.get('model', '')} {row['context']:6d} {row['impl']:9s} "
                   f"{row['step_ms']:9.2f} ms  {row['peak_gib']:6.2f} GiB")
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        _bench.log(f"  {row['suite']} {row.get('model', '')} {row['context']:6d} {row['impl']:9s} out of memory")
    finally:
        model = None
        torch.cuda.empty_cache()
    return row


def gpt2_suite():
    vocab, rows = 50257, []
    via = "transformers" if hf_gpt2(1, 64, 1, 64, "sdpa") is not None else "plain PyTorch"
    for name, layers, width, heads in (("gpt2-small", 12, 768, 12), ("gpt2-medium", 24, 1024, 16)):
        for context, batch in ((1024, 8), (4096, 2)):
            for impl in IMPLS:
                torch.manual_seed(0)

                def make():
                    model = hf_gpt2(layers, width, heads, context, impl)
                    return model if model is not None else Stack(vocab, context, width, heads, layers, impl, True)
                rows.append(measure({"suite": "gpt2", "model": name, "via": via, "context": context, "batch": batch,
                                     "impl": impl}, make, vocab, batch, context))
    return rows


def lra_suite():
    vocab, rows = 256, []
    for context in (1024, 2048, 4096):
        batch = 32768 // context
        for impl in IMPLS:
            torch.manual_seed(0)
            rows.append(measure({"suite": "lra", "context": context, "batch": batch, "impl": impl},
                                lambda: Stack(vocab, context, 256, 4, 4, impl, False), vocab, batch, context))
    return rows


def path_suite():
    """One 512-wide layer, forward+backward, at 16K (Path-X) and 64K (Path-256) tokens."""
    rows = []
    for name, context in (("path-x", 16384), ("path-256", 65536)):
        for impl in IMPLS:
            row = {"suite": "path", "model": name, "context": context, "batch": 1, "impl": impl}
            try:
                layer = Layer(512, 8, impl, False).cuda().to(torch.bfloat16)
                xs = [torch.randn(1, context, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                      for _ in range(2)]

                def call(i):
                    layer(xs[i]).float().sum().backward()
                torch.cuda.reset_peak_memory_stats()
                ms, _ = _bench.time_fn(call, 2, _bench.Timing(warmup_calls=2, warmup_ms=0, min_reps=5, target_ms=200))
                row.update(fwd_bwd_ms=ms, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
                _bench.log(f"  path {name:9s} {context:6d} {impl:9s} {ms:9.2f} ms  {row['peak_gib']:6.2f} GiB")
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                _bench.log(f"  path {name:9s} {context:6d} {impl:9s} out of memory")
            layer = xs = None
            torch.cuda.empty_cache()
            rows.append(row)
    return rows


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", nargs="+", default=["gpt2", "lra", "path"], choices=["gpt2", "lra", "path"])
    ap.add_argument("--json", help="write the results here (device, date, commit, command inside)")
    args = ap.parse_args(argv)
    _bench.log(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cuflash {cuflash.__version__}")
    rows = []
    for suite in args.suites:
        rows += {"gpt2": gpt2_suite, "lra": lra_suite, "path": path_suite}[suite]()
    for row in rows:  # speed-up over the standard implementation of the same case
        base = next((r for r in rows if r["impl"] == "standard" and all(
            r.get(f) == row.get(f) for f in ("suite", "model", "context"))), None)
        key = "fwd_bwd_ms" if row["suite"] == "path" else "step_ms"
        if base and key in base and key in row:
            row["speedup_vs_standard"] = round(base[key] / row[key], 3)
    if args.json:
        _bench.write_json(args.json, argv, rows, program="python benchmarks/models.py")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
