"""Summarise a TEAL_TRACE dump (see gemv_attention_trace.patch): per kernel of one decode
step, the blocks' phases in microseconds, relative to the first block's release from
griddepcontrol.wait; then, per kind of launch of the Llama-3-8B step, the mean span and the
excess over the kept rows' bytes at 4.4 TB/s. Usage: python3 trace_summary.py trace.bin"""
import collections, statistics as st, struct, sys

d = open(sys.argv[1], "rb").read()
off = 0
while off < len(d):
    n = struct.unpack_from("<Q", d, off)[0]
    off += 8
    recs = [struct.unpack_from("<8Q", d, off + i * 64) for i in range(n)]
    off += n * 64
    by = collections.defaultdict(list)
    for r in recs:
        by[r[0]].append(r)
    ks = sorted(by, key=lambda k: min(x[3] for x in by[k]))
    base = min(x[3] for x in by[ks[0]])
    print(f"{len(ks)} launches, {len(recs)} blocks")
    print("  #  blocks  grid       start  released_by  pre_stream(med/max)  stream(med/max)  tail  span   gap  kept/block")
    prev_end = None
    for i, k in enumerate(ks):
        rs = by[k]
        t1 = [x[3] for x in rs]
        b = min(t1)
        end = max(x[7] for x in rs)
        gx = max((x[1] >> 16) & 0xFFFF for x in rs) + 1
        gy = max((x[1] >> 32) & 0xFFFF for x in rs) + 1
        attn = rs[0][6] == 0  # the attention records no stream phase
        pre = [((x[4] if attn else x[5]) - x[3]) / 1e3 for x in rs]
        stream = [0.0 if attn else (x[6] - x[5]) / 1e3 for x in rs]
        tail = [(x[7] - (x[4] if attn else x[6])) / 1e3 for x in rs]
        gap = (b - prev_end) / 1e3 if prev_end else float("nan")
        prev_end = end
        if i < 11 or i >= len(ks) - 1:
            kind = "attention" if attn else f"({gx},{gy})"
            print(f"{i:3d} {len(rs):6d}  {kind:10s} {(b-base)/1e3:7.2f}  {(max(t1)-b)/1e3:6.2f}      "
                  f"{st.median(pre):5.2f}/{max(pre):5.2f}        {st.median(stream):6.2f}/{max(stream):6.2f}   "
                  f"{st.median(tail):4.2f} {(end-b)/1e3:6.2f} {gap:5.2f}  {sum(x[1] & 0xFFFF for x in rs)/len(rs):7.1f}")
    print(f"step: {(prev_end-base)/1e3:.1f} us")
    shapes = {"q|k|v": (4096, 6144), "o": (4096, 4096), "gate|up": (4096, 28672), "down": (14336, 4096)}
    agg = collections.defaultdict(list)
    for i, k in enumerate(ks[:-1]):
        name = ["q|k|v", "attention", "o", "gate|up", "down"][i % 5]
        rs = by[k]
        span = (max(x[7] for x in rs) - min(x[3] for x in rs)) / 1e3
        if name == "attention":
            agg[name].append((span, 0.0, span))
            continue
        kept = sum(x[1] & 0xFFFF for x in rs if (x[1] >> 16) & 0xFFFF == 0)  # one column tile
        mb = kept * shapes[name][1] * 2 / 1e6
        agg[name].append((span, mb, span - mb / 4.4))  # 4.4 TB/s = 4.4 MB per µs
    for name, v in agg.items():
        print(f"  {name:10s} mean span {st.mean(a for a, _, _ in v):7.2f}  MB {st.mean(b for _, b, _ in v):6.1f}"
              f"  excess {st.mean(c for _, _, c in v):5.2f}")
