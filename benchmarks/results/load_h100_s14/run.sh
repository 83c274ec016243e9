#!/bin/bash
# Session-14 runs 114-123 (H100; docs/capacity.md "Runs 114-123"). $1 picks the group. Helpers (cpu.py, agg.py) are
# session 13's. Group A: relay/uvloop/generator changes (first call: the profile fired after the load, a script bug);
# B: + engine scheduler statistics (its first run was killed by the call's time limit); C: + token-only events;
# D: + latency by stream second, --start-spread; E, F: --first-chunk-batch (removed since: first_chunk_batch.patch),
# F also with Inductor's deterministic mode (kept).
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
  grep -h "scheduler:" $LOG > $OUT/r/${TAG}_sched.txt; cut -c1-900 $OUT/r/${TAG}_sched.txt
  rm -f $OUT/r/*_dump.txt
}
RUNQ() {  # tag timeout args...: a load run and its engines' scheduler stats, no profiles
  local TAG=$1 TO=$2; shift 2
  timeout $TO $CA "$@" --summary-json $OUT/r/$TAG.json > $OUT/r/$TAG.log 2>&1
  S $OUT/r/$TAG.json; grep "^K=" $OUT/r/$TAG.log
  local LOG=$(python3 -c "import json;print(json.load(open('$OUT/r/$TAG.json'))['server_log'])")
  grep -h "scheduler:" $LOG > $OUT/r/${TAG}_sched.txt; cut -c1-900 $OUT/r/${TAG}_sched.txt
}
case "$1" in
A)
RUN a_e3_w8_f100 560 --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 100
;;
esac
case "$1" in
G)  # not run yet (next session): the configuration of run 119 with the slots reserved at warm-up (since 9b8e768), an
    # engine profiled from the load's start (PROF starts 3 s after the generators, i.e. in the streams' first seconds)
RUN g_e3_w8_f160_bw64_reserve 570 --fixed-batch 256 --max-batch 256 --batch-wait-ms 64 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
python3 -c "
import json,sys; d=json.load(open(sys.argv[1])); print(d['runs'][0].get('latency_by_stream_second'))" $OUT/r/g_e3_w8_f160_bw64_reserve.json
head -60 $OUT/r/g_e3_w8_f160_bw64_reserve_eng_prof.txt
;;
esac
case "$1" in
F)
RUNQ f_e3_w8_f160_bw64_first32_det 570 --fixed-batch 256 --first-chunk-batch 32 --max-batch 256 --batch-wait-ms 64 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
python3 -c "
import json,sys; d=json.load(open(sys.argv[1])); print(d['runs'][0].get('latency_by_stream_second'))" $OUT/r/f_e3_w8_f160_bw64_first32_det.json
;;
esac
case "$1" in
E)
RUNQ e_e3_w8_f160_bw64_first32 440 --fixed-batch 256 --first-chunk-batch 32 --max-batch 256 --batch-wait-ms 64 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
RUNQ e_e3_w8_f100_bw64_first32 $((590 - SECONDS)) --fixed-batch 256 --first-chunk-batch 32 --max-batch 256 --batch-wait-ms 64 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 100
for f in $OUT/r/e_*.json; do python3 -c "
import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], d['runs'][0].get('latency_by_stream_second'))" $f; done
;;
esac
case "$1" in
D)
RUNQ d_e3_w8_f160_bw64 430 --fixed-batch 256 --max-batch 256 --batch-wait-ms 64 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
RUNQ d_e3_w8_f160_bw64_ss4 $((590 - SECONDS)) --fixed-batch 256 --max-batch 256 --batch-wait-ms 64 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --start-spread 4 --streams 2048 --frame-ms 160
for f in $OUT/r/d_*.json; do python3 -c "
import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], d['runs'][0].get('latency_by_stream_second'))" $f; done
;;
esac
case "$1" in
C)
RUNQ c_e3_w8_f100_bw64 430 --fixed-batch 256 --max-batch 256 --batch-wait-ms 64 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 100
RUNQ c_e3_w8_f160_bw64 $((590 - SECONDS)) --fixed-batch 256 --max-batch 256 --batch-wait-ms 64 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
;;
esac
case "$1" in
B)
RUNQ b_e3_w8_f160 300 --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
RUNQ b_e3_w8_f100 300 --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 8 --server-engines 3 --duration 6 --end-spread 2 --streams 2048 --frame-ms 100
RUNQ b_e4_w8_f160 300 --fixed-batch 128 --max-batch 256 --batch-wait-ms 40 --server-workers 8 --server-engines 4 --duration 6 --end-spread 2 --streams 2048 --frame-ms 160
;;
esac
