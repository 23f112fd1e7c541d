#!/usr/bin/env bash
# One virtual environment per engine that cannot share .venv:
#
#   scripts/engine-venv.sh NAME      -> .venvs/NAME/bin/python
#
#   ort-training    onnxruntime-training 1.19.2 (the last release; x86_64 only) and onnx 1.17
#                   (it rejects ONNX IR > 10). It installs the same `onnxruntime` module as
#                   the inference package, so it cannot live in .venv.
#   litert          ai-edge-litert (numpy 2), no onnxruntime.
#   tflite-runtime  tflite-runtime 2.14 (frozen), which runs only with numpy < 2.
#
# Each gets edgeprop itself with --no-deps (its device side needs numpy and one engine).
# Idempotent: stamp files record what was installed; a second run with the same package list
# and pyproject.toml does nothing (~0.2 s). Quiet unless something fails, then it prints the
# failing step's output and exits non-zero. PYTHON=... picks the interpreter (default python3).
set -euo pipefail

usage() { echo "usage: $0 ort-training|litert|tflite-runtime" >&2; exit 2; }
[ $# -eq 1 ] || usage
NAME=$1

case "$NAME" in
    ort-training)   PACKAGES=("onnxruntime-training==1.19.2" "onnx==1.17.*" "numpy>=1.24,<2.1"
                              "protobuf>=3.20,<6") ;;
    litert)         PACKAGES=("ai-edge-litert" "numpy") ;;
    tflite-runtime) PACKAGES=("tflite-runtime==2.14.*" "numpy<2") ;;
    *) echo "$0: unknown engine venv '$NAME'" >&2; usage ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venvs/$NAME"
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.edgeprop-installed"        # interpreter and package list: a new list rebuilds the venv
EDITABLE="$VENV/.edgeprop-pyproject"     # pyproject.toml's package map: a change reinstalls edgeprop only
WANT="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') ${PACKAGES[*]}"
PYPROJECT=$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
fail() {
    echo "$0: $1 failed for .venvs/$NAME; its output:" >&2
    cat "$LOG" >&2
    exit 1
}
# The machine-wide pip constraints (if any) are for .venv; an engine's own pins must win here.
PIP=(env PIP_CONSTRAINT= "$VENV/bin/python" -m pip --quiet --disable-pip-version-check)

if ! { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; }; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" >"$LOG" 2>&1 || fail "creating the virtual environment"
    "${PIP[@]}" install "${PACKAGES[@]}" >"$LOG" 2>&1 || fail "pip install ${PACKAGES[*]}"
    echo "$WANT" >"$STAMP"
fi
if [ ! -f "$EDITABLE" ] || [ "$(cat "$EDITABLE")" != "$PYPROJECT" ]; then
    "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT" >"$LOG" 2>&1 \
        || "${PIP[@]}" install --no-deps -e "$ROOT" >"$LOG" 2>&1 || fail "pip install --no-deps -e ."
    echo "$PYPROJECT" >"$EDITABLE"
fi
