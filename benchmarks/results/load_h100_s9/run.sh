#!/bin/bash
# Session-9 capacity runs (H100). $1 picks the group; OLD=1 runs the b020ccb tree (side-by-side baseline).
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
B="python3 -m trt_asr bench load --model random:parakeet-tdt-0.6b-v3 --device cuda --engine torch-cuda --state batched --duration 6 --drain-timeout 30 --mode cache-aware --in-process --max-streams 4096 --dtype fp16 --compile default --chunk-ms 160"
OLDPP="PYTHONPATH=.carry/s9/old:/tmp/site"
case "$1" in
P)
(cd .carry/s9/old && PYTHONPATH=/tmp/site timeout 250 $B --fixed-batch 256 --max-batch 256 --streams 1024,1280 --summary-json $OUT/r/p_old_f256.json > $OUT/r/p0.log 2>&1); S $OUT/r/p_old_f256.json
timeout 300 $B --fixed-batch 256 --max-batch 256 --streams 1024,1280 --summary-json $OUT/r/p_new_f256.json > $OUT/r/p1.log 2>&1; S $OUT/r/p_new_f256.json
;;
Q)
timeout 450 $B --fixed-batch 512 --max-batch 512 --streams 1280,1536,1792 --summary-json $OUT/r/q_new_f512.json > $OUT/r/q1.log 2>&1; S $OUT/r/q_new_f512.json
;;
R)
timeout 560 $B --fixed-batch 512 --max-batch 512 --processes 2 --streams 1792,2048 --summary-json $OUT/r/r_new_f512_p2.json > $OUT/r/r1.log 2>&1; S $OUT/r/r_new_f512_p2.json
;;
T)
timeout 560 $B --fixed-batch 256 --max-batch 256 --processes 3 --streams 1792,2048 --summary-json $OUT/r/t_new_f256_p3.json > $OUT/r/t1.log 2>&1; S $OUT/r/t_new_f256_p3.json
;;
U)
timeout 300 /tmp/site/bin/py-spy record -r 67 -f raw -o /tmp/pyspy_1280_512.txt --threads -- $B --fixed-batch 512 --max-batch 512 --streams 1280 --no-check --summary-json $OUT/r/u_pyspy.json > $OUT/r/u1.log 2>&1; S $OUT/r/u_pyspy.json
python3 .carry/s9/agg.py /tmp/pyspy_1280_512.txt > $OUT/r/pyspy_1280_512_summary.txt; head -c 6000 $OUT/r/pyspy_1280_512_summary.txt
;;
V)
timeout 270 $B --fixed-batch 256 --max-batch 256 --streams 1024,1280,1536 --summary-json $OUT/r/v_new2_f256.json > $OUT/r/v1.log 2>&1; S $OUT/r/v_new2_f256.json
timeout 300 $B --fixed-batch 512 --max-batch 512 --streams 1280,1536,1792 --summary-json $OUT/r/v_new2_f512.json > $OUT/r/v2.log 2>&1; S $OUT/r/v_new2_f512.json
;;
W)
timeout 320 $B --fixed-batch 384 --max-batch 384 --streams 1280,1536,1792 --summary-json $OUT/r/w_new2_f384.json > $OUT/r/w1.log 2>&1; S $OUT/r/w_new2_f384.json
timeout 250 $B --fixed-batch 512 --max-batch 512 --streams 1536,1792 --summary-json $OUT/r/w_new2_f512.json > $OUT/r/w2.log 2>&1; S $OUT/r/w_new2_f512.json
;;
esac
for f in $OUT/r/*.log; do echo "== $f"; grep -v Warning $f | tail -3; done
