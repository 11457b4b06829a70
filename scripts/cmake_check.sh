#!/usr/bin/env bash
# Builds the op library with CMake (find_package(Torch)) into build-cmake/ and checks it: a fresh
# Python loads it with torch.ops.load_library, without importing effnlp_ext, and compares
# torch.ops.effnlp.kron_linear (and its backward op) with x @ W.T + b, W = sum_r kron(A_r, B_r).
#
#   bash scripts/cmake_check.sh [PY]       (PY defaults to .venv/bin/python)
#
# Environment overrides: CMAKE (the cmake binary), MAX_JOBS (default 2), EFFNLP_CMAKE_BUILD_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${1:-.venv/bin/python}"
case "$PY" in /*) ;; */*) PY="$ROOT/$PY" ;; esac
BUILD_DIR="${EFFNLP_CMAKE_BUILD_DIR:-$ROOT/build-cmake}"
JOBS="${MAX_JOBS:-2}"
T_START=$(date +%s)

step() { printf '\n== %s\n' "$*"; }
die() { printf 'cmake-check: FAIL: %s\n' "$*" >&2; exit 1; }

# A cmake installed next to PY (pip install cmake) wins over the system one.
CMAKE="${CMAKE:-}"
if [ -z "$CMAKE" ]; then
  if [ -x "$(dirname "$PY")/cmake" ]; then CMAKE="$(dirname "$PY")/cmake"; else CMAKE=cmake; fi
fi
command -v "$CMAKE" >/dev/null || die "cmake not found (pip install cmake, or set CMAKE)"
GENERATOR=()
if command -v ninja >/dev/null || [ -x "$(dirname "$PY")/ninja" ]; then
  GENERATOR=(-G Ninja)
  [ -x "$(dirname "$PY")/ninja" ] && GENERATOR+=(-DCMAKE_MAKE_PROGRAM="$(dirname "$PY")/ninja")
fi
TORCH_PREFIX="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"

step "configure ($("$CMAKE" --version | head -n 1), ${GENERATOR[1]:-Unix Makefiles})"
echo "CMAKE_PREFIX_PATH=$TORCH_PREFIX"
# A cache from another generator or source tree cannot be reused.
if [ -f "$BUILD_DIR/CMakeCache.txt" ] && \
   ! grep -q "^CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT$" "$BUILD_DIR/CMakeCache.txt"; then
  rm -rf "$BUILD_DIR"
fi
mkdir -p "$BUILD_DIR"
"$CMAKE" -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython_EXECUTABLE="$PY" \
  >"$BUILD_DIR/configure.log" 2>&1 || { cat "$BUILD_DIR/configure.log"; die "configure failed"; }
grep -E '^-- (Found Torch|Found Python|Build files)' "$BUILD_DIR/configure.log" || true

step "build (-j $JOBS)"
T_BUILD=$(date +%s)
"$CMAKE" --build "$BUILD_DIR" -j "$JOBS"
T_BUILT=$(date +%s)
LIB="$(find "$BUILD_DIR" -maxdepth 1 -name 'libeffnlp_ops*.so' | head -n 1)"
[ -n "$LIB" ] || die "no libeffnlp_ops*.so in $BUILD_DIR"
echo "built $LIB in $((T_BUILT - T_BUILD)) s"

step "load with torch.ops.load_library in a fresh process and compare with x @ W.T + b"
# Run from an empty directory so that effnlp_ext (the package) is not even importable.
(cd "$(mktemp -d)" && "$PY" - "$LIB" <<'EOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
torch.manual_seed(0)
# (R, m1, n1, m2, n2, leading dims, dtype)
cases = [(1, 4, 6, 8, 5, (3,), torch.float32), (3, 7, 5, 6, 9, (2, 4), torch.float32),
         (2, 16, 12, 2, 2, (5,), torch.float64), (1, 3, 2, 4, 3, (), torch.float64)]
for R, m1, n1, m2, n2, lead, dtype in cases:
    x = torch.randn(*lead, n1 * n2, dtype=dtype)
    A = torch.randn(R, m1, n1, dtype=dtype)
    B = torch.randn(R, m2, n2, dtype=dtype)
    b = torch.randn(m1 * m2, dtype=dtype)
    W = torch.einsum("rik,rjl->ijkl", A, B).reshape(m1 * m2, n1 * n2)  # sum_r kron(A_r, B_r)
    y = torch.ops.effnlp.kron_linear(x, A, B, b)
    torch.testing.assert_close(y, x @ W.T + b)
    gy = torch.randn_like(y)
    _, mid = torch.ops.effnlp._kron_linear_forward(x, A, B, b, True)
    gx, gA, gB, gb = torch.ops.effnlp._kron_linear_backward(gy, x, A, B, mid, [True] * 4)
    xr, Ar, Br, br = (t.clone().requires_grad_() for t in (x, A, B, b))
    Wr = torch.einsum("rik,rjl->ijkl", Ar, Br).reshape(m1 * m2, n1 * n2)
    (xr @ Wr.T + br).backward(gy)
    for got, ref in ((gx, xr.grad), (gA, Ar.grad), (gB, Br.grad), (gb, br.grad)):
        torch.testing.assert_close(got, ref)
    err = (y - (x @ W.T + b)).abs().max().item()
    print(f"  R={R} A[{m1}x{n1}] B[{m2}x{n2}] x{list(x.shape)} {str(dtype)[6:]}: "
          f"max |y - (x @ W.T + b)| = {err:.2e}, backward op = autograd of x @ W.T + b")
assert "effnlp_ext" not in sys.modules, "effnlp_ext was imported"
print(f"torch.ops.effnlp.kron_linear matches x @ W.T + b (torch {torch.__version__}, "
      f"effnlp_ext not imported)")
EOF
) || die "the CMake-built library does not match the reference"

T_END=$(date +%s)
step "cmake-check: OK (build $((T_BUILT - T_BUILD)) s, total $((T_END - T_START)) s)"
