#!/usr/bin/env bash
# Compiles the extension, .cu files included, against the CUDA build of torch and checks that
# every effnlp op with a CPU kernel also has a CUDA kernel in the dispatcher. Needs nvcc, no GPU.
#
#   bash scripts/cuda_check.sh [VENV]      (VENV defaults to .venv-cuda; created if missing)
#
# The build goes to build/cuda-check/ (incremental on reruns); the CPU build in effnlp_ext/ is
# left alone. Environment overrides: CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS,
# EFFNLP_CUDA_BUILD_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${1:-.venv-cuda}"
PY="$VENV/bin/python"
TORCH_PIN="torch==2.14.1"  # CUDA 13.0 build: matches nvcc 13.0 (DESIGN.md §3)
BUILD_DIR="${EFFNLP_CUDA_BUILD_DIR:-$ROOT/build/cuda-check}"
T_START=$(date +%s)

step() { printf '\n== %s\n' "$*"; }
die() { printf 'cuda-check: FAIL: %s\n' "$*" >&2; exit 1; }

# --- 1. the CUDA torch venv -------------------------------------------------------------------
step "venv $VENV"
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  # torch's CUDA build and its nvidia-* runtime wheels take ~5.6 GB installed; say so up front
  # rather than fail halfway through pip with ENOSPC.
  NEED_GB=7
  FREE_GB=$(df -P -BG "$(dirname "$(readlink -m "$VENV")")" | awk 'NR == 2 { sub("G", "", $4); print $4 }')
  if [ -n "$FREE_GB" ] && [ "$FREE_GB" -lt "$NEED_GB" ]; then
    die "creating $VENV needs ~$NEED_GB GB free for $TORCH_PIN (CUDA build); $FREE_GB GB free here"
  fi
  echo "creating $VENV with $TORCH_PIN (~5.6 GB, ~2 min; $FREE_GB GB free)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-cache-dir --upgrade pip
  "$VENV/bin/pip" install -q --no-cache-dir setuptools wheel ninja numpy "$TORCH_PIN"
fi
read -r TORCH_VERSION TORCH_CUDA SITE < <("$PY" -c '
import sysconfig, torch
print(torch.__version__, torch.version.cuda, sysconfig.get_paths()["purelib"])')
echo "torch $TORCH_VERSION (CUDA $TORCH_CUDA) at $SITE"
[ "$TORCH_CUDA" != "None" ] || die "$VENV has a CPU-only torch; it needs the CUDA build ($TORCH_PIN)"
"$PY" -c 'import ninja' 2>/dev/null || "$VENV/bin/pip" install -q --no-cache-dir ninja

# --- 2. the real CUDA toolkit -----------------------------------------------------------------
# The nvcc on PATH may be a wrapper script (exec /usr/local/cuda-X/bin/nvcc "$@"); torch would
# then guess the wrong CUDA root, so follow links and wrappers to the real binary.
resolve_nvcc() {
  local p="$1" target
  for _ in 1 2 3 4 5; do
    p="$(readlink -f "$p")"
    if head -c 4 "$p" 2>/dev/null | grep -q 'ELF'; then echo "$p"; return 0; fi
    target="$(grep -Eo '(^|[[:space:]])/[^[:space:]"]*/nvcc([[:space:]"]|$)' "$p" 2>/dev/null \
              | head -n 1 | tr -d ' "\t')" || true
    [ -n "$target" ] && [ -x "$target" ] && [ "$target" != "$p" ] || return 1
    p="$target"
  done
  return 1
}
step "CUDA toolkit"
NVCC=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null; then
  NVCC="$(command -v nvcc)"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  NVCC=/usr/local/cuda/bin/nvcc
fi
[ -n "$NVCC" ] || die "no nvcc found (set CUDA_HOME)"
REAL_NVCC="$(resolve_nvcc "$NVCC")" || die "cannot resolve $NVCC to the nvcc binary (set CUDA_HOME)"
CUDA_HOME="$(dirname "$(dirname "$REAL_NVCC")")"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"

# cuBLAS/cuSPARSE headers ATen includes ship with the nvidia-* wheels, not necessarily the toolkit.
EXTRA_INC=""
for d in "$SITE"/nvidia/cu13/include "$SITE"/nvidia/*/include; do
  if [ -f "$d/cublas_v2.h" ]; then EXTRA_INC="$d"; break; fi
done
[ -n "$EXTRA_INC" ] || echo "warning: no cublas_v2.h under $SITE/nvidia; relying on CUDA_HOME"
echo "EFFNLP_CUDA_EXTRA_INCLUDE=$EXTRA_INC"

# --- 3. build ---------------------------------------------------------------------------------
step "build into $BUILD_DIR"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export EFFNLP_WITH_CUDA=1
export EFFNLP_CUDA_EXTRA_INCLUDE="$EXTRA_INC"
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
T_BUILD=$(date +%s)
mkdir -p "$BUILD_DIR"
LOG="$BUILD_DIR/build.log"
if ! "$PY" setup.py build_ext --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/temp" \
      >"$LOG" 2>&1; then
  tail -n 60 "$LOG"
  die "build failed (full log: $LOG)"
fi
T_BUILT=$(date +%s)
# What ninja ran this time, then each object's compile time (its latest compile, from .ninja_log).
grep -E '^\[[0-9]+/[0-9]+\]' "$LOG" \
  | sed -E "s#^(\[[0-9]+/[0-9]+\]) ([^ ]*/)?([^ /]+) .* -c (-c )?([^ ]+\.(cu|cpp)) .*#\1 \3 \5#; s#$ROOT/##" || true
grep -q '^\[' "$LOG" || echo "(objects up to date)"
awk -v root="$BUILD_DIR/temp/" '!/^#/ { n = $4; if (index(n, root) == 1) n = substr(n, length(root) + 1)
  t[n] = ($2 - $1) / 1000 } END { for (o in t) printf "  %-36s %5.1f s\n", o, t[o] }' \
  "$BUILD_DIR/temp/.ninja_log" | sort
