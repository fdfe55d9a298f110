#!/usr/bin/env bash
# GPU smoke test and bench of the CUDA build of cliper, for the device tool's GPU machine (driver 580,
# CUDA 13.0, Python wheels of CUDA 13 in /opt/torch/.venv). Build the binary first, on any machine,
# with tools/cuda-binary.sh; then, from the repo root on the GPU machine:
#     bash tools/gpu-check.sh        (device tool: run(command="bash tools/gpu-check.sh",
#                                    carry=[".gpu"], timeout_s=480))
# Results go to $OUT (default /tmp/gpu-out): gpu.log (everything, written as it goes, so it comes
# back even when the run is cut off) and results.tar.gz (each step's stdout, stderr and PNG), since
# the device tool returns at most 8 files from $OUT.
# Steps: classify parity cpu / gpu f32 / gpu f16 (zero-shot and learned descriptors), explain
# (Grad-CAM on gpu and cpu, occlusion, fast), the headless pipeline on the demo source, image-encoder
# benches on the gpu (f32, f16, bf16) and on the cpu (f32), then a parity summary against the cpu.
# Knobs: CLIPER_XZ (compressed binary, default .gpu/cliper-cuda.xz), CLIPER_BIN (run this binary
# instead, e.g. for a local dry run), GPU_DEV (default cuda; cpu for a dry run), RUNS (gpu bench
# runs, 10), CPU_RUNS (3), STEP_TIMEOUT (s per step, 120), TIME_BUDGET (s for all steps, 360; later
# steps are skipped once it is spent), SKIP_BENCH=1, KEEP_RES=1 (keep $OUT/res next to the tarball).
# Local dry run:
#     CLIPER_BIN=target/release/cliper GPU_DEV=cpu RUNS=1 CPU_RUNS=1 SKIP_BENCH=1 KEEP_RES=1 \
#         OUT=/tmp/gpu-dry bash tools/gpu-check.sh
# Exit status: 0 when every step exited 0, else 1.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/gpu-out}"
RES="$OUT/res"
mkdir -p "$RES" || exit 1
LOG="$OUT/gpu.log"
: > "$LOG"
CLIPER_XZ="${CLIPER_XZ:-.gpu/cliper-cuda.xz}"
GPU_DEV="${GPU_DEV:-cuda}"
RUNS="${RUNS:-10}"
CPU_RUNS="${CPU_RUNS:-3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-120}"
TIME_BUDGET="${TIME_BUDGET:-360}"
SKIP_BENCH="${SKIP_BENCH:-0}"
KEEP_RES="${KEEP_RES:-0}"
DEADLINE=$(( $(date +%s) + TIME_BUDGET ))
FAILED=()
# clip_a_hf has a 1000-token vocabulary, so it cannot embed the zero-shot prompts
# ("token id 49406 is outside this model's vocabulary"): use the tiny full-vocabulary fixture.
W=tests/fixtures/clip_c_hf16
D=$W/descriptors.safetensors
IMG=tests/data/astronaut.png

log() { echo "$*" | tee -a "$LOG"; }

# --- CUDA user-space libraries from the Python wheels (nvidia/cu13/lib, ...) ---------------------
PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3
NV_LIBS=""
for root in $("$PY" -c 'import nvidia; print("\n".join(list(nvidia.__path__)))' 2>/dev/null); do
    for d in $(find "$root" -name 'lib*.so*' -not -path '*/stubs/*' -printf '%h\n' | sort -u); do
        NV_LIBS="${NV_LIBS:+$NV_LIBS:}$d"
    done
done
# a system toolkit as a fallback, then the driver's folder (libcuda.so.1 must be the driver's:
# from there or from the ld.so cache)
[ -d /usr/local/cuda/lib64 ] && NV_LIBS="${NV_LIBS:+$NV_LIBS:}/usr/local/cuda/lib64"
[ -d /usr/local/nvidia/lib64 ] && NV_LIBS="${NV_LIBS:+$NV_LIBS:}/usr/local/nvidia/lib64"
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "python: $PY"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# --- the binary -----------------------------------------------------------------------------------
if [ -n "${CLIPER_BIN:-}" ]; then
    BIN="$CLIPER_BIN"
else
    BIN="$(mktemp -d)/cliper"
    if ! xz -dc "$CLIPER_XZ" > "$BIN"; then log "unxz of $CLIPER_XZ failed"; exit 1; fi
    chmod +x "$BIN"
    [ -f "$CLIPER_XZ.info" ] && tee -a "$LOG" < "$CLIPER_XZ.info"
