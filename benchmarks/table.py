"""Markdown table of a benchmark JSON (benchmarks/results/*.json): cuflash TFLOP/s and its ratio to
each peer, one row per (pass, dtype, headdim, causal), one column per seqlen.

    python benchmarks/table.py benchmarks/results/h100-fwd.json
"""
import json
import sys


def main(path):
    doc = json.load(open(path))
    rows = {}
    for r in doc["results"]:
        key = (r["pass"], r["dtype"], r["headdim"], r["causal"])
        rows.setdefault(key, {}).setdefault(r["seqlen_q"], {})[r["impl"]] = r["tflops"]
    seqlens = sorted({s for cols in rows.values() for s in cols})
    print(f"{doc['device']}, {doc['date'][:10]}, `{doc['command']}` (commit {str(doc['commit'])[:10]}). "
          "Each cell: cuflash TFLOP/s (ratio to SDPA FLASH / to SDPA CUDNN).\n")
    print("| pass | dtype | d | causal | " + " | ".join(map(str, seqlens)) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in seqlens) + " |")
    for (pass_, dtype, d, causal), cols in sorted(rows.items()):
        cells = []
        for s in seqlens:
            c = cols.get(s, {})
            if "cuflash" not in c:
                cells.append("-")
                continue
            ratios = [f"{c['cuflash'] / c[p]:.2f}" if p in c else "-" for p in ("sdpa_flash", "sdpa_cudnn")]
            cells.append(f"{c['cuflash']:.0f} ({' / '.join(ratios)})")
        print(f"| {pass_} | {dtype} | {d} | {causal} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
