"""Markdown tables of a benchmark result file (benchmarks/results/*.json), as README shows them.

    python benchmarks/table.py benchmarks/results/h100-dense.json        # python -m cuflash bench
    python benchmarks/table.py benchmarks/results/h100-blocksparse.json  # python -m cuflash bench-sparse
    python benchmarks/table.py benchmarks/results/h100-features.json     # benchmarks/features_vs_peers.py
    python benchmarks/table.py benchmarks/results/h100-varlen.json       # benchmarks/varlen_vs_padded.py
    python benchmarks/table.py benchmarks/results/h100-memory.json       # benchmarks/memory_fwd_bwd.py

The suite is recognised from the records. Ratios are always cuflash against the peer timed in the same run.
"""
import json
import sys

PASS_NAMES = {"fwd": "fwd", "bwd": "bwd", "fwd_bwd": "fwd+bwd"}


def header(doc):
    sources = doc.get("sources")
    if sources:
        src = "; ".join(f"{s.get('parts') or ', '.join(s.get('features', []))}: commit {str(s['commit'])[:7]}"
                        for s in sources)
        return f"{doc['device']}, merged from several runs ({src})."
    commit = str(doc.get("commit", "?"))[:7]
    return f"{doc['device']}, {str(doc['date'])[:10]}, commit {commit}: `{doc['command']}`."


def dense(doc):
    """cuflash TFLOP/s and its ratio to each peer of the run (FlashAttention-4 where it ran, SDPA FLASH, SDPA
    CUDNN), one row per (pass, dtype, d, causal)."""
    rows = {}
    for r in doc["results"]:
        key = (r["pass"], r["dtype"], r["headdim"], r["causal"])
        rows.setdefault(key, {}).setdefault(r["seqlen_q"], {})[r["impl"]] = r["tflops"]
    seqlens = sorted({s for cols in rows.values() for s in cols})
    order = {"fwd": 0, "bwd": 1, "fwd_bwd": 2}
    names = {"fa4": "FlashAttention-4", "sdpa_flash": "SDPA FLASH", "sdpa_cudnn": "SDPA CUDNN"}
    peers = [p for p in names if any(p in c for cols in rows.values() for c in cols.values())]
    print(header(doc) + f" Each cell: cuflash TFLOP/s (ratio to {' / to '.join(names[p] for p in peers)}).\n")
    print("| pass | dtype | d | causal | " + " | ".join(map(str, seqlens)) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in seqlens) + " |")
    for (pass_, dtype, d, causal), cols in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1:])):
        cells = []
        for s in seqlens:
            c = cols.get(s, {})
            if "cuflash" not in c:
                cells.append("-")
                continue
            ratios = [f"{c['cuflash'] / c[p]:.2f}" if p in c else "-" for p in peers]
            cells.append(f"{c['cuflash']:.0f} ({' / '.join(ratios)})")
        print(f"| {PASS_NAMES.get(pass_, pass_)} | {dtype} | {d} | {causal} | " + " | ".join(cells) + " |")


def features(doc):
    """Per feature: the range of peer ms / cuflash ms over seqlens and causal, forward and forward+backward."""
    pairs = {}
    for r in doc["results"]:
        key = (r["feature"], r["pass"], r["causal"], r["seqlen_q"])
        pairs.setdefault(key, {})["cuflash" if r["impl"] == "cuflash" else "peer"] = r
    table = {}
    for (feature, pass_, causal, seqlen), p in pairs.items():
        if "cuflash" in p and "peer" in p:
            entry = table.setdefault(feature, {"peer": p["peer"]["impl"]})
            entry.setdefault(pass_, []).append(p["peer"]["ms"] / p["cuflash"]["ms"])
    print(header(doc) + " Ratio = peer ms / cuflash ms (above 1: cuflash faster), over seqlen 4K and 16K, "
          "causal and not.\n")
    print("| feature | peer | forward | forward+backward |")
    print("| --- | --- | --- | --- |")
    for feature, e in sorted(table.items()):
        cells = [f"{min(e[p]):.2f}-{max(e[p]):.2f}x" if e.get(p) else "-" for p in ("fwd", "fwd_bwd")]
        print(f"| {feature} | {e['peer']} | " + " | ".join(cells) + " |")


