"""README's plot: TFLOP/s against sequence length from a `python -m cuflash bench` result file, forward and
forward+backward at one head dim and dtype, cuflash against the peers timed in the same run.

    python benchmarks/plot_dense.py [benchmarks/results/h100-dense.json] [--out docs/h100-dense.png] [--headdim 128]

Needs matplotlib (not a cuflash dependency).
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"cuflash": "cuflash", "fa4": "FlashAttention-4", "sdpa_flash": "SDPA FLASH (FlashAttention-2)", "sdpa_cudnn": "SDPA CUDNN",
          "sdpa_efficient": "SDPA EFFICIENT", "sdpa_math": "SDPA MATH", "standard": "standard attention"}
COLORS = {"cuflash": "tab:red", "fa4": "tab:orange", "sdpa_flash": "tab:blue", "sdpa_cudnn": "tab:green", "sdpa_efficient": "tab:purple",
          "sdpa_math": "tab:gray", "standard": "tab:brown"}
TITLES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", default="benchmarks/results/h100-dense.json")
    ap.add_argument("--out", default="docs/h100-dense.png")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd_bwd"])
    args = ap.parse_args()
    doc = json.load(open(args.path))
    series = {}
    for r in doc["results"]:
        if r["headdim"] == args.headdim and r["dtype"] == args.dtype and r["pass"] in args.passes:
            series.setdefault((r["pass"], r["impl"], r["causal"]), []).append((r["seqlen_q"], r["tflops"]))
    fig, axes = plt.subplots(1, len(args.passes), figsize=(6 * len(args.passes), 4.6), sharey=True)
    axes = [axes] if len(args.passes) == 1 else axes
    for ax, pass_ in zip(axes, args.passes):
        for (p, impl, causal), pts in sorted(series.items(), key=lambda kv: (kv[0][1] != "cuflash", kv[0])):
            if p != pass_:
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", color=COLORS.get(impl), linestyle="--" if causal else "-",
                    label=f"{LABELS.get(impl, impl)}{', causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        ticks = sorted({x for (p, _, _), pts in series.items() if p == pass_ for x, _ in pts})
        ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 else str(t) for t in ticks])
        ax.set_xlabel("sequence length (batch x seqlen = 16K tokens)")
        ax.set_title(f"{TITLES[pass_]}, {args.dtype}, d={args.headdim}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(doc["device"], fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