fi
log "binary: $BIN ($(stat -c %s "$BIN") bytes)"
log "=== ldd"
ldd "$BIN" 2>&1 | tee -a "$LOG"
if ldd "$BIN" 2>&1 | grep -q 'not found'; then log "WARNING: unresolved shared libraries (see above)"; fi
if ldd "$BIN" 2>&1 | grep -E '^\s*lib(av|sw)[a-z]*\.so' | grep -q 'not found'; then
    log "WARNING: FFmpeg's libraries are missing: cliper decodes and records video through the system FFmpeg."
    log "  Install them (Debian 12: libavformat59 libavcodec59 libavutil57 libswscale6), or copy the .so files"
    log "  that 'ldd' lists from the build machine and point LD_LIBRARY_PATH at them."
fi
if ldd "$BIN" 2>&1 | grep 'libcuda\.so' | grep -qi stub; then
    log "WARNING: libcuda.so.1 resolves to a stub, not to the driver"
fi

log "=== nvidia-smi"
{ nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>&1 || true; } | tee -a "$LOG"

# step NAME SAVE-FILE CMD...: runs CMD under a timeout (STEP_TIMEOUT, or less when TIME_BUDGET is
# nearly spent), stdout to $RES/SAVE-FILE, stderr to $RES/SAVE-FILE.stderr, both appended to the
# log with the exit status and wall time; a failure is recorded in FAILED, never fatal.
step() {
    local name=$1 save=$2
    shift 2
    log ""
    log "=== [$name] $*"
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 10 ]; then
        log "--- [$name] skipped: TIME_BUDGET=$TIME_BUDGET s spent"
        FAILED+=("$name (skipped)")
        return
    fi
    local limit=$(( left < STEP_TIMEOUT ? left : STEP_TIMEOUT ))
    local t0 rc=0
    t0=$(date +%s%N)
    timeout -k 5 "$limit" "$@" > "$RES/$save" 2> "$RES/$save.stderr" || rc=$?
    cat "$RES/$save.stderr" "$RES/$save" | tee -a "$LOG"
    [ "$rc" = 124 ] && log "--- [$name] TIMED OUT after $limit s"
    [ "$rc" = 0 ] || FAILED+=("$name (rc=$rc)")
    log "--- [$name] rc=$rc wall=$(( ($(date +%s%N) - t0) / 1000000 )) ms"
}

# (1) parity of classify on the test fixture: cpu vs gpu f32 vs gpu f16
step "classify cpu" classify_cpu.json \
    "$BIN" classify --weights "$W" --no-detect --json --device cpu "$IMG"
step "classify $GPU_DEV f32" "classify_${GPU_DEV}_f32.json" \
    "$BIN" classify --weights "$W" --no-detect --json --device "$GPU_DEV" --precision f32 "$IMG"
step "classify $GPU_DEV f16" "classify_${GPU_DEV}_f16.json" \
    "$BIN" classify --weights "$W" --no-detect --json --device "$GPU_DEV" --precision f16 "$IMG"
# ... and with the fixture's learned CLIPER descriptors
step "classify descriptors cpu" classify_desc_cpu.json \
    "$BIN" classify --weights "$W" --descriptors "$D" --no-detect --json --device cpu "$IMG"
step "classify descriptors $GPU_DEV f32" "classify_desc_${GPU_DEV}_f32.json" \
    "$BIN" classify --weights "$W" --descriptors "$D" --no-detect --json --device "$GPU_DEV" --precision f32 "$IMG"

# (2) Grad-CAM (needs backward on the device) on the GPU and on the CPU; occlusion and fast maps
step "explain gradcam $GPU_DEV" "gc_${GPU_DEV}.json" \
    "$BIN" explain --weights "$W" --no-detect --method gradcam --json --out "$RES/gc_${GPU_DEV}.png" --device "$GPU_DEV" "$IMG"
step "explain gradcam cpu" gc_cpu.json \
    "$BIN" explain --weights "$W" --no-detect --method gradcam --json --out "$RES/gc_cpu.png" --device cpu "$IMG"
step "explain occlusion $GPU_DEV" "occ_${GPU_DEV}.json" \
    "$BIN" explain --weights "$W" --no-detect --method occlusion --grid 7 --json --out "$RES/occ_${GPU_DEV}.png" --device "$GPU_DEV" "$IMG"
step "explain fast $GPU_DEV" "fast_${GPU_DEV}.json" \
    "$BIN" explain --weights "$W" --no-detect --method fast --json --out "$RES/fast_${GPU_DEV}.png" --device "$GPU_DEV" "$IMG"

