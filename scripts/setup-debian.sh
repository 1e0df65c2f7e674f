#!/usr/bin/env bash
# Installs what the tests need beyond node_modules on Debian 12 (x86-64), so that `npm ci && npm test` passes on a
# fresh machine; `npm test` runs it first (scripts/run-tests.js). Idempotent: when everything is there it only
# checks (well under a second) and installs nothing.
#
#   redis-server   Debian package: the scale-out tests start their own on 127.0.0.1 (test/scale/redis-helper.ts)
#   chromium       Debian package: the playground test drives it headless through playwright-core
#   lavapipe       Mesa 25's CPU Vulkan driver, unpacked into .cache/mesa25 by scripts/setup-webgpu.sh (plus the
#                  Debian 12 libraries it links against): the WebGPU tests and conformance run on it
#
# Usage:  eval "$(scripts/setup-debian.sh)"   stdout: only the `export …` lines of the WebGPU environment;
#         what it checks and installs goes to stderr.
# As root it installs with apt-get; otherwise with `sudo -n` where that needs no password; otherwise it names
# what is missing, says what to run, and exits 1.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
log() { echo "setup-debian: $*" >&2; }

if [ ! -r /etc/debian_version ] || ! command -v apt-get >/dev/null || [ "$(uname -m)" != "x86_64" ]; then
  log "this script sets up Debian 12 on x86-64 (found $(uname -sm), $(cat /etc/debian_version 2>/dev/null || echo 'no Debian'))."
  log "Elsewhere install redis-server and Chromium yourself (KLEIN_CHROMIUM=/path/to/chromium), then run the tests"
  log "with KLEIN_TEST_SETUP=skip; the WebGPU tests are then skipped unless VK_ICD_FILENAMES names a Vulkan driver."
  exit 1
fi

# Debian packages, each found by the program the tests run.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x "${KLEIN_CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    as_root=(env DEBIAN_FRONTEND=noninteractive)
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n env DEBIAN_FRONTEND=noninteractive)
  else
    log "missing Debian packages: ${missing[*]}. Install them as root, then rerun:"
    log "  sudo apt-get update && sudo apt-get install -y ${missing[*]}"
    log "(or run the whole set-up as root: sudo scripts/setup-debian.sh)"
    exit 1
  fi
  log "installing Debian packages: ${missing[*]} (apt-get update, then apt-get install)"
  # Another apt/dpkg run (unattended-upgrades, a colleague) may hold the lock: wait for it instead of failing.
  apt_wait=(-o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
  "${as_root[@]}" apt-get "${apt_wait[@]}" -qq update >&2
  "${as_root[@]}" apt-get "${apt_wait[@]}" -qq install -y "${missing[@]}" >&2
  log "installed: ${missing[*]}"
fi

# Mesa 25 lavapipe (its own idempotent script; it installs its Debian 12 dependencies the same way).
"$repo/scripts/setup-webgpu.sh"
