#!/data/data/com.termux/files/usr/bin/bash
# Set up edgeqlora's model server in Termux on an Android phone (aarch64).
#
#   bash setup-termux.sh                      install
#   bash setup-termux.sh model-phone.tar.gz   ... then verify and unpack that bundle
#
# Install Termux from F-Droid or GitHub (the Play Store build is outdated).
# Environment: EDGEQLORA_SPEC as in devices/raspberry-pi/install.sh.
set -euo pipefail

SPEC="${EDGEQLORA_SPEC:-edgeqlora[device-gguf,serve]}"
HOME_DIR="$HOME/edgeqlora"
VENV="$HOME_DIR/venv"
BUNDLE="${1:-}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'setup-termux.sh: error: %s\n' "$*" >&2; exit 1; }

[[ -n "${PREFIX:-}" && -d "$PREFIX" ]] || die "run this inside Termux"
[[ "$(uname -m)" == "aarch64" ]] || die "this needs a 64-bit (aarch64) phone"
[[ -z "$BUNDLE" || -f "$BUNDLE" ]] || die "bundle $BUNDLE does not exist"

say "Termux packages"
pkg update -y
# numpy from Termux's repository: building it with pip on a phone takes very long.
pkg install -y python python-numpy clang cmake ninja git binutils

say "virtual environment in $VENV (sees Termux's numpy)"
mkdir -p "$HOME_DIR"
python -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install --upgrade pip wheel
# llama.cpp compiled on the phone for its own CPU (-mcpu=native: dotprod on Cortex-A55/A76 and
# later, i8mm on Armv8.6+ cores). OpenMP off: llama.cpp then uses its own thread pool and does
# not depend on Termux's libomp.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF}"
say "llama-cpp-python with CMAKE_ARGS=$CMAKE_ARGS (10-20 minutes)"
"$VENV/bin/pip" install --no-cache-dir 'llama-cpp-python>=0.3.16'
say "edgeqlora: $SPEC"
# gguf (numpy only): `edgeqlora devices fit` reads a GGUF's tensor table with it.
"$VENV/bin/pip" install "$SPEC" 'gguf>=0.17'
"$VENV/bin/python" -c "import llama_cpp, edgeqlora.runtimes; print('llama.cpp loads:', llama_cpp.__version__)"

if [[ -n "$BUNDLE" ]]; then
    say "verifying and unpacking $BUNDLE"
    mkdir -p "$HOME_DIR/bundles"
    "$VENV/bin/edgeqlora" bundle unpack "$BUNDLE" "$HOME_DIR/bundles"
fi
say "done. Start a bundle with: termux-wake-lock; PATH=$VENV/bin:\$PATH HOST=127.0.0.1 $HOME_DIR/bundles/<name>/run.sh"
say "then open http://127.0.0.1:8080/ in the phone's browser"
