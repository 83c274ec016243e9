#!/bin/bash
# Session-11 runs (H100). $1 picks the group. (.carry/s11/agg2.py is benchmarks/results/load_h100_s10/agg2.py;
# .carry/s11/olddisp/ is this tree with trt_asr/captions/pipeline.py from 92a14a3, for the A/B of run 93.)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/loadbench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
mkdir -p $OUT/r
S() { python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    print(sys.argv[1].split('/')[-1], r['streams'], r['sustained'], 'p50/p95/p99', r['p50_latency_ms'], r['p95_latency_ms'], r['p99_latency_ms'], 'words', r['duplicated_words'], r['lost_words'], r['reference_words'], 'gpu', (r.get('gpu_utilization') or {}).get('mean'), 'err', r['n_errors'], r['errors'][:2], 'lost_s', r['lost_audio_seconds'], 'srv', r.get('server_latency'), 'wall', r.get('wall_seconds'), 'final', r.get('final_latency'))
" $1; }
CA="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --drain-timeout 30 --mode cache-aware --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160 --clients-per-process 64"
B2="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --in-process --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160"
# per-thread CPU of process $1 over $2 seconds, with names from py-spy dump, and a py-spy profile ($3: file tag)
PROF() {
  local P=$1 D=$2 TAG=$3
  /tmp/site/bin/py-spy dump --nonblocking --pid $P > $OUT/r/${TAG}_dump.txt 2>&1
  for t in /proc/$P/task/*; do echo "$(basename $t) $(awk '{print $14+$15}' $t/stat)"; done | sort > /tmp/t0
  /tmp/site/bin/py-spy record --nonblocking -r 80 -d $D -f raw -o /tmp/${TAG}.txt --threads --pid $P > /dev/null 2>&1
  for t in /proc/$P/task/*; do echo "$(basename $t) $(awk '{print $14+$15}' $t/stat)"; done | sort > /tmp/t1
  join /tmp/t0 /tmp/t1 | awk -v d=$D '{x=$3-$2; if (x>0) printf "%s %.1f%%\n", $1, x/d}' | sort -k2 -nr > $OUT/r/${TAG}_threads.txt
  python3 .carry/s11/agg2.py /tmp/${TAG}.txt > $OUT/r/${TAG}_prof.txt 2>&1
  grep -o "Thread [0-9]* ([a-z+]*): \"[^\"]*\"" $OUT/r/${TAG}_dump.txt > $OUT/r/${TAG}_names.txt
}
case "$1" in
K)
$CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --streams 192 --duration 16 --summary-json $OUT/r/k_ca_w1_192.json > $OUT/r/k1.log 2>&1 &
BP=$!
for i in $(seq 1 400); do pgrep -P $BP -f spawn_main > /dev/null && break; sleep 1; done
sleep 5
W=$(pgrep -f "trt_asr.cli.bench import _serve_main" | head -1)
top -b -n 1 -w 200 | head -30 > $OUT/r/k_top.txt
PROF $W 6 k_srv
wait $BP
S $OUT/r/k_ca_w1_192.json
cat $OUT/r/k_srv_threads.txt | head; cat $OUT/r/k_srv_names.txt
head -60 $OUT/r/k_srv_prof.txt
;;
G)
timeout 330 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --duration 8 --streams 192,256,384,512 --summary-json $OUT/r/g_ca_w1_freeze.json > $OUT/r/g1.log 2>&1; S $OUT/r/g_ca_w1_freeze.json
TRT_ASR_GC_FREEZE=0 timeout 240 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --duration 8 --streams 192 --summary-json $OUT/r/g_ca_w1_nofreeze.json > $OUT/r/g2.log 2>&1; S $OUT/r/g_ca_w1_nofreeze.json
python3 -c "
import json
for f in ['g_ca_w1_freeze', 'g_ca_w1_nofreeze']:
    d = json.load(open('$OUT/r/' + f + '.json'))
    for r in d['runs']: print(f, r['streams'], r.get('server_gc'))
"
;;
H)
timeout 300 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --duration 8 --streams 192,256,384 --summary-json $OUT/r/h_ca_w1.json > $OUT/r/h1.log 2>&1; S $OUT/r/h_ca_w1.json
timeout 290 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 4 --duration 8 --streams 512,768,1024 --summary-json $OUT/r/h_ca_w4.json > $OUT/r/h2.log 2>&1; S $OUT/r/h_ca_w4.json
python3 -c "
import json
for f in ['h_ca_w1', 'h_ca_w4']:
    d = json.load(open('$OUT/r/' + f + '.json'))
    for r in d['runs']: print(f, r['streams'], r.get('server_gc'))
"
;;
I)
timeout 280 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --duration 8 --end-spread 2 --streams 192,256,384,512 --summary-json $OUT/r/i_ca_w1_spread.json > $OUT/r/i1.log 2>&1; S $OUT/r/i_ca_w1_spread.json
timeout 300 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 4 --duration 8 --end-spread 2 --streams 768,1024,1280 --summary-json $OUT/r/i_ca_w4_spread.json > $OUT/r/i2.log 2>&1; S $OUT/r/i_ca_w4_spread.json
;;
J)
# profile one worker near its limit (ends spread), then the same at 256 / 320 with the old caption dispatcher
$CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --duration 14 --end-spread 2 --streams 320 --summary-json $OUT/r/j_ca_w1_320_prof.json > $OUT/r/j1.log 2>&1 &
BP=$!
for i in $(seq 1 400); do pgrep -P $BP -f spawn_main > /dev/null && break; sleep 1; done
sleep 5
W=$(pgrep -f "trt_asr.cli.bench import _serve_main" | head -1)
top -b -n 1 -w 200 | head -30 > $OUT/r/j_top.txt
PROF $W 6 j_srv
wait $BP
S $OUT/r/j_ca_w1_320_prof.json
cat $OUT/r/j_srv_threads.txt | head; cat $OUT/r/j_srv_names.txt
head -45 $OUT/r/j_srv_prof.txt
R=$PWD
(cd .carry/s11/olddisp && PYTHONPATH=/tmp/site timeout 240 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --duration 8 --end-spread 2 --streams 256,320 --summary-json $OUT/r/j_ca_w1_olddisp.json > $OUT/r/j2.log 2>&1); S $OUT/r/j_ca_w1_olddisp.json
;;
L)
TRT_ASR_SWITCH_INTERVAL=0.001 timeout 250 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --duration 8 --end-spread 2 --streams 256,320,384 --summary-json $OUT/r/l_ca_w1_sw1ms.json > $OUT/r/l1.log 2>&1; S $OUT/r/l_ca_w1_sw1ms.json
timeout 300 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 4 --duration 8 --end-spread 2 --streams 512,640 --summary-json $OUT/r/l_ca_w4_spread.json > $OUT/r/l2.log 2>&1; S $OUT/r/l_ca_w4_spread.json
;;
M)
timeout 250 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 2 --duration 8 --end-spread 2 --streams 512,640 --summary-json $OUT/r/m_ca_w2_spread.json > $OUT/r/m1.log 2>&1; S $OUT/r/m_ca_w2_spread.json
timeout 250 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 3 --duration 8 --end-spread 2 --streams 768 --summary-json $OUT/r/m_ca_w3_spread.json > $OUT/r/m2.log 2>&1; S $OUT/r/m_ca_w3_spread.json
;;
D)
timeout 280 $B2 --fixed-batch 512 --max-batch 512 --batch-wait-ms 60 --streams 1280,1536,2048 --summary-json $OUT/r/d_inproc_f512_bw60.json > $OUT/r/d1.log 2>&1; S $OUT/r/d_inproc_f512_bw60.json
;;
esac
cp /tmp/trt_asr_bench_server_*.log $OUT/r/ 2>/dev/null
for f in $OUT/r/*.log; do echo "== $f"; grep -v Warning $f | tail -4; done
