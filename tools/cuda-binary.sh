#!/usr/bin/env bash
# Builds a CUDA-linked, stripped, xz-compressed `cliper` on a machine WITHOUT a GPU, a driver or a
# CUDA toolkit, to carry to a GPU machine (driver 580 / CUDA 13.0, sm_90: the H100/H200 machines).
# Background and measurements: shared/cuda-build.md. The GPU-side checks: tools/gpu-check.sh.
#
#     tools/cuda-binary.sh [OUT.xz]          (default .gpu/cliper-cuda.xz, relative to the repo root)
#
# What it does:
#  - pip-installs the pinned CUDA 13.0 wheels into target/cuda-link/wheels (about 1 GB, once):
#    cuBLAS, cuRAND, NVRTC and the runtime to link against, plus nvcc (the same set as .ci/cuda-check)
#    unless target/cuda-wheels already holds that nvcc; then makes the unversioned libX.so links;
#  - generates a link-time stand-in for the driver's libcuda.so in target/cuda-link/stub: every `cu*`
#    function that the cudarc version pinned in Cargo.lock declares, each returning 34
#    (CUDA_ERROR_STUB_LIBRARY). It only satisfies the linker here: the binary records libcuda.so.1 as
#    NEEDED, with no rpath, and the GPU machine's driver provides the real one.
#    NEVER put target/cuda-link/stub (or a libcuda.so.1 made from it) on a GPU machine's library
#    path: it would shadow the driver and every CUDA call would fail with error 34.
#  - cargo build --release --features cuda --bin cliper (nvcc 13.0 compiles Candle's kernels to PTX
#    for CUDA_COMPUTE_CAP), then strips a copy and writes `xz -9 -T0` of it to OUT.xz, plus OUT.xz.info
#    (commit, checksum, compute capability). A full build takes about 20 min on 2 cores.
#
# Knobs (environment): CUDA_COMPUTE_CAP (default 90), CARGO_TARGET_DIR (default
# target/cuda-link/target), CUDA_LINK_DIR (default target/cuda-link: holds wheels/ and stub/; the
# paths end up in RUSTFLAGS, so a target dir only stays fresh with the same CUDA_LINK_DIR),
# CUDAFORGE_THREADS (default nproc).
#
# Using it with the device tool (the `run` verb, which sends the working tree): .gpu/ must be
# git-ignored (it is, in .gitignore) and named in `carry` (the binary is ~15 MB of the 64 MiB limit):
#     tools/cuda-binary.sh                              # here, once per commit to test
#     run(command="bash tools/gpu-check.sh", carry=[".gpu"], timeout_s=480)
# gpu-check.sh unpacks .gpu/cliper-cuda.xz, finds the CUDA 13 libraries of the machine's Python
# wheels, runs the checks (about 6 min at most: TIME_BUDGET) and leaves gpu.log and results.tar.gz
# in $OUT. The whole session has 15 min of device time, the machine's start included.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$ROOT/.gpu/cliper-cuda.xz}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$ROOT"

link_dir="${CUDA_LINK_DIR:-$ROOT/target/cuda-link}"
case "$link_dir" in /*) ;; *) link_dir="$ROOT/$link_dir" ;; esac
wheels="$link_dir/wheels"
stub="$link_dir/stub"
cu13="$wheels/nvidia/cu13"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda-link/target}"

say() { echo "cuda-binary: $*" >&2; }

# --- 1. CUDA 13.0 wheels ------------------------------------------------------------------------
nvcc_pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
           nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
link_pkgs=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
           nvidia-cuda-runtime==13.0.96)
if [ -x "$cu13/bin/nvcc" ]; then
    nvcc_bin="$cu13/bin"
    pkgs=("${nvcc_pkgs[@]}" "${link_pkgs[@]}")
elif [ -x "$ROOT/target/cuda-wheels/nvidia/cu13/bin/nvcc" ]; then  # .ci/cuda-check's
    nvcc_bin="$ROOT/target/cuda-wheels/nvidia/cu13/bin"
    pkgs=("${link_pkgs[@]}")
else
    nvcc_bin="$cu13/bin"
    pkgs=("${nvcc_pkgs[@]}" "${link_pkgs[@]}")
fi
missing=0
[ -x "$nvcc_bin/nvcc" ] || missing=1
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    [ -e "$cu13/lib/$lib" ] || missing=1
done
if [ "$missing" = 1 ]; then
    # One pip call into a fresh folder: `pip --target` does not merge a second install into the
    # nvidia/ namespace folder of an earlier one.
    say "installing ${pkgs[*]} into $wheels"
    rm -rf "$wheels.tmp"
    python3 -m pip install --quiet --disable-pip-version-check --target "$wheels.tmp" "${pkgs[@]}"
    rm -rf "$wheels"
    mv "$wheels.tmp" "$wheels"
fi
# the linker looks for libX.so; the wheels ship only libX.so.N
while IFS= read -r f; do
    base="${f##*/}"
    plain="${base%%.so.*}.so"
    [ -e "${f%/*}/$plain" ] || ln -s "$base" "${f%/*}/$plain"
