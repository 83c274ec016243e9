#!/bin/bash
# Session-10 capacity runs through the server (H100): worker processes. $1 picks the group.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/loadbench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
mkdir -p $OUT/r
S() { python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    print(sys.argv[1].split('/')[-1], r['streams'], r['sustained'], 'p50/p95/p99', r['p50_latency_ms'], r['p95_latency_ms'], r['p99_latency_ms'], 'words', r['duplicated_words'], r['lost_words'], r['reference_words'], 'gpu', (r.get('gpu_utilization') or {}).get('mean'), 'err', r['n_errors'], r['errors'][:2], 'lost_s', r['lost_audio_seconds'], 'srv', r.get('server_latency'), 'wall', r.get('wall_seconds'), 'final', r.get('final_latency'))
" $1; }
CA="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160 --clients-per-process 64"
BUF="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --drain-timeout 30 --mode buffered --max-streams 4096 --dtype fp16 --compile default --duration 12 --clients-per-process 64"
B2="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --in-process --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160"
case "$1" in
A)
timeout 200 $CA --fixed-batch 256 --max-batch 256 --server-workers 1 --streams 256,512 --summary-json $OUT/r/a_ca_w1_f256.json > $OUT/r/a1.log 2>&1; S $OUT/r/a_ca_w1_f256.json
timeout 380 $CA --fixed-batch 256 --max-batch 256 --server-workers 2 --streams 512,768,1024 --summary-json $OUT/r/a_ca_w2_f256.json > $OUT/r/a2.log 2>&1; S $OUT/r/a_ca_w2_f256.json
;;
B)
timeout 570 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 60 --server-workers 4 --streams 1024,1536,2048 --summary-json $OUT/r/b_ca_w4_f128_bw60.json > $OUT/r/b1.log 2>&1; S $OUT/r/b_ca_w4_f128_bw60.json
;;
E)
timeout 300 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 60 --server-workers 4 --streams 1024,1536 --summary-json $OUT/r/e_ca_w4_f128_bw60_nodeflate.json > $OUT/r/e1.log 2>&1; S $OUT/r/e_ca_w4_f128_bw60_nodeflate.json
timeout 270 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 60 --server-workers 1 --streams 256,384,512 --summary-json $OUT/r/e_ca_w1_f128_bw60_nodeflate.json > $OUT/r/e2.log 2>&1; S $OUT/r/e_ca_w1_f128_bw60_nodeflate.json
;;
P)
$CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 60 --server-workers 4 --streams 1024 --summary-json $OUT/r/p_ca_w4_prof.json > $OUT/r/p1.log 2>&1 &
BP=$!
for i in $(seq 1 400); do pgrep -P $BP -f spawn_main > /dev/null && break; sleep 1; done
pgrep -af "python" | cut -c1-150 > $OUT/r/p_procs.txt
sleep 4
top -b -n 1 -w 200 | head -45 > $OUT/r/p_top.txt
W=$(pgrep -f "trt_asr.cli.bench import _serve_main" | head -1)
WK=$(pgrep -P $W -f spawn_main | head -1)
CL=$(pgrep -P $BP -f spawn_main | tail -1)
echo "server $W worker $WK client $CL" >> $OUT/r/p_procs.txt
/tmp/site/bin/py-spy record -r 80 -d 4 -f raw -o /tmp/pw.txt --threads --pid $WK > /dev/null 2>&1 &
/tmp/site/bin/py-spy record -r 80 -d 4 -f raw -o /tmp/pc.txt --threads --pid $CL > /dev/null 2>&1 &
sleep 1; top -b -n 1 -w 200 | head -45 > $OUT/r/p_top2.txt
wait $BP; sleep 1
python3 .carry/s10/agg2.py /tmp/pw.txt > $OUT/r/p_worker_prof.txt 2>&1; python3 .carry/s10/agg2.py /tmp/pc.txt > $OUT/r/p_client_prof.txt 2>&1
S $OUT/r/p_ca_w4_prof.json; cat $OUT/r/p_procs.txt | tail -3; head -30 $OUT/r/p_top.txt
;;
F)
timeout 250 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --streams 128,192,256 --summary-json $OUT/r/f_ca_w1_f128_bw40.json > $OUT/r/f1.log 2>&1; S $OUT/r/f_ca_w1_f128_bw40.json
timeout 310 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 4 --streams 512,768,1024 --summary-json $OUT/r/f_ca_w4_f128_bw40.json > $OUT/r/f2.log 2>&1; S $OUT/r/f_ca_w4_f128_bw40.json
;;
C2)
timeout 570 $BUF --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 250 --server-workers 4 --streams 512,1024,1280 --summary-json $OUT/r/c2_buf_w4_f128_bw250.json > $OUT/r/c2.log 2>&1; S $OUT/r/c2_buf_w4_f128_bw250.json
;;
H)
timeout 250 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --streams 128,192,256 --summary-json $OUT/r/h_ca_w1_f128_bw40.json > $OUT/r/h1.log 2>&1; S $OUT/r/h_ca_w1_f128_bw40.json
timeout 310 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 4 --streams 512,768,1024 --summary-json $OUT/r/h_ca_w4_f128_bw40.json > $OUT/r/h2.log 2>&1; S $OUT/r/h_ca_w4_f128_bw40.json
;;
I)
timeout 300 $BUF --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 250 --server-workers 2 --streams 1024,1280 --summary-json $OUT/r/i_buf_w2_f128_bw250.json > $OUT/r/i1.log 2>&1; S $OUT/r/i_buf_w2_f128_bw250.json
timeout 260 $CA --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 1 --streams 128,192,256 --summary-json $OUT/r/i_ca_w1_f128_bw40.json > $OUT/r/i2.log 2>&1; S $OUT/r/i_ca_w1_f128_bw40.json
;;
J)
timeout 270 $CA --clients-per-process 128 --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 4 --streams 512,768 --summary-json $OUT/r/j_ca_w4_f128_bw40.json > $OUT/r/j1.log 2>&1; S $OUT/r/j_ca_w4_f128_bw40.json
timeout 280 $BUF --clients-per-process 128 --fixed-batch 64 --max-batch 64 --batch-wait-ms 150 --server-workers 4 --streams 1024 --summary-json $OUT/r/j_buf_w4_f64_bw150.json > $OUT/r/j2.log 2>&1; S $OUT/r/j_buf_w4_f64_bw150.json
;;
D)
timeout 280 $B2 --fixed-batch 512 --max-batch 512 --batch-wait-ms 60 --streams 1280,1536,2048 --summary-json $OUT/r/d_inproc_f512_bw60.json > $OUT/r/d1.log 2>&1; S $OUT/r/d_inproc_f512_bw60.json
timeout 290 $B2 --fixed-batch 512 --max-batch 512 --batch-wait-ms 60 --processes 2 --streams 2048 --summary-json $OUT/r/d_inproc_f512_bw60_p2.json > $OUT/r/d2.log 2>&1; S $OUT/r/d_inproc_f512_bw60_p2.json
;;
C)
timeout 560 $BUF --fixed-batch 128 --max-batch 128 --server-workers 4 --streams 512,1024 --summary-json $OUT/r/c_buf_w4_f128.json > $OUT/r/c1.log 2>&1; S $OUT/r/c_buf_w4_f128.json
;;
esac
cp /tmp/trt_asr_bench_server_*.log $OUT/r/ 2>/dev/null
for f in $OUT/r/*.log; do echo "== $f"; grep -v Warning $f | tail -4; done
