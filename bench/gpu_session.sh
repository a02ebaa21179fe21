#!/usr/bin/env bash
# One device call = one experiment: environment, install, then the named steps, logs under $OUT.
#   bash bench/gpu_session.sh tests attention linear compare
# Steps: tests (the gpu-marked tests), tests-all (every kernel and Triton-encoder test, small shapes
# on the GPU too), tests-flash (the attention kernels' tests only), attention / linear / linear-bf16
# / gluon (kernel labs; ATTN_VARIANTS, ATTN_DTYPES narrow the attention lab), attention-ws (the
# FA3-schedule lab: each of WS_SPECS checked in its own process, 60 s cap in case it hangs, then the
# correct ones timed), attention-ws-ab (the encoder with its attention against the package's, A/B),
# gluon-anchored / attention-anchored (the anchored softmax against the online one), variant-ab
# (encoder A/B over attention variant sets: VAB_ARMS, VAB_ROUNDS, VAB_BATCHES override the
# defaults), compare (python -m bench.compare), profile (per-kernel time of the encoder),
# attention-context (attention on the encoder's own qkv, after a matmul, with the SM clock
# sampled: why it is slower in the encoder than in the labs), ncu (Nsight Compute on attention,
# on the lab (NCU_WS specs) and on the Gluon fc1 and qkv (NCU_MATMUL); NCU_ATTENTION overrides
# the attention specs), ncu-source (per-instruction stall samples of the Gluon matmul), matmul-ab
# (encoder with the Gluon matmul passing chunk statistics, with it and row_stats, without it),
# linear-ws (the matmul lab, bf16, without the memory-bound kernels), tests-ws (the Gluon
# matmul's and the Triton encoder's GPU tests), tree-ab / tree-ab-fc1 (the encoder / the fc1 lab of
# this tree against AB_BASE, an export of the base commit carried to the device; AB_NEW_ARMS: the
# new tree's attention variants; AB_BATCHES), bench (pytest-benchmark suites).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/brainjepa-out}
mkdir -p "$OUT"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/env.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case "$step" in
    tests) python3 -m pytest -q -m gpu -rA tests 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|rel err|peak|FAIL" ;;
    tests-all) python3 -m pytest -q -rA tests/kernels tests/test_triton_encoder.py 2>&1 | tee "$OUT/gpu_tests_all.log" | grep -E "passed|failed|FAIL|encoder triton|peak" ;;
    attention) python3 -m bench.attention_lab ${ATTN_VARIANTS:+--variants $ATTN_VARIANTS} ${ATTN_DTYPES:+--dtypes $ATTN_DTYPES} --out "$OUT/attention_lab.json" 2>&1 | tee "$OUT/attention_lab.log" | tail -40 ;;
    linear) python3 -m bench.linear_lab --out "$OUT/linear_lab.json" 2>&1 | tee "$OUT/linear_lab.log" | tail -40 ;;
    linear-bf16) python3 -m bench.linear_lab --dtypes bf16 --out "$OUT/linear_lab.json" 2>&1 | tee "$OUT/linear_lab.log" | tail -30 ;;
    tests-ws) python3 -m pytest -q -m gpu -rA tests/kernels/test_matmul_hopper.py tests/test_triton_encoder.py 2>&1 | tee "$OUT/gpu_tests_ws.log" | grep -E "passed|failed|FAIL|vs given|chunk M2|encoder triton|peak" ;;
    tests-flash) python3 -m pytest -q -rA tests/kernels/test_flash_attention.py tests/kernels/test_flash_attention_hopper.py 2>&1 | tee "$OUT/gpu_tests_flash.log" | grep -E "passed|failed|FAIL" ;;
    gluon) python3 -m bench.gluon_attention_lab 2>&1 | tee "$OUT/gluon_attention_lab.log" ;;
    attention-ws)
      good=()
      for spec in ${WS_SPECS:-128s3ap 128s3a 128s3p 128s2ap 64s4ap 64s4apc3 128s2apc3}; do
        timeout 60 python3 -m bench.attention_ws_lab --check-only --configs "$spec" 2>&1 | tee -a "$OUT/attention_ws_lab.log" | grep -Ev ": err .* ok$"
        [ "${PIPESTATUS[0]}" = 0 ] && good+=("$spec") || echo "$spec failed or hung"
      done
      echo "correct: ${good[*]:-none}"
      [ ${#good[@]} -gt 0 ] && timeout 240 python3 -m bench.attention_ws_lab --configs "${good[@]}" 2>&1 | grep -v ": err " | tee -a "$OUT/attention_ws_lab.log" ;;
    attention-ws-ab) timeout 400 python3 -m bench.variant_ab --arms pingpong,pingpong_anchored,tma_anchored,overlap,overlap_anchored lab:128s3ap lab:64s4apc3 --batch-sizes 8 1 --rounds 2 --reps 20 --out "$OUT/variant_ab_attention_ws.json" 2>&1 | tee "$OUT/variant_ab_attention_ws.log" | tail -8 ;;
    gluon-anchored) python3 -m bench.gluon_attention_lab --configs 64x128x3u2 64x128x3u2a 64x64x3u2a 64x64x4a 64x128x3a 2>&1 | tee "$OUT/gluon_attention_lab_anchored.log" ;;
    attention-anchored) python3 -m bench.attention_lab --variants pingpong,pingpong_anchored,tma,tma_anchored --dtypes bf16 --out "$OUT/attention_lab_anchored.json" 2>&1 | tee "$OUT/attention_lab_anchored.log" | tail -30 ;;
    matmul-ab) python3 -m bench.variant_ab --arms pingpong,pingpong_anchored,tma_anchored,overlap,overlap_anchored --matmul-arms ws ws-rowstats triton --batch-sizes 8 1 --rounds 2 --reps 20 --out "$OUT/variant_ab_ws.json" 2>&1 | tee "$OUT/variant_ab_ws.log" | tail -6 ;;
    linear-ws) python3 -m bench.linear_lab --dtypes bf16 --no-memory-bound --out "$OUT/linear_lab_ws.json" 2>&1 | tee "$OUT/linear_lab_ws.log" | tail -12 ;;
    variant-ab) python3 -m bench.variant_ab ${VAB_ARMS:+--arms $VAB_ARMS} ${VAB_ROUNDS:+--rounds $VAB_ROUNDS} ${VAB_BATCHES:+--batch-sizes $VAB_BATCHES} \
                  --out "$OUT/variant_ab.json" 2>&1 | tee "$OUT/variant_ab.log" | grep -E "round|median" ;;
    compare) python3 -m bench.compare --out "$OUT/compare" 2>&1 | tee "$OUT/compare.log" | tail -60 ;;
    attention-context) python3 -m bench.attention_context --out "$OUT/attention_context.json" 2>&1 | tee "$OUT/attention_context.log" | grep -v Warning ;;
    profile) python3 -m bench.profile_encoder --out "$OUT/profile_encoder.json" 2>&1 | tee "$OUT/profile_encoder.log" | tail -40 ;;
    ncu)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      NCU_ARGS=(--clock-control none -s 1 -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis
                --section WarpStateStats --section Occupancy --section LaunchStats
                --metrics "regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active")
      for spec in ${NCU_ATTENTION:-pingpong_anchored:64x64w4s3r168 tma_anchored:128x64w8s3}; do
        f="$OUT/ncu_attention_${spec//[:]/_}.txt"
        timeout 300 "$NCU" "${NCU_ARGS[@]}" -k regex:_attn_fwd python3 -m bench.ncu_target attention "$spec" > "$f" 2>&1
        echo "--- $spec"; grep -E "Duration|Throughput|Issue Slots|pipe_(tensor|xu|fma|alu|fmaheavy|fp16)|Stall|Achieved Occ|Registers" "$f" | head -40
      done
      for spec in ${NCU_WS:-}; do
        f="$OUT/ncu_attention_ws_$spec.txt"
        timeout 300 "$NCU" "${NCU_ARGS[@]}" -k regex:_attn_fwd_ws python3 -m bench.ncu_target attention-ws "$spec" > "$f" 2>&1
        echo "--- lab $spec"; grep -E "SM Frequency|Duration|Issue Slots|pipe_(tensor|xu|fma|alu)_cycles|Stall|Registers" "$f" | head -30
      done
      for op in ${NCU_MATMUL:-fc1 qkv}; do
        f="$OUT/ncu_${op}_ws.txt"
        timeout 300 "$NCU" "${NCU_ARGS[@]}" -k regex:_matmul_ws python3 -m bench.ncu_target "$op" ws128x128x64s4 > "$f" 2>&1
        echo "--- $op (Gluon)"; grep -E "SM Frequency|Duration|Issue Slots|pipe_(tensor|xu|fma|alu)_cycles|Stall|Registers" "$f" | head -30
      done ;;
    ncu-source)  # per-instruction stall samples (SASS) as CSV for bench/ncu_source.py: NCU_SOURCE lists
      # targets OP:SPEC (bench.ncu_target's op and spec), default the Gluon fc1 and qkv
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      for target in ${NCU_SOURCE:-fc1:ws128x128x64s4 qkv:ws128x128x64s4}; do
        op=${target%%:*}; spec=${target#*:}; name=$(echo "$target" | tr -c 'A-Za-z0-9_\n-' _)
        case "$op" in attention) kernel=_attn_fwd ;; attention-ws) kernel=_attn_fwd_ws ;; *) kernel=_matmul_ws ;; esac
        timeout 300 "$NCU" --clock-control none -s 1 -c 1 -k "regex:$kernel" --section WarpStateStats \
          --section SourceCounters -o "$OUT/ncu_src_$name" python3 -m bench.ncu_target "$op" "$spec" > "$OUT/ncu_src_$name.log" 2>&1
        "$NCU" -i "$OUT/ncu_src_$name.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_src_$name.csv" 2>&1
        rm -f "$OUT/ncu_src_$name.ncu-rep"
        echo "--- $target"; python3 -m bench.ncu_source "$OUT/ncu_src_$name.csv" --top 12
      done ;;
    tree-ab | tree-ab-fc1)  # this tree against AB_BASE (a carried export of the base commit), alternating:
      # tree-ab the encoder with the default attention pool, tree-ab-fc1 the fc1 matmul lab
      for rnd in ${AB_ROUNDS:-1 2}; do
        for label in base new; do
          tree=$PWD; [ $label = base ] && tree=$PWD/${AB_BASE:?export of the base commit}
          (cd "$tree" && python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || exit 1
           if [ "$step" = tree-ab ]; then
             arms=pingpong,pingpong_anchored,tma_anchored,overlap,overlap_anchored
             [ $label = new ] && arms=${AB_NEW_ARMS:-$arms}  # e.g. with a variant the base lacks
             python3 -m bench.variant_ab --arms $arms \
               --batch-sizes ${AB_BATCHES:-8 1} --rounds 1 --reps 30 --out "$OUT/tree_ab_${label}_$rnd.json" 2>&1 | grep -E "median|picked" | sed -E "s/\[.*\]//"
           else
             python3 -m bench.linear_lab --dtypes bf16 --ops fc1 --no-memory-bound --out "$OUT/tree_ab_fc1_${label}_$rnd.json" 2>&1 | grep -E "cfg ws|chunk stats ws|cfg 128x256x64 s3 w8 sub |F.linear \(pre|F.linear\+F.gelu "
           fi | sed "s/^/$label round $rnd: /")
        done
      done
      python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 ;;
    bench) python3 -m pytest -q bench --benchmark-json="$OUT/pytest_bench.json" 2>&1 | tail -40 ;;
    *) echo "unknown step $step" ;;
  esac
done
