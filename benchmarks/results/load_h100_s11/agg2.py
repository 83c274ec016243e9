import collections, sys
self_, incl, thr = collections.Counter(), collections.Counter(), collections.Counter()
for line in open(sys.argv[1]):
    stack, n = line.rsplit(' ', 1); n = int(n)
    frames = stack.split(';')
    t = frames[0].split(':')[-1].strip()
    thr[t] += n
    self_[(t, frames[-1])] += n
    for fr in set(frames[1:]):
        incl[(t, fr)] += n
print('samples per thread', thr.most_common())
for t in [t for t, _ in thr.most_common()]:
    tot = thr[t] or 1
    print(f'== {t}: self')
    for (tt, k), v in self_.most_common(40):
        if tt == t:
            print(f'{100*v/tot:5.1f} {k}')
    print(f'== {t}: inclusive')
    for (tt, k), v in incl.most_common():
        if tt == t and v / tot > 0.03:
            print(f'{100*v/tot:5.1f} {k}')
