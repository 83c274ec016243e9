#!/bin/bash
# Session-16 runs (H100; docs/capacity.md), written in session 16 and run in session 17 (2026-12-08: group L in one
# call, then group M on the same warm machine; results beside this file, runs 135-139). $1 picks the group. Helpers (cpu.py, agg.py) are session 13's; RUN,
# RUNQ and TL as session 15's (TL prints each engine's scheduler timeline from the server log).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/loadbench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
H=benchmarks/results/load_h100_s13
mkdir -p $OUT/r
S() { python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    print(sys.argv[1].split('/')[-1], r['streams'], r['sustained'], 'p50/p95/p99', r['p50_latency_ms'], r['p95_latency_ms'], r['p99_latency_ms'], 'words', r['duplicated_words'], r['lost_words'], r['reference_words'], 'gpu', (r.get('gpu_utilization') or {}).get('mean'), 'err', r['n_errors'], 'lost_s', r['lost_audio_seconds'], 'final', r.get('final_latency'))
" $1; }
CA="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --drain-timeout 30 --mode cache-aware --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160 --clients-per-process 128 --kv-cache ring"
PROF() {  # pid seconds tag: per-thread CPU from /proc and a py-spy profile (all threads, not only the GIL holder)
  local P=$1 D=$2 TAG=$3
  /tmp/site/bin/py-spy dump --nonblocking --pid $P > $OUT/r/${TAG}_dump.txt 2>&1
  for t in /proc/$P/task/*; do echo "$(basename $t) $(awk '{print $14+$15}' $t/stat)"; done | sort > /tmp/t0_$TAG
  /tmp/site/bin/py-spy record --nonblocking -r 80 -d $D -f raw -o /tmp/${TAG}.txt --threads --pid $P > /dev/null 2>&1
  for t in /proc/$P/task/*; do echo "$(basename $t) $(awk '{print $14+$15}' $t/stat)"; done | sort > /tmp/t1_$TAG
  join /tmp/t0_$TAG /tmp/t1_$TAG | awk -v d=$D '{x=$3-$2; if (x>0) printf "%s %.1f%%\n", $1, x/d}' | sort -k2 -nr > $OUT/r/${TAG}_threads.txt
  python3 $H/agg.py /tmp/${TAG}.txt > $OUT/r/${TAG}_prof.txt 2>&1
  grep -o "Thread [0-9]* ([a-z+]*): \"[^\"]*\"" $OUT/r/${TAG}_dump.txt > $OUT/r/${TAG}_names.txt
}
TL() {  # each engine's summary (without the timeline), then the timelines side by side
  python3 - "$1" <<'PY'
import json, sys
eng = []
for line in open(sys.argv[1]):
    pid, _, js = line.partition(" scheduler: ")
    d = json.loads(js)
    tl = d.pop("timeline", [])
    print(pid.split()[-1], json.dumps({k: d[k] for k in ("steps", "mean_batch", "step_ms", "event_latency_ms", "phase_ms_per_step")}))
    eng.append({r["t"]: r for r in tl})
ts = sorted({t for e in eng for t in e})
print("t  | per engine: steps batch/ready step_ms lat_mean/lat_max queued_ms arrived_s")
for t in ts:
    cells = []
    for e in eng:
        r = e.get(t)
        cells.append("-" if r is None else f'{r["steps"]:2d} {r["batch"]:5.1f}/{r["ready"]:5.1f} {r["step_ms"]:5.1f} {r["latency_ms"] or 0:6.0f}/{r["latency_max_ms"]:6.0f} {r["queued_ms"]:6.0f} {r.get("arrived_s") or 0:6.1f}')
    print(f"{t:5.1f} | " + " | ".join(cells))
PY
}
LGW() { for i in $(seq 1 500); do pgrep -P $1 -f spawn_main > /dev/null && break; sleep 1; done; }
RUN() {  # tag timeout args...: one load run with CPU sampling, an engine and a front-end profiled during the load
  local TAG=$1 TO=$2; shift 2
  timeout $TO $CA "$@" --summary-json $OUT/r/$TAG.json > $OUT/r/$TAG.log 2>&1 &
  local BP=$!; sleep 2
  local BENCH=$(pgrep -P $BP | head -1)  # timeout's child: the bench itself, parent of the load generators
  LGW $BENCH; sleep 3
  local SUP=$(pgrep -f "trt_asr.cli.bench import _serve_main" | head -1)
  local KIDS=$(for p in $(pgrep -P $SUP -f spawn_main); do echo $p; done | sort -n)
  local E=$(echo "$KIDS" | head -1)
  local F=$(echo "$KIDS" | tail -1)
  echo "bench $BENCH server $SUP engine $E front-end $F"
  python3 $H/cpu.py 3 12 $OUT/r/cpu_$TAG.txt &
  local CP=$!
  PROF $E 5 ${TAG}_eng &
  local P1=$!
  PROF $F 5 ${TAG}_fe &
  local P2=$!
  wait $CP $P1 $P2; wait $BP
  S $OUT/r/$TAG.json; grep "^K=" $OUT/r/$TAG.log; tail -2 $OUT/r/$TAG.log
  grep -A12 total $OUT/r/cpu_$TAG.txt | cut -c1-70 | head -60
  for t in ${TAG}_eng ${TAG}_fe; do echo "== $t"; head -8 $OUT/r/${t}_threads.txt; cat $OUT/r/${t}_names.txt; done
  local LOG=$(python3 -c "import json;print(json.load(open('$OUT/r/$TAG.json'))['server_log'])")
  grep -h "scheduler:" $LOG > $OUT/r/${TAG}_sched.txt; TL $OUT/r/${TAG}_sched.txt
  rm -f $OUT/r/*_dump.txt
}
RUNQ() {  # tag timeout args...: a load run and its engines' scheduler stats, no profiles
  local TAG=$1 TO=$2; shift 2
  timeout $TO $CA "$@" --summary-json $OUT/r/$TAG.json > $OUT/r/$TAG.log 2>&1
  S $OUT/r/$TAG.json; grep "^K=" $OUT/r/$TAG.log
  local LOG=$(python3 -c "import json;print(json.load(open('$OUT/r/$TAG.json'))['server_log'])")
  grep -h "scheduler:" $LOG > $OUT/r/${TAG}_sched.txt; TL $OUT/r/${TAG}_sched.txt
}
CS() {  # the clients' start and latency by stream second, the front-ends' own latency
  python3 -c "
import json,sys; r=json.load(open(sys.argv[1]))['runs'][0]; print(r.get('client_start')); print(r.get('latency_by_stream_second')); print(r.get('server_latency'))" $1
}
case "$1" in
L)  # each step's events delivered right after it (not during the next step) and sent from the scheduler's thread;
    # the front-ends serve their engine links and caption dispatch from their event loop. Run 133's configuration
    # (12 front-ends, 40 ms batch wait), cold then warm
for n in 1 2; do
  left=$((590 - SECONDS)); [ $left -lt 140 ] && break
  RUNQ l${n}_e3_w12_f160_bw40 $([ $n = 1 ] && echo 450 || echo $left) --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 12 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
  CS $OUT/r/l${n}_e3_w12_f160_bw40.json
done
;;
esac
case "$1" in
M)  # warm, after group L: run L's configuration again; the same with the front-ends' links on threads (as before
    # this session: the engine-side change alone); then 2,304 streams
RUNQ m1_e3_w12_f160_bw40 200 --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 12 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
CS $OUT/r/m1_e3_w12_f160_bw40.json
left=$((590 - SECONDS)); [ $left -gt 150 ] && TRT_ASR_FRONT_END_IO=threads RUNQ m2_e3_w12_f160_bw40_threads 200 --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 12 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
[ -f $OUT/r/m2_e3_w12_f160_bw40_threads.json ] && CS $OUT/r/m2_e3_w12_f160_bw40_threads.json
left=$((590 - SECONDS)); [ $left -gt 150 ] && RUNQ m3_e3_w12_f160_bw40_k2304 $left --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 12 --server-engines 3 --duration 6 --end-spread 2 --streams 2304 --frame-ms 160
[ -f $OUT/r/m3_e3_w12_f160_bw40_k2304.json ] && CS $OUT/r/m3_e3_w12_f160_bw40_k2304.json
;;
esac
