#!/usr/bin/env bash
# Install edgeqlora's device side on Raspberry Pi OS (64-bit, Bookworm or later) and, given a
# bundle, serve it at boot with systemd.
#
#   ./install.sh                          venv + llama-cpp-python + edgeqlora
#   ./install.sh smart-home-pi5.tar.gz    ... then verify and unpack the bundle and install
#                                         the edgeqlora systemd service serving it on :8080
#
# Environment:
#   EDGEQLORA_HOME   where the venv and bundles live (default ~/.local/share/edgeqlora)
#   EDGEQLORA_SPEC   what pip installs (default "edgeqlora[device-gguf,serve]"; for a wheel you
#                    copied over: "edgeqlora[device-gguf,serve] @ file:///home/pi/edgeqlora-0.1.0-py3-none-any.whl")
#   PORT             server port (default 8080)
set -euo pipefail

HOME_DIR="${EDGEQLORA_HOME:-$HOME/.local/share/edgeqlora}"
VENV="$HOME_DIR/venv"
SPEC="${EDGEQLORA_SPEC:-edgeqlora[device-gguf,serve]}"
PORT="${PORT:-8080}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUNDLE="${1:-}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

arch="$(uname -m)"
[[ "$arch" == "aarch64" ]] || die "this is a $arch system; llama.cpp's ARM fast paths and \
onnxruntime's wheels need the 64-bit Raspberry Pi OS (aarch64). Reflash with the 64-bit image."
[[ -z "$BUNDLE" || -f "$BUNDLE" ]] || die "bundle $BUNDLE does not exist"

# Which board: the CPU decides llama.cpp's instruction set (see devices/profiles/*.toml).
model="$(tr -d '\0' </proc/device-tree/model 2>/dev/null || echo unknown)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
say "board: $model, ${mem_mb} MiB RAM"

# llama-cpp-python compiles llama.cpp from source on aarch64 (PyPI has no ARM wheel). We build
# on the board itself, so GGML_NATIVE (-mcpu=native) picks the right ISA: dotprod + fp16 on the
# Pi 5's Cortex-A76, plain Armv8.0 NEON on the Pi 4 (A72) and Zero 2 W (A53). To build a wheel
# on a Pi 5 for a Pi 4 / Zero 2 W instead, use: -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a
# Only the library is needed: no tools, tests, examples or server binary.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF}"
export CMAKE_ARGS
# Each compiler process takes ~300-700 MB: one job at a time below 2 GB of RAM.
if (( mem_mb < 2048 )); then
    export CMAKE_BUILD_PARALLEL_LEVEL=1
    swap_mb=$(( $(awk '/SwapTotal/ {print $2}' /proc/meminfo) / 1024 ))
    if (( swap_mb < 1000 )); then
        say "only ${swap_mb} MiB swap: the compile may run out of memory. Raise it with"
        say "  sudo dphys-swapfile swapoff; sudo sed -i 's/^CONF_SWAPSIZE=.*/CONF_SWAPSIZE=1024/' /etc/dphys-swapfile; sudo dphys-swapfile setup; sudo dphys-swapfile swapon"
        say "or build the wheel on a Pi 4/5 (see above) and install it here."
    fi
    say "building llama.cpp with one job: expect about an hour on a Zero 2 W"
else
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
fi

say "system packages (sudo)"
sudo apt-get update
sudo apt-get install -y python3-venv python3-dev build-essential cmake git

say "virtual environment in $VENV"
mkdir -p "$HOME_DIR"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip wheel
say "llama-cpp-python with CMAKE_ARGS=$CMAKE_ARGS"
"$VENV/bin/pip" install --no-cache-dir 'llama-cpp-python>=0.3.16'
say "edgeqlora: $SPEC"
# gguf (numpy only): `edgeqlora devices fit` reads a GGUF's tensor table with it.
"$VENV/bin/pip" install "$SPEC" 'gguf>=0.17'
"$VENV/bin/python" -c "import llama_cpp, edgeqlora.runtimes; print('llama.cpp loads:', llama_cpp.__version__)"

if [[ -z "$BUNDLE" ]]; then
    say "done. Next: $VENV/bin/edgeqlora bundle unpack BUNDLE.tar.gz $HOME_DIR/bundles"
    exit 0
fi

say "verifying and unpacking $BUNDLE"
mkdir -p "$HOME_DIR/bundles"
name="$(basename "$BUNDLE")"; name="${name%.tar.gz}"; name="${name%.tgz}"
target="$HOME_DIR/bundles/$name"
if [[ -e "$target" ]]; then
    say "$target exists: verifying it instead of unpacking again"
    "$VENV/bin/edgeqlora" bundle verify "$target"
else
    "$VENV/bin/edgeqlora" bundle unpack "$BUNDLE" "$HOME_DIR/bundles"
fi
"$VENV/bin/edgeqlora" devices fit "$target/export" --device "$target/device.toml"

# The service listens on the network, where serve wants an API key: made once, kept private,
# kept across re-installs.
keyfile="$HOME_DIR/api-key.env"
if [[ ! -s "$keyfile" ]]; then
    (umask 077; printf 'EDGEQLORA_API_KEY=%s\n' "$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')" >"$keyfile")
fi
say "systemd service edgeqlora.service (sudo)"
sed -e "s|@USER@|$(id -un)|g" -e "s|@VENV@|$VENV|g" -e "s|@BUNDLE@|$target|g" \
    -e "s|@PORT@|$PORT|g" -e "s|@KEYFILE@|$keyfile|g" "$HERE/edgeqlora.service" \
    | sudo tee /etc/systemd/system/edgeqlora.service >/dev/null
sudo systemctl daemon-reload
sudo systemctl enable --now edgeqlora.service
ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
say "serving: web chat at http://${ip:-<this-pi>}:$PORT/ ; terminal chat: $HERE/chat.py --url http://127.0.0.1:$PORT"
say "API key (the web chat's key field, chat.py --api-key, Authorization: Bearer): $(cut -d= -f2 "$keyfile") (kept in $keyfile)"
say "logs: journalctl -u edgeqlora -f"
