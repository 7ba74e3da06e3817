"""Train a GPT-2-small-shaped causal language model with cuflash attention and with PyTorch SDPA,
from the same initial weights on the same batches, and print the loss curves, step time and peak
memory side by side.

The text is this repository's own source code and documentation (character level), so the example
needs no download.

    PYTHONPATH=src python examples/train_gpt.py [--steps 300] [--context 1024] [--batch 8]
    PYTHONPATH=src python examples/train_gpt.py --steps 40 --context 4096 --batch 2 --impls cuflash sdpa standard
"""
import argparse
import math
import pathlib
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import cuflash

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_corpus() -> str:
    files = sorted(p for p in ROOT.rglob("*") if p.suffix in {".py", ".cu", ".cuh", ".md"} and ".git" not in p.parts)
    return "\n".join(p.read_text(errors="ignore") for p in files)


def attention(impl: str, q, k, v):
    """Causal attention on (batch, seqlen, heads, headdim)."""
    if impl == "cuflash":
        return cuflash.flash_attn_func(q, k, v, causal=True)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if impl == "sdpa":
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    s = (qt @ kt.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # standard: the full score matrix
    mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
    return (torch.softmax(s.masked_fill(mask, float("-inf")).float(), -1).to(v.dtype) @ vt).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, d_model, n_heads, impl):
        super().__init__()
        self.n_heads, self.impl = n_heads, impl
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, c // self.n_heads).unbind(2)
        x = x + self.proj(attention(self.impl, q, k, v).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, context, impl, d_model=768, n_heads=12, n_layers=12):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, impl) for _ in range(n_layers))
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def train(impl, data, vocab, args, init_state):
    torch.manual_seed(0)
    model = GPT(vocab, args.context, impl).cuda()
    model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    gen = torch.Generator(device="cpu").manual_seed(1234)  # same batches for every impl
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + args.context + 1] for s in starts.tolist()]).cuda(non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, statistics.median(times[5:] or times) * 1e3, torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--impls", nargs="+", default=["cuflash", "sdpa"], choices=["cuflash", "sdpa", "standard"])
    args = ap.parse_args()
    text = load_corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    print(f"corpus: {len(text):,} characters of this repository, vocabulary {len(chars)}; "
          f"GPT-2 small shape (12 layers, 12 heads, d_model 768), context {args.context}, batch {args.batch}, "
          f"{args.steps} steps, bf16 autocast, {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in GPT(len(chars), args.context, "sdpa").state_dict().items()}
    results = {}
    for impl in args.impls:
        try:
            results[impl] = train(impl, data, len(chars), args, init_state)
        except torch.OutOfMemoryError:
            print(f"{impl}: out of memory")
            torch.cuda.empty_cache()
    names = list(results)
    print("\nstep  " + "".join(f"{n:>12}" for n in names))
    for step in sorted({0, *range(24, args.steps, 25), args.steps - 1}):
        print(f"{step + 1:4d}  " + "".join(f"{results[n][0][step]:12.4f}" for n in names))
    print("\n" + "".join(f"{n:>12}" for n in ["", *names]))
    print(f"{'step ms':>12}" + "".join(f"{results[n][1]:12.1f}" for n in names))
    print(f"{'peak GiB':>12}" + "".join(f"{results[n][2]:12.2f}" for n in names))
    if "cuflash" in results and "sdpa" in results:
        a, b = results["cuflash"][0], results["sdpa"][0]
        tail = max(1, len(a) // 10)
        print(f"\nmean loss over the last {tail} steps: cuflash {statistics.mean(a[-tail:]):.4f}, "
              f"sdpa {statistics.mean(b[-tail:]):.4f}; largest per-step difference "
              f"{max(abs(x - y) for x, y in zip(a, b)):.4f}")


if __name__ == "__main__":
    main()
