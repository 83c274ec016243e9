#!/bin/bash
# Session-13 runs (H100). $1 picks the group.
# Session 13. Groups G-H ran the first shared-engine code (a reader and a writer thread per front-end connection, spinning CUDA event);
# I and K a blocking CUDA event (not kept); K also one reader and one writer thread per engine (kept). J timed out before the load.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/loadbench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
mkdir -p $OUT/r
S() { python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    print(sys.argv[1].split('/')[-1], r['streams'], r['sustained'], 'p50/p95/p99', r['p50_latency_ms'], r['p95_latency_ms'], r['p99_latency_ms'], 'words', r['duplicated_words'], r['lost_words'], r['reference_words'], 'gpu', (r.get('gpu_utilization') or {}).get('mean'), 'err', r['n_errors'], 'lost_s', r['lost_audio_seconds'], 'final', r.get('final_latency'), 'gc', r.get('server_gc'))
" $1; }
CA="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --drain-timeout 30 --mode cache-aware --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160 --clients-per-process 128 --kv-cache ring"
CPU() { (sleep $1; python3 benchmarks/results/load_h100_s13/cpu.py 5 $2 $3) & }
case "$1" in
G)
CPU 150 240 $OUT/r/cpu_g1.txt
timeout 560 $CA --fixed-batch 256 --max-batch 256 --server-workers 8 --server-engines 3 --duration 8 --end-spread 2 --streams 1024,1536,2048 --summary-json $OUT/r/g_e3_w8.json > $OUT/r/g1.log 2>&1; S $OUT/r/g_e3_w8.json; grep "^K=" $OUT/r/g1.log; tail -3 $OUT/r/g1.log
;;
esac
PROF() {
  local P=$1 D=$2 TAG=$3
  /tmp/site/bin/py-spy dump --nonblocking --pid $P > $OUT/r/${TAG}_dump.txt 2>&1
  for t in /proc/$P/task/*; do echo "$(basename $t) $(awk '{print $14+$15}' $t/stat)"; done | sort > /tmp/t0_$TAG
  /tmp/site/bin/py-spy record --nonblocking -r 80 -d $D -f raw -o /tmp/${TAG}.txt --threads --pid $P > /dev/null 2>&1
  for t in /proc/$P/task/*; do echo "$(basename $t) $(awk '{print $14+$15}' $t/stat)"; done | sort > /tmp/t1_$TAG
  join /tmp/t0_$TAG /tmp/t1_$TAG | awk -v d=$D '{x=$3-$2; if (x>0) printf "%s %.1f%%\n", $1, x/d}' | sort -k2 -nr > $OUT/r/${TAG}_threads.txt
  python3 benchmarks/results/load_h100_s13/agg.py /tmp/${TAG}.txt > $OUT/r/${TAG}_prof.txt 2>&1
  grep -o "Thread [0-9]* ([a-z+]*): \"[^\"]*\"" $OUT/r/${TAG}_dump.txt > $OUT/r/${TAG}_names.txt
}
case "$1" in
H)
$CA --fixed-batch 256 --max-batch 256 --server-workers 8 --server-engines 3 --duration 16 --end-spread 2 --streams 1024 --summary-json $OUT/r/h_e3_w8_prof.json > $OUT/r/h1.log 2>&1 &
BP=$!
for i in $(seq 1 500); do pgrep -P $BP -f spawn_main > /dev/null && break; sleep 1; done
sleep 6
SUP=$(pgrep -f "trt_asr.cli.bench import _serve_main" | head -1)
KIDS=$(for p in $(pgrep -P $SUP -f spawn_main); do echo $p; done | sort -n)
E=$(echo "$KIDS" | head -1); F=$(echo "$KIDS" | tail -1)
echo "engine $E front-end $F"
top -b -n 1 -w 200 | head -40 > $OUT/r/h_top.txt
PROF $E 6 h_eng & P1=$!
PROF $F 6 h_fe & P2=$!
wait $P1 $P2
wait $BP
S $OUT/r/h_e3_w8_prof.json
for t in h_eng h_fe; do echo "== $t"; head -12 $OUT/r/${t}_threads.txt; cat $OUT/r/${t}_names.txt; head -70 $OUT/r/${t}_prof.txt; done
;;
esac
LGW() { for i in $(seq 1 500); do pgrep -P $1 -f spawn_main > /dev/null && break; sleep 1; done; }
case "$1" in
I)
$CA --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 8 --server-engines 3 --duration 8 --end-spread 2 --streams 2048 --summary-json $OUT/r/i_e3_w8_f256_bw40.json > $OUT/r/i1.log 2>&1 &
BP=$!; LGW $BP; python3 benchmarks/results/load_h100_s13/cpu.py 4 16 $OUT/r/cpu_i1.txt; wait $BP
S $OUT/r/i_e3_w8_f256_bw40.json; grep "^K=" $OUT/r/i1.log
$CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 8 --server-engines 4 --duration 8 --end-spread 2 --streams 2048 --summary-json $OUT/r/i_e4_w8_f128_bw40.json > $OUT/r/i2.log 2>&1 &
BP=$!; LGW $BP; python3 benchmarks/results/load_h100_s13/cpu.py 4 16 $OUT/r/cpu_i2.txt; wait $BP
S $OUT/r/i_e4_w8_f128_bw40.json; grep "^K=" $OUT/r/i2.log
grep total $OUT/r/cpu_i1.txt $OUT/r/cpu_i2.txt
;;
esac
case "$1" in
J)
$CA --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 8 --server-engines 3 --duration 12 --end-spread 2 --streams 2048 --summary-json $OUT/r/j_e3_w8_f256_bw40.json > $OUT/r/j1.log 2>&1 &
BP=$!; LGW $BP; sleep 5
SUP=$(pgrep -f "trt_asr.cli.bench import _serve_main" | head -1)
E=$(for p in $(pgrep -P $SUP -f spawn_main); do echo $p; done | sort -n | head -1)
python3 benchmarks/results/load_h100_s13/cpu.py 3 15 $OUT/r/cpu_j1.txt & CP=$!
PROF $E 5 j_eng
wait $CP; wait $BP
S $OUT/r/j_e3_w8_f256_bw40.json; grep "^K=" $OUT/r/j1.log
head -12 $OUT/r/j_eng_threads.txt; cat $OUT/r/j_eng_names.txt; head -60 $OUT/r/j_eng_prof.txt
grep -A8 total $OUT/r/cpu_j1.txt | head -40
;;
esac
case "$1" in
K)
python3 benchmarks/results/load_h100_s13/cpu.py 4 400 $OUT/r/cpu_k1.txt & 
timeout 400 $CA --fixed-batch 256 --max-batch 256 --batch-wait-ms 40 --server-workers 8 --server-engines 3 --duration 8 --end-spread 2 --streams 2048 --summary-json $OUT/r/k_e3_w8_f256_bw40.json > $OUT/r/k1.log 2>&1
S $OUT/r/k_e3_w8_f256_bw40.json; grep "^K=" $OUT/r/k1.log
;;
esac
