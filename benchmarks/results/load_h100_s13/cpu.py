"""Per-process CPU (% of one core) of the python processes, every N seconds, from /proc (delta of utime+stime)."""
import os, sys, time
every, dur, out = float(sys.argv[1]), float(sys.argv[2]), open(sys.argv[3], "w")
tck = os.sysconf("SC_CLK_TCK")
def snap():
    d = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:160]
            if "python" not in cmd:
                continue
            st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            d[int(pid)] = (int(st[11]) + int(st[12]), cmd)
        except OSError:
            pass
    return d
prev, t0 = snap(), time.time()
while time.time() - t0 < dur:
    time.sleep(every)
    cur = snap()
    rows = [(round(100 * (v[0] - prev[p][0]) / tck / every), p, v[1]) for p, v in cur.items() if p in prev]
    rows.sort(reverse=True)
    tot = sum(r[0] for r in rows)
    out.write(f"t={time.time()-t0:.0f}s total={tot}%\n" + "".join(f"  {c:4d}% {p} {cmd[-90:]}\n" for c, p, cmd in rows[:40] if c > 2))
    out.flush()
    prev = cur
