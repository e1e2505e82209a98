# Shared helpers for the scripts: sourced, not run.
# Every installer here is idempotent: it checks before it installs.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS="$ROOT/.cache/tools"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export PATH="$HOME/.cargo/bin:$TOOLS/node_modules/.bin:$PATH"

BINARYEN_VERSION=132.0.0

# Seconds since the outermost script started (exported, so nested scripts count from the same start):
# every step's line carries it, so a CI log shows where the time goes.
SOLLOL_STARTED="${SOLLOL_STARTED:-$(date +%s)}"
export SOLLOL_STARTED
say() {
  local elapsed=$(($(date +%s) - SOLLOL_STARTED))
  printf '==> [%dm%02ds] %s\n' $((elapsed / 60)) $((elapsed % 60)) "$*" >&2
}

# The workspace's version (Cargo.toml), as release tarballs are named.
workspace_version() {
  awk -F '"' '/^version = / { print $2; exit }' "$ROOT/Cargo.toml"
}

# The exact wasm-bindgen version in Cargo.lock: the CLI must match the library.
wasm_bindgen_version() {
  awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$ROOT/Cargo.lock"
}

ensure_wasm_target() {
  if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    say "installing the rustup target wasm32-unknown-unknown"
    rustup target add wasm32-unknown-unknown
  fi
}

ensure_wasm_bindgen() {
  local want
  want="$(wasm_bindgen_version)"
  if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$want" ]; then
    say "installing wasm-bindgen-cli $want (matches Cargo.lock; takes a few minutes once)"
    cargo install -j "$CARGO_BUILD_JOBS" wasm-bindgen-cli --version "$want"
  fi
}

ensure_wasm_opt() {
  if [ ! -x "$TOOLS/node_modules/.bin/wasm-opt" ]; then
    say "installing binaryen $BINARYEN_VERSION (wasm-opt) from npm into .cache/tools"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --silent "binaryen@$BINARYEN_VERSION"
  fi
}

apt_install() {
  local missing=()
  local package
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# A rustup target for cross builds; for the GNU ARM targets also Debian's cross compiler and C library,
# and the environment cargo and the cc crate (SQLite) need to use them.
ensure_cross_target() {
  local target="$1" gcc="" arch=""
  case "$target" in
    aarch64-unknown-linux-gnu) gcc=aarch64-linux-gnu arch=arm64 ;;
    armv7-unknown-linux-gnueabihf) gcc=arm-linux-gnueabihf arch=armhf ;;
  esac
  if ! rustup target list --installed | grep -qx "$target"; then
    say "installing the rustup target $target"
    rustup target add "$target"
  fi
  if [ -n "$gcc" ]; then
    apt_install "gcc-$gcc" "libc6-dev-$arch-cross"
    local upper lower
    upper="$(printf '%s' "$target" | tr 'a-z-' 'A-Z_')"
    lower="$(printf '%s' "$target" | tr '-' '_')"
    export "CARGO_TARGET_${upper}_LINKER=$gcc-gcc" "CC_${lower}=$gcc-gcc" "AR_${lower}=$gcc-ar"
  fi
}

# Python packages the client-compatibility tests use, in .cache/venv.
PYTHON_TEST_PACKAGES=(ollama==0.6.3 openai==3.57.0 prometheus_client==0.21.1)

ensure_python_venv() {
  local venv="$ROOT/.cache/venv"
  if [ ! -x "$venv/bin/python" ]; then
    say "creating the test venv in .cache/venv"
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c 'import ollama, openai, prometheus_client' >/dev/null 2>&1; then
    say "installing ${PYTHON_TEST_PACKAGES[*]} into .cache/venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "${PYTHON_TEST_PACKAGES[@]}"
  fi
}

# nginx for side-by-side benchmarks, unpacked into .cache/tools/nginx (no service installed or started).
ensure_nginx() {
  local bin="$TOOLS/nginx/usr/sbin/nginx"
  if [ ! -x "$bin" ]; then
    say "unpacking Debian's nginx into .cache/tools/nginx (for the benchmark only)"
    local download
    download="$(mktemp -d)"
    (cd "$download" && apt-get download -qq nginx 2>/dev/null || { apt-get update -qq && apt-get download -qq nginx; })
    mkdir -p "$TOOLS/nginx"
    dpkg-deb -x "$download"/nginx_*.deb "$TOOLS/nginx"
    rm -rf "$download"
  fi
  echo "$bin"
}

PLAYWRIGHT_CORE_VERSION=1.65.1

# playwright-core (no bundled browser; it drives Debian's chromium) for the dashboard's browser test.
ensure_playwright_core() {
  if [ "$(node -p "require('$TOOLS/node_modules/playwright-core/package.json').version" 2>/dev/null)" != "$PLAYWRIGHT_CORE_VERSION" ]; then
    say "installing playwright-core $PLAYWRIGHT_CORE_VERSION from npm into .cache/tools"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --silent "playwright-core@$PLAYWRIGHT_CORE_VERSION"
  fi
}

CARGO_FUZZ_VERSION=0.12.0

# cargo-fuzz (libFuzzer; needs the nightly toolchain) for the GGUF reader's fuzz target.
ensure_cargo_fuzz() {
  if ! rustup toolchain list | grep -q '^nightly'; then
    say "installing the nightly toolchain (minimal) for cargo-fuzz"
    rustup toolchain install nightly --profile minimal
  fi
  if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
    say "installing cargo-fuzz $CARGO_FUZZ_VERSION (a minute, once)"
    cargo install -j "$CARGO_BUILD_JOBS" --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
  fi
}