# (3) headless live pipeline on the built-in demo source, 30 frames
step "run demo $GPU_DEV" "run_${GPU_DEV}.jsonl" \
    "$BIN" run --source demo --frames 30 --weights "$W" --device "$GPU_DEV" --json

# (4) image-encoder benches on the GPU, random ViT-B/16 weights; CPU f32 for the ratio
if [ "$SKIP_BENCH" != 1 ]; then
    for p in f32 f16 bf16; do
        step "bench $GPU_DEV $p" "bench_${GPU_DEV}_$p.json" \
            "$BIN" bench --random --device "$GPU_DEV" --precision "$p" --batch 1,8 --runs "$RUNS" --json
    done
    step "bench cpu f32" bench_cpu_f32.json \
        "$BIN" bench --random --device cpu --precision f32 --batch 1,8 --runs "$CPU_RUNS" --threads "$(nproc)" --json
fi

# summary: largest |difference| of class probabilities and of Grad-CAM cells against the CPU, and
# the benches' image-encoder medians
log ""
log "=== parity vs cpu; bench summary"
"$PY" - "$RES" "$GPU_DEV" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
res, dev = sys.argv[1], sys.argv[2]
def load(name):
    try:
        with open(os.path.join(res, name)) as f:
            text = f.read().strip()
        if not text:
            return "empty (see %s.stderr)" % name
        return json.loads(text.splitlines()[0])
    except Exception as e:
        return "unreadable (%s)" % e
def probs(j):
    return {c["name"]: c["prob"] for c in j["faces"][0]["classes"]}
def flat(m):
    return [x for row in m for x in (flat(row) if isinstance(row, list) else [row])]
pairs = [("classify_cpu.json", "classify_%s_f32.json" % dev, "probs"),
         ("classify_cpu.json", "classify_%s_f16.json" % dev, "probs"),
         ("classify_desc_cpu.json", "classify_desc_%s_f32.json" % dev, "probs"),
         ("gc_cpu.json", "gc_%s.json" % dev, "map")]
for a, b, kind in pairs:
    ja, jb = load(a), load(b)
    if isinstance(ja, str) or isinstance(jb, str):
        print("%s vs %s: %s" % (a, b, ja if isinstance(ja, str) else jb)); continue
    try:
        if kind == "probs":
            pa, pb = probs(ja), probs(jb)
            d = max(abs(pa[k] - pb[k]) for k in pa)
            top = (max(pa, key=pa.get), max(pb, key=pb.get))
            print("%s vs %s: max |dprob| = %.3g, top class %s / %s" % (a, b, d, *top))
        else:
            ma, mb = flat(ja["faces"][0]["map"]), flat(jb["faces"][0]["map"])
            if len(ma) != len(mb):
                print("%s vs %s: maps of %d and %d cells" % (a, b, len(ma), len(mb))); continue
            d = max(abs(x - y) for x, y in zip(ma, mb))
            print("%s vs %s: max |dmap| = %.3g over %d cells, logit %s / %s" % (a, b, d, len(ma), ja["faces"][0].get("logit"), jb["faces"][0].get("logit")))
    except Exception as e:
        print("%s vs %s: cannot compare (%r)" % (a, b, e))
# bench summary: image-encoder median ms per image by batch size
names = ["bench_%s_%s.json" % (dev, p) for p in ("f32", "f16", "bf16")] + ["bench_cpu_f32.json"]
for name in sorted(set(names), key=names.index):
    if not os.path.exists(os.path.join(res, name)):
        continue
    j = load(name)
    if isinstance(j, str):
        print("%s: %s" % (name, j)); continue
    enc = j.get("image_encode_ms_per_image", {})
    print("%s: %s %s, image encoder ms/image (median) %s" % (name, j.get("device"), j.get("precision"),
          ", ".join("batch %s: %s" % (b, v.get("median")) for b, v in enc.items())))
PY

log ""
if [ "${#FAILED[@]}" -gt 0 ]; then
    log "=== FAILED: $(printf '%s; ' "${FAILED[@]}")"
else
    log "=== every step exited 0"
fi
tar -czf "$OUT/results.tar.gz" -C "$OUT" res 2>&1 | tee -a "$LOG"
[ "$KEEP_RES" = 1 ] || rm -rf "$RES"
log "=== done; in $OUT: $(cd "$OUT" && echo *)"
[ "${#FAILED[@]}" -eq 0 ]