SO="$(ls "$BUILD_DIR"/lib/effnlp_ext/_C*.so 2>/dev/null | head -n 1)"
[ -n "$SO" ] || die "no effnlp_ext/_C*.so under $BUILD_DIR/lib"
echo "built $SO in $((T_BUILT - T_BUILD)) s"

# --- 4. every op with a CPU kernel has a CUDA kernel ------------------------------------------
step "dispatcher (torch.ops.load_library, without importing effnlp_ext)"
"$PY" - "$SO" csrc/registration.cpp <<'EOF'
import re
import sys

import torch

so, registration = sys.argv[1], sys.argv[2]
torch.ops.load_library(so)

# Ops declared in the source (m.def("name(...)" or m.def("name.overload(...)"), possibly with
# the string on the next line) and ops the loaded library registered in the dispatcher.
declared = re.findall(r'm\.def\(\s*"\s*([A-Za-z_][\w.]*)\s*\(', open(registration).read())
declared = {f"effnlp::{name}" for name in declared}
registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("effnlp::")}
ops = sorted(declared | registered)
if not ops:
    sys.exit("cuda-check: FAIL: no effnlp ops found")


def has(op, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:  # declared in the source but not registered
        return False


# Host-only ops, CPU by design: hash_words tokenises raw text, which lives in host memory; its
# ids are moved to the device afterwards.
HOST_ONLY = {"effnlp::hash_words"}

rows, failed = [], []
for op in ops:
    cpu, cuda = has(op, "CPU"), has(op, "CUDA")
    if op not in registered:
        status = "FAIL (declared, not registered)"
    elif op in HOST_ONLY and cpu:
        status = "ok (host-only op)"
    elif cpu and not cuda:
        status = "FAIL (no CUDA kernel)"
    elif not cpu:
        status = "ok (no CPU kernel, not required)"
    else:
        status = "ok"
    if status.startswith("FAIL"):
        failed.append(op)
    rows.append((op, "yes" if cpu else "no", "yes" if cuda else "no", status))
w = max(len(r[0]) for r in rows + [("op",)])
print(f"{'op':<{w}}  CPU  CUDA  status")
for op, cpu, cuda, status in rows:
    print(f"{op:<{w}}  {cpu:<3}  {cuda:<4}  {status}")
print(f"torch {torch.__version__}, torch.cuda.is_available() = {torch.cuda.is_available()}")
if failed:
    sys.exit(f"cuda-check: FAIL: {len(failed)} op(s) failed the check: {', '.join(failed)}")
EOF

# --- 5. device code: each .cu compiled for every requested arch -------------------------------
step "device code per .cu (cuobjdump --list-elf)"
CUOBJDUMP=""
for c in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
         "$SITE/triton/backends/nvidia/bin/cuobjdump"; do
  if [ -n "$c" ] && [ -x "$c" ]; then CUOBJDUMP="$c"; break; fi
done
[ -n "$CUOBJDUMP" ] || die "cuobjdump not found (CUDA_HOME/bin, PATH, or triton's copy in $VENV)"
echo "using $CUOBJDUMP"
WANT_SM="$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';, ' '\n\n\n' | sed -E '/^$/d; s/\+PTX//; s/\.//; s/^/sm_/')"
MISSING=0
shopt -s nullglob
CU_FILES=(csrc/cuda/*.cu)
[ ${#CU_FILES[@]} -gt 0 ] || die "no csrc/cuda/*.cu"
for cu in "${CU_FILES[@]}"; do
  obj="$(find "$BUILD_DIR/temp" -path "*/${cu%.cu}.o" | head -n 1)"
  [ -n "$obj" ] || die "no object file for $cu under $BUILD_DIR/temp"
  elfs="$("$CUOBJDUMP" --list-elf "$obj" | grep -o 'sm_[0-9]*[a-z]*' | sort -u | tr '\n' ' ')"
  printf '%-32s %s\n' "$cu" "$elfs"
  for sm in $WANT_SM; do
    if ! grep -qw "$sm" <<<"$elfs"; then echo "  missing $sm"; MISSING=1; fi
  done
done
echo "-- $(basename "$SO"):"
"$CUOBJDUMP" --list-elf "$SO" | sed 's/^/  /'
[ "$MISSING" = 0 ] || die "some .cu lacks device code for one of: $(echo $WANT_SM)"

T_END=$(date +%s)
step "cuda-check: OK (build $((T_BUILT - T_BUILD)) s, total $((T_END - T_START)) s)"
