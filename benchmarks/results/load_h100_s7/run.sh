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
A)
PYTHONPATH=/tmp/site:. timeout 150 python3 .carry/s7/gpucheck.py > $OUT/r/a0.log 2>&1; grep -v Warn $OUT/r/a0.log | tail -4
timeout 300 $BB --dtype fp16 --fixed-batch 128 --max-batch 1024 --duration 12 --streams 512,768,1024 --summary-json $OUT/r/a_buf_fp16_f128.json > $OUT/r/a1.log 2>&1; S $OUT/r/a_buf_fp16_f128.json
timeout 150 /tmp/site/bin/py-spy record -r 100 -f raw -o $OUT/r/pyspy_buf.txt --threads -- $BB --dtype fp16 --fixed-batch 128 --max-batch 1024 --duration 12 --streams 1024 --no-check --summary-json $OUT/r/a_buf_pyspy.json > $OUT/r/a2.log 2>&1; S $OUT/r/a_buf_pyspy.json
;;
C)
PYTHONPATH=/tmp/site:. timeout 150 python3 .carry/s7/gpucheck.py > $OUT/r/c0.log 2>&1; grep -v Warn $OUT/r/c0.log | tail -4
timeout 280 $BB --dtype fp16 --fixed-batch 128 --max-batch 2048 --duration 12 --streams 768,1024,1280 --summary-json $OUT/r/c_buf_fp16_f128.json > $OUT/r/c1.log 2>&1; S $OUT/r/c_buf_fp16_f128.json
timeout 130 /tmp/site/bin/py-spy record -r 100 -f raw -o $OUT/r/pyspy_buf_c.txt --threads -- $BB --dtype fp16 --fixed-batch 128 --max-batch 2048 --duration 12 --streams 1024 --no-check --summary-json $OUT/r/c_buf_pyspy.json > $OUT/r/c2.log 2>&1; S $OUT/r/c_buf_pyspy.json
;;
D)
timeout 250 $BB --dtype fp16 --fixed-batch 128 --max-batch 2048 --duration 12 --streams 896,960 --summary-json $OUT/r/d_buf_fp16_f128.json > $OUT/r/d1.log 2>&1; S $OUT/r/d_buf_fp16_f128.json
timeout 150 $BB --dtype fp16 --fixed-batch 256 --max-batch 2048 --duration 12 --streams 1024 --summary-json $OUT/r/d_buf_fp16_f256.json > $OUT/r/d2.log 2>&1; S $OUT/r/d_buf_fp16_f256.json
timeout 150 $B --dtype fp16 --fixed-batch 128 --max-batch 2048 --chunk-ms 160 --streams 704,768 --summary-json $OUT/r/d_fp16_f128_160.json > $OUT/r/d3.log 2>&1; S $OUT/r/d_fp16_f128_160.json
;;
B)
timeout 250 $BB --dtype fp16 --fixed-batch 128 --max-batch 2048 --duration 12 --streams 1024,1280,1536 --summary-json $OUT/r/b_buf_fp16_f128.json > $OUT/r/b1.log 2>&1; S $OUT/r/b_buf_fp16_f128.json
timeout 150 $B --dtype fp16 --fixed-batch 128 --max-batch 2048 --chunk-ms 160 --streams 640,768 --summary-json $OUT/r/b_fp16_f128_160.json > $OUT/r/b2.log 2>&1; S $OUT/r/b_fp16_f128_160.json
;;
esac
for f in $OUT/r/*.log; do echo "== $f"; grep -v Warning $f | tail -3; done
