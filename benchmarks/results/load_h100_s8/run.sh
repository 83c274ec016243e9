#!/bin/bash
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/loadbench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
mkdir -p $OUT/r
S() { python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    ps = r.get('processes') or [r]
    extra = [(p.get('streams'), p.get('p99_latency_ms'), (p.get('step_latency_ms') or {}).get('p50'), round(p['scheduler']['mean_batch']), round(p['scheduler']['busy_fraction'],2)) for p in ps if 'scheduler' in p]
    print(sys.argv[1].split('/')[-1], r['streams'], r['sustained'], 'p50/p95/p99', r['p50_latency_ms'], r['p95_latency_ms'], r['p99_latency_ms'], 'words', r['duplicated_words'], r['lost_words'], r['reference_words'], 'gpu', (r.get('gpu_utilization') or {}).get('mean'), 'err', r['n_errors'], 'lost_s', r['lost_audio_seconds'], extra)
" $1; }
BB="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --drain-timeout 30 --mode buffered --in-process --max-streams 4096"
B="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --in-process --max-streams 4096"
case "$1" in
E)
timeout 560 $BB --dtype fp16 --compile default --fixed-batch 128 --max-batch 2048 --duration 12 --streams 1024,1152,1280 --summary-json $OUT/r/e_buf_fp16_f128_compile.json > $OUT/r/e1.log 2>&1; S $OUT/r/e_buf_fp16_f128_compile.json
;;
F)
timeout 200 /tmp/site/bin/py-spy record -r 100 -f raw -o $OUT/r/pyspy_ca768.txt --threads -- $B --dtype fp16 --fixed-batch 128 --max-batch 2048 --chunk-ms 160 --streams 768 --no-check --summary-json $OUT/r/f_ca_pyspy.json > $OUT/r/f1.log 2>&1; S $OUT/r/f_ca_pyspy.json
timeout 350 $B --dtype fp16 --compile default --fixed-batch 128 --max-batch 2048 --chunk-ms 160 --streams 704,768 --summary-json $OUT/r/f_fp16_f128_160_compile.json > $OUT/r/f2.log 2>&1; S $OUT/r/f_fp16_f128_160_compile.json
;;
G)
for mb in 256 512; do
timeout 200 $BB --dtype fp16 --compile default --fixed-batch 128 --max-batch $mb --duration 12 --streams 1024,1152 --summary-json $OUT/r/g_buf_fp16_f128_mb${mb}_compile.json > $OUT/r/g_$mb.log 2>&1; S $OUT/r/g_buf_fp16_f128_mb${mb}_compile.json
done
timeout 150 $BB --dtype fp16 --compile default --fixed-batch 128 --max-batch 128 --duration 12 --streams 1152 --summary-json $OUT/r/g_buf_fp16_f128_mb128_compile.json > $OUT/r/g_128.log 2>&1; S $OUT/r/g_buf_fp16_f128_mb128_compile.json
;;
H)
timeout 330 $BB --dtype fp16 --compile default --fixed-batch 128 --max-batch 128 --duration 12 --streams 1280,1408 --summary-json $OUT/r/h_buf_fp16_f128_mb128_compile.json > $OUT/r/h_1.log 2>&1; S $OUT/r/h_buf_fp16_f128_mb128_compile.json
timeout 200 $BB --dtype fp16 --fixed-batch 128 --max-batch 128 --duration 12 --streams 1024 --summary-json $OUT/r/h_buf_fp16_f128_mb128.json > $OUT/r/h_2.log 2>&1; S $OUT/r/h_buf_fp16_f128_mb128.json
;;
I)
timeout 250 $B --dtype fp16 --compile default --fixed-batch 128 --max-batch 128 --chunk-ms 160 --streams 768,896 --summary-json $OUT/r/i_fp16_f128_mb128_160_compile.json > $OUT/r/i1.log 2>&1; S $OUT/r/i_fp16_f128_mb128_160_compile.json
timeout 250 $B --dtype fp16 --compile default --fixed-batch 256 --max-batch 256 --chunk-ms 160 --streams 768,1024 --summary-json $OUT/r/i_fp16_f256_mb256_160_compile.json > $OUT/r/i2.log 2>&1; S $OUT/r/i_fp16_f256_mb256_160_compile.json
;;
J)
timeout 400 $B --dtype fp16 --compile default --fixed-batch 128 --max-batch 128 --chunk-ms 160 --processes 2 --streams 1024,1280 --summary-json $OUT/r/j_fp16_f128_mb128_160_compile_p2.json > $OUT/r/j1.log 2>&1; S $OUT/r/j_fp16_f128_mb128_160_compile_p2.json
;;
K)
timeout 230 $B --dtype fp16 --compile default --fixed-batch 256 --max-batch 256 --chunk-ms 160 --streams 896,1024 --summary-json $OUT/r/k_fp16_f256_mb256_160_compile.json > $OUT/r/k1.log 2>&1; S $OUT/r/k_fp16_f256_mb256_160_compile.json
timeout 330 $B --dtype fp16 --compile default --fixed-batch 256 --max-batch 256 --chunk-ms 160 --processes 2 --streams 1280,1536 --summary-json $OUT/r/k_fp16_f256_mb256_160_compile_p2.json > $OUT/r/k2.log 2>&1; S $OUT/r/k_fp16_f256_mb256_160_compile_p2.json
;;
L)
timeout 380 $BB --dtype fp16 --compile default --fixed-batch 128 --max-batch 128 --duration 12 --streams 1408,1536 --summary-json $OUT/r/l_buf_fp16_f128_mb128_compile.json > $OUT/r/l1.log 2>&1; S $OUT/r/l_buf_fp16_f128_mb128_compile.json
;;
M)
timeout 420 $B --dtype fp16 --compile default --fixed-batch 512 --max-batch 512 --chunk-ms 160 --processes 2 --streams 1792,2048 --summary-json $OUT/r/m_fp16_f512_mb512_160_compile_p2.json > $OUT/r/m1.log 2>&1; S $OUT/r/m_fp16_f512_mb512_160_compile_p2.json
;;
N)
timeout 250 $BB --dtype fp16 --compile default --fixed-batch 128 --max-batch 128 --duration 12 --streams 1792 --summary-json $OUT/r/n_buf_fp16_f128_mb128_compile.json > $OUT/r/n1.log 2>&1; S $OUT/r/n_buf_fp16_f128_mb128_compile.json
timeout 300 $B --dtype fp16 --compile default --fixed-batch 256 --max-batch 256 --chunk-ms 160 --processes 2 --streams 1792 --summary-json $OUT/r/n_fp16_f256_mb256_160_compile_p2.json > $OUT/r/n2.log 2>&1; S $OUT/r/n_fp16_f256_mb256_160_compile_p2.json
;;
O)
timeout 560 python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --drain-timeout 30 --mode buffered --max-streams 4096 --dtype fp16 --compile default --fixed-batch 128 --max-batch 128 --duration 12 --clients-per-process 64 --streams 512,1024 --summary-json $OUT/r/o_server_buf_fp16_f128_mb128_compile.json > $OUT/r/o1.log 2>&1; S $OUT/r/o_server_buf_fp16_f128_mb128_compile.json
cp /tmp/trt_asr_bench_server_*.log $OUT/r/ 2>/dev/null
;;
esac
for f in $OUT/r/*.log; do echo "== $f"; grep -v Warning $f | tail -4; done
