#!/bin/bash
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/loadbench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
B="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --in-process --max-streams 4096"
mkdir -p $OUT/r
S() { python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    ps = r.get('processes') or [r]
    extra = [(p.get('streams'), p.get('p99_latency_ms'), (p.get('step_latency_ms') or {}).get('p50'), round(p['scheduler']['mean_batch']), round(p['scheduler']['busy_fraction'],2)) for p in ps if 'scheduler' in p]
    print(sys.argv[1].split('/')[-1], r['streams'], r['sustained'], 'p50/p95/p99', r['p50_latency_ms'], r['p95_latency_ms'], r['p99_latency_ms'], 'words', r['duplicated_words'], r['lost_words'], r['reference_words'], 'gpu', (r.get('gpu_utilization') or {}).get('mean'), 'err', r['n_errors'], 'lost_s', r['lost_audio_seconds'], extra)
" $1; }
case "$1" in
I)
BB="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --drain-timeout 30 --mode buffered --in-process --max-streams 4096"
timeout 200 /tmp/site/bin/py-spy record -r 100 -f raw -o $OUT/r/pyspy_buf.txt --threads -- $BB --dtype fp16 --fixed-batch 128 --max-batch 1024 --duration 12 --streams 512 --no-check --summary-json $OUT/r/i_buf_pyspy.json > $OUT/r/i1.log 2>&1; S $OUT/r/i_buf_pyspy.json
;;
H)
BB="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --drain-timeout 30 --mode buffered --in-process --max-streams 4096"
timeout 330 $BB --dtype fp16 --fixed-batch 128 --max-batch 1024 --duration 12 --streams 512,768,1024,1536 --summary-json $OUT/r/h_buf_fp16_f128.json > $OUT/r/h1.log 2>&1; S $OUT/r/h_buf_fp16_f128.json
timeout 150 $B --dtype fp16 --fixed-batch 128 --max-batch 2048 --chunk-ms 160 --streams 640 --summary-json $OUT/r/h_fp16_f128_160.json > $OUT/r/h2.log 2>&1; S $OUT/r/h_fp16_f128_160.json
;;
G)
timeout 200 $B --dtype fp16 --fixed-batch 256 --max-batch 4096 --chunk-ms 560 --streams 1536,2048,3072 --summary-json $OUT/r/g_fp16_f256_560.json > $OUT/r/g1.log 2>&1; S $OUT/r/g_fp16_f256_560.json
timeout 170 $B --dtype fp16 --fixed-batch 128 --max-batch 2048 --chunk-ms 160 --streams 512,768,1024 --summary-json $OUT/r/g_fp16_f128_160.json > $OUT/r/g2.log 2>&1; S $OUT/r/g_fp16_f128_160.json
SV="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --max-streams 1024"
timeout 180 $SV --dtype fp16 --fixed-batch 128 --max-batch 512 --chunk-ms 160 --streams 128,192 --summary-json $OUT/r/g_server_fp16_f128_160.json > $OUT/r/g3.log 2>&1; S $OUT/r/g_server_fp16_f128_160.json
;;
F)
timeout 240 $B --dtype fp16 --fixed-batch 1024 --max-batch 4096 --chunk-ms 560 --processes 2 --streams 2048,3072 --summary-json $OUT/r/f_fp16_f1024_560_p2.json > $OUT/r/f1.log 2>&1; S $OUT/r/f_fp16_f1024_560_p2.json
SV="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --max-streams 1024"
timeout 250 $SV --dtype fp16 --fixed-batch 256 --max-batch 512 --chunk-ms 160 --streams 128,192,256 --summary-json $OUT/r/f_server_fp16_f256_160.json > $OUT/r/f2.log 2>&1; S $OUT/r/f_server_fp16_f256_160.json
;;
E)
timeout 150 $B --dtype fp16 --fixed-batch 512 --max-batch 2048 --chunk-ms 160 --streams 512,768 --summary-json $OUT/r/e_fp16_f512_160.json > $OUT/r/e1.log 2>&1; S $OUT/r/e_fp16_f512_160.json
timeout 230 $B --dtype fp16 --fixed-batch 1024 --max-batch 4096 --chunk-ms 560 --streams 2048,3072,4096 --summary-json $OUT/r/e_fp16_f1024_560.json > $OUT/r/e2.log 2>&1; S $OUT/r/e_fp16_f1024_560.json
timeout 150 $B --dtype fp32 --kv-cache projected --max-batch 512 --chunk-ms 160 --streams 384,512 --summary-json $OUT/r/e_fp32_160.json > $OUT/r/e3.log 2>&1; S $OUT/r/e_fp32_160.json
;;
D)
timeout 200 $B --dtype fp16 --fixed-batch 256 --max-batch 2048 --chunk-ms 160 --streams 1024,1536,2048 --summary-json $OUT/r/d_fp16_f256_160.json > $OUT/r/d1.log 2>&1; S $OUT/r/d_fp16_f256_160.json
timeout 200 $B --dtype fp16 --fixed-batch 512 --max-batch 2048 --chunk-ms 160 --streams 1024,1536,2048 --summary-json $OUT/r/d_fp16_f512_160.json > $OUT/r/d2.log 2>&1; S $OUT/r/d_fp16_f512_160.json
timeout 180 $B --dtype fp16 --fixed-batch 512 --max-batch 2048 --chunk-ms 160 --processes 2 --streams 1536,2048 --summary-json $OUT/r/d_fp16_f512_160_p2.json > $OUT/r/d3.log 2>&1; S $OUT/r/d_fp16_f512_160_p2.json
;;
C)
timeout 280 $B --dtype fp16 --fixed-batch 512 --chunk-ms 160 --processes 2 --streams 1024,1536,2048 --summary-json $OUT/r/c_fp16_f512_160_p2.json > $OUT/r/c1.log 2>&1; S $OUT/r/c_fp16_f512_160_p2.json
timeout 250 $B --dtype fp16 --fixed-batch 1024 --chunk-ms 160 --processes 2 --streams 1536,2048 --summary-json $OUT/r/c_fp16_f1024_160_p2.json > $OUT/r/c2.log 2>&1; S $OUT/r/c_fp16_f1024_160_p2.json
;;
A)
timeout 220 $B --dtype fp16 --fixed-batch 1024 --chunk-ms 160 --streams 1024,1536,2048 --summary-json $OUT/r/a_fp16_f1024_160.json > $OUT/r/a1.log 2>&1; S $OUT/r/a_fp16_f1024_160.json
timeout 150 $B --dtype fp16 --fixed-batch 512 --chunk-ms 160 --streams 1024,1536 --summary-json $OUT/r/a_fp16_f512_160.json > $OUT/r/a2.log 2>&1; S $OUT/r/a_fp16_f512_160.json
timeout 150 /tmp/site/bin/py-spy record -r 200 -f raw -o $OUT/r/pyspy_a.txt --threads -- $B --dtype fp16 --fixed-batch 1024 --chunk-ms 160 --streams 1536 --no-check --summary-json $OUT/r/a_pyspy.json > $OUT/r/a3.log 2>&1; S $OUT/r/a_pyspy.json
;;
B)
timeout 240 $B --dtype fp16 --fixed-batch 1024 --chunk-ms 560 --streams 2048,3072,4096 --summary-json $OUT/r/b_fp16_f1024_560.json > $OUT/r/b1.log 2>&1; S $OUT/r/b_fp16_f1024_560.json
timeout 200 $B --dtype fp32 --kv-cache projected --max-batch 512 --chunk-ms 160 --streams 384,512 --summary-json $OUT/r/b_fp32_160.json > $OUT/r/b2.log 2>&1; S $OUT/r/b_fp32_160.json
;;
esac
for f in $OUT/r/*.log; do echo "== $f"; grep -v Warning $f | tail -4; done
