#!/usr/bin/env bash
# The GPU runs one device session needs, by part, each within a device call's 10 minutes, results under $OUT:
#
#   bash scripts/device_session.sh stage       the carried wheels and model (.carry, see ../shared/GPU.md), then
#                                             the project installed; every other part runs it first
#   bash scripts/device_session.sh tests       the kernel and captured-decode tests on the GPU (bf16 included)
#   bash scripts/device_session.sh e2e [C]     ltri prefill and decode with profiles at contexts C (default 32k,128k;
#                                             issue 7); it needs no model, so any call may carry a model part
#   bash scripts/device_session.sh attention   one layer's attention at 16K-512K (alone and per layer in a graph of 8),
#                                             the kernel's launch-shape sweep at 3136 keys (issue 4)
#   bash scripts/device_session.sh step [C]    the fused decode step of one layer at contexts C (default 128k,512k) with
#                                             its stages, the top-k sweep and the selected-split sweep, no kernel sweep
#                                             (NOTES step 27)
#   bash scripts/device_session.sh bandwidth   the sparse attention kernel alone over 3136 to 256K keys against a copy
#                                             of the same bytes and a pass that only reads them: at which size it
#                                             nears the copy's rate, and how near reading alone comes (issue 4)
#   bash scripts/device_session.sh select [S]  ltri's 128K prefill and 32 decode steps with a 4096-token budget, each
#                                             KV head attending to all of it, then to 1024 of it chosen by SparQ,
#                                             then by Loki (NOTES steps 28-29: token selection in the captured step);
#                                             S: the selectors in that order (default "none sparq loki")
#   bash scripts/device_session.sh rowcache    the row cache's and the votes' GPU tests, then ltri's 128K prefill and 64
#                                             profiled decode steps with the row cache on, then off (NOTES steps 41,
#                                             43; step 45's cache of several steps was taken out again)
#   bash scripts/device_session.sh dense       the dense kernels', pack_rotate's, top-k's and the captured step's tests,
#                                             then ltri's 128K prefill and 64 decode steps with the decode step's norms,
#                                             MLP activation and joined projections as ltri's (LtriConfig.dense_kernels;
#                                             profiled), then with transformers' modules
#   bash scripts/device_session.sh selcache [S]  the row caches' kernels', pack_rotate's, Loki's, top-k's, the
#                                             index's and the captured step's GPU tests, then ltri's 128K prefill and 32
#                                             decode steps with selector S (default loki; "loki sparq" for both, in a
#                                             second call's time) keeping 1024 of a 4096-token budget, the row caches
#                                             (per KV head, and of the candidates) on (profiled), then off (NOTES 51)
#   bash scripts/device_session.sh firststep [C]  the first decode step after a prefill at context C (default 256k; 1.5-1.7 s
#                                             at 256K and 512K at a897aaf, NOTES step 53): ltri's prefill and 64 decode
#                                             steps in three processes, the second finding the first's Triton cache on
#                                             disk, the third with --host-prefault none
#   bash scripts/device_session.sh hostsel     one layer's token selection from host rows, 32 layers in a graph: SparQ
#                                             on gathered keys or in place, Loki on gathered keys or on the stored
#                                             projections (NOTES step 29; no model, under a minute)
#   bash scripts/device_session.sh register    cudaHostRegister of host-row pieces, fresh and prefaulted, and what it
#                                             costs a loop beside it; then ltri's 128K prefill (NOTES.md step 17)
#   bash scripts/device_session.sh prefault-ab [R] ltri's 128K prefill with host-row pieces registered as they come,
#                                             faulted in 2 MB a call, a piece a call, in turn, R rounds (2) (NOTES step 17)
#   bash scripts/device_session.sh threads-ab [R] ltri's 32K and 128K prefill with host-row pieces registered on 1, then
#                                             4 background threads, R rounds (1) (NOTES step 20, lever 2)
#   bash scripts/device_session.sh start       ltri's 32K and 128K prefill, each followed by a fresh Session's first 8K
#                                             tokens and 8K more under cProfile, every chunk timed (NOTES step 22)
#   bash scripts/device_session.sh needle L [M]  the needle grid at lengths L (e.g. 128k or 8k,16k), 10 depths,
#                                             methods M (default ltri; e.g. full,infllm,quest) (issue 6)
#
# Each part writes a log and its result files under $OUT with the short commit and "gpu" in the names; copy them
# into benchmarks/*/results/ with the card's name (the log's first line says which card ran it).
set -uo pipefail
part=${1:?which part: stage, tests, e2e, attention, step, bandwidth, select, rowcache, dense, selcache, firststep, hostsel, register, prefault-ab, threads-ab, start or needle LENGTH}
out=${OUT:?set OUT to the folder whose files come back}
sha=${GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export GIT_SHA=$sha PYTHONUNBUFFERED=1

stage() {
    bash .carry/s/stage.sh 2>&1 | tail -1
    # shellcheck disable=SC1091
    . /tmp/ltri-stage/env.sh 2>/dev/null || export PYTHONPATH=/tmp/ltri-stage/site
    python3 -c "import ltri.kernels" 2>/dev/null \
        || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
    nvidia-smi --query-gpu=name --format=csv,noheader
}

log="$out/${part}_${sha}_gpu.log"
{
    stage
    case "$part" in
        stage) ;;
        tests)
            timeout 540 python3 -m pytest -q -x tests/test_kernel_pack_rotate.py tests/test_kernel_sparq_scores.py \
                tests/test_kernel_sparse_attention.py tests/test_kernel_topk_select.py \
                tests/test_kernel_chunk_attention_map.py tests/test_captured_decode.py tests/test_topk.py \
                tests/test_kernel_disjoint_nms.py tests/test_spans.py tests/test_span_batch.py \
                tests/test_kernel_selected_attention.py tests/test_kernel_span_votes.py \
                tests/test_kernel_lowrank_scores.py tests/test_kernel_settled_votes.py tests/test_kernel_budget_rows.py \
                tests/test_kernel_cache_slots.py tests/test_index.py tests/test_read_floor.py \
                tests/test_kernel_rms_norm.py tests/test_kernel_silu_mul.py tests/test_decode_step.py -k "not bundled" ;;
        e2e)
            timeout 560 python3 benchmarks/speed/e2e.py --contexts "${2:-32k,128k}" --only-methods ltri \
                --store-root /tmp/ltri-e2e --profile --out "$out/e2e_${sha}_gpu_profile.json" ;;
        attention)
            timeout 560 python3 benchmarks/speed/attention.py --sweep-keys 3136 --sweep-splits auto,128,192,256,512 \
                --out "$out/attention_${sha}_gpu.json" ;;
        step)
            timeout 400 python3 benchmarks/speed/attention.py --contexts "${2:-128k,512k}" --sweep-keys '' --chunk 0 \
                --sweep-pack auto --out "$out/attention_${sha}_gpu.json" ;;
        bandwidth)
            timeout 300 python3 benchmarks/speed/attention.py --contexts 128k --methods sdpa_full,sparse_attention_kernel \
                --sweep-keys 3136,16k,64k,256k --sweep-splits auto,256,512 --sweep-tiles auto --chunk 0 \
                --sweep-pack auto --sweep-topk '' --sweep-select-splits '' --out "$out/bandwidth_${sha}_gpu.json" ;;
        select)
            for selector in ${2:-none sparq loki}; do
                timeout 120 python3 benchmarks/speed/e2e.py --contexts 128k --only-methods ltri --decode-tokens 32 \
                    --ltri-budget 4096 --ltri-select-tokens 1024 --ltri-selector "$selector" \
                    --store-root /tmp/ltri-e2e --out "$out/e2e_select_${selector}_${sha}_gpu.json"
            done ;;
        rowcache)
            timeout 200 python3 -m pytest -q -x tests/test_kernel_pack_rotate.py tests/test_kernel_cache_slots.py \
                tests/test_kernel_settled_votes.py tests/test_index.py tests/test_captured_decode.py -k "not bundled"
            for cache in on off; do
                flag=$([ "$cache" = off ] && echo --ltri-no-row-cache)
                timeout 150 python3 benchmarks/speed/e2e.py --contexts 128k --only-methods ltri --profile \
                    --store-root /tmp/ltri-e2e $flag --out "$out/e2e_rowcache_${cache}_${sha}_gpu_profile.json"
            done ;;
        dense)
            timeout 240 python3 -m pytest -q -x tests/test_kernel_rms_norm.py tests/test_kernel_silu_mul.py \
                tests/test_decode_step.py tests/test_kernel_pack_rotate.py tests/test_captured_decode.py \
                tests/test_kernel_topk_select.py tests/test_topk.py tests/test_index.py -k "not bundled"
            for kernels in on off; do  # the profile with the kernels only: at most 8 files come back
                flags=$([ "$kernels" = off ] && echo --ltri-no-dense-kernels || echo --profile)
                timeout 170 python3 benchmarks/speed/e2e.py --contexts 128k --only-methods ltri \
                    --store-root /tmp/ltri-e2e $flags --out "$out/e2e_dense_${kernels}_${sha}_gpu.json"
            done ;;
        selcache)
            timeout 270 python3 -m pytest -q -x tests/test_kernel_cache_slots.py tests/test_kernel_pack_rotate.py \
                tests/test_kernel_cached_gather.py tests/test_kernel_lowrank_scores.py \
                tests/test_kernel_topk_select.py tests/test_topk.py tests/test_index.py tests/test_captured_decode.py \
                -k "not bundled"
            for selector in ${2:-loki}; do
                for cache in on off; do  # the profile with the cache only: at most 8 files come back
                    flags=$([ "$cache" = off ] && echo --ltri-no-row-cache || echo --profile)
                    timeout 150 python3 benchmarks/speed/e2e.py --contexts 128k --only-methods ltri \
                        --decode-tokens 32 --ltri-budget 4096 --ltri-select-tokens 1024 --ltri-selector "$selector" \
                        --store-root /tmp/ltri-e2e $flags --out "$out/e2e_selcache_${selector}_${cache}_${sha}_gpu.json"
                done
            done ;;
        firststep)
            for run in first again no-prefault; do
                flags=$([ "$run" = no-prefault ] && echo --host-prefault none)
                timeout 180 python3 benchmarks/speed/e2e.py --contexts "${2:-256k}" --only-methods ltri \
                    --store-root /tmp/ltri-e2e $flags --out "$out/e2e_firststep_${run}_${sha}_gpu.json"
            done ;;
        hostsel)
            timeout 300 python3 benchmarks/speed/host_selection.py --out "$out/host_selection_${sha}_gpu.json" ;;
        register)
            timeout 200 python3 benchmarks/speed/host_register.py --out "$out/host_register_${sha}_gpu.json"
            timeout 340 python3 benchmarks/speed/e2e.py --contexts 128k --only-methods ltri --store-root /tmp/ltri-e2e \
                --out "$out/e2e_${sha}_gpu.json" ;;
        prefault-ab)
            for round in $(seq "${2:-2}"); do
                for variant in none steps piece; do
                    timeout 170 python3 benchmarks/speed/e2e.py --contexts 128k --only-methods ltri --decode-tokens 8 \
                        --store-root /tmp/ltri-e2e --host-prefault "$variant" \
                        --out "$out/e2e_prefault_${variant}_${round}_${sha}_gpu.json"
                done
            done ;;
        threads-ab)
            for round in $(seq "${2:-1}"); do
                for threads in 1 4; do
                    timeout 170 python3 benchmarks/speed/e2e.py --contexts 32k,128k --only-methods ltri \
                        --decode-tokens 8 --store-root /tmp/ltri-e2e --host-register-threads "$threads" \
                        --out "$out/e2e_register_threads_${threads}_${round}_${sha}_gpu.json"
                done
            done ;;
        start)
            timeout 300 python3 benchmarks/speed/e2e.py --contexts 32k,128k --only-methods ltri --decode-tokens 8 \
                --profile-start 8k --store-root /tmp/ltri-e2e --out "$out/e2e_start_${sha}_gpu.json" ;;
        needle)
            length=${2:?needle needs a length, e.g. 128k}
            methods=${3:-ltri}
            name="needle-${length//,/-}-${methods//,/-}"
            mkdir -p .carry/haystack
            timeout 560 python3 benchmarks/needle/needle.py --lengths "$length" --depths 10 --methods "$methods" \
                --device cuda --dtype bfloat16 --haystack .carry/haystack --out "/tmp/$name"
            tar czf "$out/${name}_${sha}_gpu.tgz" -C /tmp "$name" ;;
        *) echo "unknown part $part: stage, tests, e2e, attention, step, bandwidth, select, rowcache, dense, selcache, firststep, hostsel, register, prefault-ab, threads-ab, start or needle LENGTH"; exit 2 ;;
    esac
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
