#!/bin/bash
# Session-12 runs (H100). $1 picks the group.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/loadbench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
mkdir -p $OUT/r
S() { python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    ps = r.get('processes') or [r]
    extra = [(p.get('streams'), round(p['scheduler']['mean_batch']), round(p['scheduler']['busy_fraction'],2), p['scheduler'].get('phase_ms_per_step'), p['scheduler'].get('step_ms',{}).get('p50')) for p in ps if 'scheduler' in p]
    print(sys.argv[1].split('/')[-1], r['streams'], r['sustained'], 'p50/p95/p99', r['p50_latency_ms'], r['p95_latency_ms'], r['p99_latency_ms'], 'words', r['duplicated_words'], r['lost_words'], r['reference_words'], 'gpu', (r.get('gpu_utilization') or {}).get('mean'), 'err', r['n_errors'], 'lost_s', r['lost_audio_seconds'], extra)
" $1; }
B2="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --in-process --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160"
case "$1" in
P)
timeout 280 python3 benchmarks/profile_stream_step.py --out $OUT/r/prof_li_512 --batch 512 > $OUT/r/p1.log 2>&1; tail -45 $OUT/r/p1.log
timeout 280 python3 benchmarks/profile_stream_step.py --out $OUT/r/prof_pj_512 --batch 512 --kv-cache projected > $OUT/r/p2.log 2>&1; tail -45 $OUT/r/p2.log
;;
esac
case "$1" in
R)
timeout 250 python3 benchmarks/profile_stream_step.py --out $OUT/r/prof_ring_512 --batch 512 --kv-cache ring > $OUT/r/r1.log 2>&1; tail -32 $OUT/r/r1.log
timeout 320 $B2 --kv-cache ring --fixed-batch 512 --max-batch 512 --streams 1536,2048 --summary-json $OUT/r/r_ring_f512.json > $OUT/r/r2.log 2>&1; S $OUT/r/r_ring_f512.json; tail -3 $OUT/r/r2.log
;;
esac
case "$1" in
A)
timeout 200 python3 benchmarks/profile_stream_step.py --out $OUT/r/prof_ring2_512 --batch 512 --kv-cache ring > $OUT/r/a1.log 2>&1; head -22 $OUT/r/prof_ring2_512/step_profile.md | tail -16
timeout 360 $B2 --kv-cache ring --fixed-batch 512 --max-batch 512 --streams 1792,2048 --summary-json $OUT/r/a_ring2_f512.json > $OUT/r/a2.log 2>&1; S $OUT/r/a_ring2_f512.json; grep "^K=" $OUT/r/a2.log
;;
esac
case "$1" in
B)
timeout 300 $B2 --kv-cache ring --fixed-batch 256 --max-batch 256 --processes 2 --streams 2048 --summary-json $OUT/r/b_ring_f256_p2.json > $OUT/r/b1.log 2>&1; S $OUT/r/b_ring_f256_p2.json; grep "^K=" $OUT/r/b1.log
timeout 285 $B2 --kv-cache ring --fixed-batch 512 --max-batch 512 --processes 2 --streams 2048 --summary-json $OUT/r/b_ring_f512_p2.json > $OUT/r/b2.log 2>&1; S $OUT/r/b_ring_f512_p2.json; grep "^K=" $OUT/r/b2.log
;;
esac
case "$1" in
C)
timeout 265 python3 benchmarks/profile_stream_step.py --out $OUT/r/prof_ring2_512 --batch 512 --kv-cache ring --steps 6 > $OUT/r/c1.log 2>&1; head -22 $OUT/r/prof_ring2_512/step_profile.md | tail -16
timeout 315 $B2 --kv-cache ring --fixed-batch 512 --max-batch 512 --streams 1280,1536 --summary-json $OUT/r/c_ring2_f512.json > $OUT/r/c2.log 2>&1; S $OUT/r/c_ring2_f512.json; grep "^K=" $OUT/r/c2.log
;;
esac
case "$1" in
D)
timeout 300 $B2 --kv-cache ring --fixed-batch 256 --max-batch 256 --processes 3 --streams 2048 --summary-json $OUT/r/d_ring_f256_p3.json > $OUT/r/d1.log 2>&1; S $OUT/r/d_ring_f256_p3.json; grep "^K=" $OUT/r/d1.log
timeout 280 $B2 --kv-cache ring --fixed-batch 256 --max-batch 256 --processes 4 --streams 2048 --summary-json $OUT/r/d_ring_f256_p4.json > $OUT/r/d2.log 2>&1; S $OUT/r/d_ring_f256_p4.json; grep "^K=" $OUT/r/d2.log
;;
esac
case "$1" in
E)
timeout 280 $B2 --kv-cache layer_input --fixed-batch 256 --max-batch 256 --processes 3 --streams 2048 --summary-json $OUT/r/e_li_f256_p3.json > $OUT/r/e1.log 2>&1; S $OUT/r/e_li_f256_p3.json; grep "^K=" $OUT/r/e1.log
timeout 280 $B2 --kv-cache ring --fixed-batch 256 --max-batch 256 --processes 3 --streams 2048 --summary-json $OUT/r/e_ring_f256_p3.json > $OUT/r/e2.log 2>&1; S $OUT/r/e_ring_f256_p3.json; grep "^K=" $OUT/r/e2.log
;;
esac
case "$1" in
F)
CA="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --drain-timeout 30 --mode cache-aware --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160 --clients-per-process 128"
timeout 420 $CA --kv-cache ring --fixed-batch 128 --max-batch 128 --batch-wait-ms 40 --server-workers 4 --duration 8 --end-spread 2 --streams 512,768 --summary-json $OUT/r/f_ca_w4_spread_ring.json > $OUT/r/f1.log 2>&1; python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    print(r['streams'], r['sustained'], 'p50/p95/p99', r['p50_latency_ms'], r['p95_latency_ms'], r['p99_latency_ms'], 'words', r['duplicated_words'], r['lost_words'], r['reference_words'], 'gpu', (r.get('gpu_utilization') or {}).get('mean'), 'err', r['n_errors'], 'lost_s', r['lost_audio_seconds'], 'final', r.get('final_latency'))
" $OUT/r/f_ca_w4_spread_ring.json; grep "^K=" $OUT/r/f1.log; tail -3 $OUT/r/f1.log
;;
esac
