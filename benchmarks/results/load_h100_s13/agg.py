"""Aggregate py-spy raw (collapsed) output: per thread, the top self frames and top inclusive frames."""
import collections, re, sys
lines = open(sys.argv[1]).read().splitlines()
by_thread = collections.Counter(); self_t = collections.defaultdict(collections.Counter); incl = collections.defaultdict(collections.Counter)
total = 0
for ln in lines:
    stack, _, n = ln.rpartition(" ")
    try:
        n = int(n)
    except ValueError:
        continue
    frames = stack.split(";")
    th = frames[0]
    total += n
    by_thread[th] += n
    fr = [re.sub(r" \(/.*?/(site-packages|lib/python3\.\d+|main)/", " (", f) for f in frames[1:]]
    if fr:
        self_t[th][fr[-1]] += n
    for f in set(fr):
        incl[th][f] += n
print("total samples", total)
for th, n in by_thread.most_common(12):
    print(f"\n== {th}: {n} ({100*n/max(total,1):.1f}%)")
    print(" self:")
    for f, c in self_t[th].most_common(12):
        print(f"   {c:6d} {f[:150]}")
    print(" inclusive:")
    for f, c in incl[th].most_common(25):
        print(f"   {c:6d} {f[:150]}")