def blocksparse(doc):
    """Mask cases (cuflash ms / flex ms), the density sweep and the long run."""
    res = doc["results"]
    print(header(doc) + "\n")
    cases = {}
    for r in res:
        if r.get("suite") == "cases":
            key = (r["mask"]["pattern"], r["headdim"], r["pass"])
            cases.setdefault(key, {})[r["impl"]] = r
    if cases:
        cols = sorted({(d, p) for _, d, p in cases}, key=lambda c: (c[0], c[1] != "fwd"))
        masks = list(dict.fromkeys(m for m, _, _ in cases))
        print("Cases: cuflash ms / flex ms (flex ms / cuflash ms).\n")
        print("| mask (density) | " + " | ".join(f"d={d} {PASS_NAMES[p]}" for d, p in cols) + " |")
        print("| --- | " + " | ".join("---" for _ in cols) + " |")
        for m in masks:
            density = next(c["cuflash"]["mask"]["density"] for (mm, _, _), c in cases.items() if mm == m)
            cells = []
            for d, p in cols:
                c = cases.get((m, d, p), {})
                if "cuflash" in c and "flex" in c:
                    a, b = c["cuflash"]["ms"], c["flex"]["ms"]
                    cells.append(f"{a:.3f} / {b:.3f} ({b / a:.2f}x)")
                else:
                    cells.append("-")
            print(f"| {m} ({density:.2f}) | " + " | ".join(cells) + " |")
    sweep = {}
    for r in res:
        if r.get("suite") == "sweep":
            sweep.setdefault((r["impl"], r["pass"]), []).append((r["mask"]["density"], r["ms"]))
    if sweep:
        print("\nDensity sweep (random masks, same number of blocks in every row): t(s) / (s · t(1)).\n")
        densities = sorted({s for pts in sweep.values() for s, _ in pts if s < 1}, reverse=True)
        print("| impl | pass | " + " | ".join(f"s={s:.3f}" for s in densities) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in densities) + " |")
        for (impl, pass_), pts in sorted(sweep.items()):
            t = dict(pts)
            if 1.0 not in t:
                continue
            cells = [f"{t[s] / (s * t[1.0]):.2f}" if s in t else "-" for s in densities]
            print(f"| {impl} | {PASS_NAMES[pass_]} | " + " | ".join(cells) + " |")
    long = [r for r in res if r.get("suite") == "long"]
    if long:
        print("\nLong sequences (local + global mask, cuflash forward+backward):\n")
        print("| seqlen | heads | d | ms | peak MiB | MiB per 1K tokens |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in sorted(long, key=lambda r: r["seqlen_q"]):
            print(f"| {r['seqlen_q']} | {r['nheads']} | {r['headdim']} | {r['ms']:.2f} | {r['peak_mib']:.0f} | "
                  f"{r['peak_mib'] / (r['seqlen_q'] / 1024):.2f} |")


def varlen(doc):
    """ms per implementation, one row per (pass, causal)."""
    rows, impls = {}, []
    for r in doc["results"]:
        rows.setdefault((r["pass"], r["causal"]), {})[r["impl"]] = r["ms"]
        if r["impl"] not in impls:
            impls.append(r["impl"])
    lengths = doc["results"][0]["lengths"]
    print(header(doc) + f" {len(lengths)} sequences of {min(lengths)}-{max(lengths)} tokens; ms per call.\n")
    print("| pass | causal | " + " | ".join(impls) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in impls) + " |")
    for (pass_, causal), t in sorted(rows.items()):
        print(f"| {PASS_NAMES[pass_]} | {causal} | " + " | ".join(f"{t[i]:.2f}" if i in t else "-" for i in impls) + " |")


def memory(doc):
    print(header(doc) + "\n")
    print("| seqlen | peak extra MiB | q, k, v, dout MiB | extra bytes per token |")
    print("| --- | --- | --- | --- |")
    for r in doc["results"]:
        print(f"| {r['seqlen']} | {r['peak_extra_mib']:.1f} | {r['inputs_mib']:.1f} | {r['extra_bytes_per_token']:.0f} |")


def main(path):
    doc = json.load(open(path))
    first = doc["results"][0]
    suite = first.get("suite")
    if suite == "features":
        features(doc)
    elif suite in ("cases", "sweep", "long"):
        blocksparse(doc)
    elif suite == "varlen":
        varlen(doc)
    elif "peak_extra_mib" in first:
        memory(doc)
    else:
        dense(doc)


if __name__ == "__main__":
    main(sys.argv[1])
