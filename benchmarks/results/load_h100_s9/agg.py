"""Aggregate a py-spy raw profile: per thread, self and inclusive shares of the top frames."""
import collections, sys
self_, incl, thr = collections.Counter(), collections.Counter(), collections.Counter()
for line in open(sys.argv[1]):
    stack, n = line.rsplit(' ', 1); n = int(n)
    frames = stack.split(';')
    t = frames[0].split(':')[-1].strip()
    t = 'scheduler' if 'scheduler' in t else ('main' if 'MainThread' in t else t)
    if t == 'main' and not any('run_in_process' in f for f in frames):
        continue  # model load / compile / references: before the clock
    thr[t] += n
    self_[(t, frames[-1])] += n
    for fr in set(frames[1:]):
        incl[(t, fr)] += n
print('samples per thread (timed part)', thr.most_common())
for t in ('scheduler', 'main'):
    tot = thr[t] or 1
    print(f'== {t}: self')
    for (tt, k), v in self_.most_common():
        if tt == t and v / tot > 0.004:
            print(f'{100*v/tot:5.1f} {k}')
    print(f'== {t}: inclusive')
    for (tt, k), v in incl.most_common():
        if tt == t and v / tot > 0.01:
            print(f'{100*v/tot:5.1f} {k}')