done < <(find "$wheels/nvidia" -name 'lib*.so.*' \( -type f -o -type l \))

export PATH="$nvcc_bin:$PATH"
nvcc_version="$(nvcc --version | grep -o 'release [0-9.]*' || true)"
say "nvcc: $nvcc_bin ($nvcc_version)"
if [ "$nvcc_version" != "release 13.0" ]; then
    say "need nvcc 13.0 (newer PTX is refused by a CUDA 13.0 driver)"
    exit 1
fi

# --- 2. the stand-in libcuda.so -----------------------------------------------------------------
cudarc_version="$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)"
[ -n "$cudarc_version" ] || { say "no cudarc in Cargo.lock"; exit 1; }
find_cudarc() {
    local d
    for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version"; do
        [ -f "$d/src/driver/sys/mod.rs" ] && { echo "$d/src/driver/sys/mod.rs"; return 0; }
    done
    return 1
}
sys_rs="$(find_cudarc)" || { cargo fetch --locked >/dev/null; sys_rs="$(find_cudarc)"; } \
    || { say "cudarc-$cudarc_version sources not found"; exit 1; }
mkdir -p "$stub"
# The driver functions are the `fn cu...(` declarations inside the bindings' extern "C" blocks
# (indented; the top-level `pub unsafe fn` wrappers and `culib()` are not symbols of libcuda).
grep -oE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$sys_rs" | sed -E 's/^[[:space:]]+fn //; s/\($//' \
    | sort -u > "$stub/cu_syms.txt.new"
n_syms=$(wc -l < "$stub/cu_syms.txt.new")
[ "$n_syms" -gt 100 ] || { say "only $n_syms cu* symbols found in $sys_rs"; exit 1; }
{
    echo "/* link-time stand-in for libcuda.so.1 (cudarc $cudarc_version, $n_syms functions):"
    echo "   every call returns CUDA_ERROR_STUB_LIBRARY (34). Never load it on a GPU machine. */"
    sed 's/.*/int &(void) { return 34; }/' "$stub/cu_syms.txt.new"
} > "$stub/cuda_stub.c.new"
if cmp -s "$stub/cuda_stub.c.new" "$stub/cuda_stub.c" && [ -f "$stub/libcuda.so" ]; then
    rm -f "$stub/cuda_stub.c.new" "$stub/cu_syms.txt.new"
else
    mv "$stub/cu_syms.txt.new" "$stub/cu_syms.txt"
    mv "$stub/cuda_stub.c.new" "$stub/cuda_stub.c"
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/cuda_stub.c"
fi
say "stub: $stub/libcuda.so ($n_syms cu* functions of cudarc $cudarc_version)"

# --- 3. build -----------------------------------------------------------------------------------
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
# -L only: no rpath, so the GPU machine's loader finds its own driver and libraries.
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$stub -L native=$cu13/lib"
say "CARGO_TARGET_DIR=$CARGO_TARGET_DIR CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP RUSTFLAGS=$RUSTFLAGS"
cargo build --locked --release --features cuda --bin cliper

# --- 4. strip, compress, report -----------------------------------------------------------------
bin="$CARGO_TARGET_DIR/release/cliper"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp "$bin" "$tmp/cliper"
strip "$tmp/cliper"
# smoke test here, with the stand-in as libcuda.so.1 (this machine only)
ln -s "$stub/libcuda.so" "$tmp/libcuda.so.1"
if ! LD_LIBRARY_PATH="$tmp:$cu13/lib" "$tmp/cliper" --help > /dev/null; then
    say "the stripped binary does not run (--help) here"
    exit 1
fi
mkdir -p "$(dirname "$out")"
xz -9 -T0 -c "$tmp/cliper" > "$out.tmp"
mv "$out.tmp" "$out"
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, nvcc $nvcc_version, cudarc $cudarc_version"
    echo "sha256 of the stripped binary: $(sha256sum < "$tmp/cliper" | cut -d' ' -f1)"
} > "$out.info"

echo "binary:   $bin ($(stat -c %s "$bin") bytes; stripped $(stat -c %s "$tmp/cliper"))"
echo "written:  $out ($(stat -c %s "$out") bytes) and $out.info"
readelf -d "$tmp/cliper" | grep NEEDED
if readelf -d "$tmp/cliper" | grep -qE 'RPATH|RUNPATH'; then
    say "WARNING: the binary carries an rpath"
fi
