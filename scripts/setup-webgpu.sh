#!/usr/bin/env bash
# Makes ONNX Runtime's bundled WebGPU provider usable on a CPU-only Debian 12 machine (dev box, CI).
#
# Why: Dawn (the WebGPU implementation inside onnxruntime-node) rejects Debian 12's own lavapipe (Mesa 22.3:
# no shaderUniform*ArrayDynamicIndexing), but Mesa 25's lavapipe from bookworm-backports works. We do not
# install Mesa 25 system-wide (that would change every GL/Vulkan program on the machine); we unpack its .debs
# into a cache folder and point the Vulkan loader at it with VK_ICD_FILENAMES.
#
# Usage:  eval "$(scripts/setup-webgpu.sh)"      # or: scripts/setup-webgpu.sh >/dev/null; . .cache/mesa25/env.sh
# stdout: only the `export …` lines; progress goes to stderr. Idempotent: a second run downloads nothing.
# Env:    KLEIN_MESA_DIR  cache folder (default <repo>/.cache/mesa25)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${KLEIN_MESA_DIR:-$repo/.cache/mesa25}"
arch_dir="/usr/lib/x86_64-linux-gnu"
log() { echo "setup-webgpu: $*" >&2; }

if [ "$(uname -m)" != "x86_64" ] || [ ! -r /etc/debian_version ]; then
  log "this recipe is for Debian 12 on x86-64 (found $(uname -m), $(cat /etc/debian_version 2>/dev/null || echo 'no Debian'))"
  exit 1
fi

# Root for apt-get install; sudo when we are not root and it exists.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; exit 1
  fi
}
# Another apt/dpkg run (a colleague, unattended-upgrades) holds the lock: wait for it instead of failing.
apt_wait=(-o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)

# 1. The Mesa 25 .debs, fetched through a private apt configuration: the backports source never enters the
#    system's sources.list.d, so nothing has to be removed afterwards and a concurrent `apt-get update` by
#    someone else never sees it.
if [ ! -f "$dest/.complete" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
  # apt drops privileges to _apt for downloads; a mktemp folder (0700) would make it warn and fall back.
  chmod -R 755 "$work"
  if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$work/debs"; fi
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" >"$work/sources.list"
  priv=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/none"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache")
  log "fetching the bookworm-backports package list (private apt config)"
  apt-get "${priv[@]}" -qq update >&2
  log "downloading mesa-vulkan-drivers, libdrm2, libdrm-amdgpu1 from bookworm-backports"
  (cd "$work/debs" && apt-get "${priv[@]}" -qq download \
    mesa-vulkan-drivers/bookworm-backports libdrm2/bookworm-backports libdrm-amdgpu1/bookworm-backports >&2)
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  for d in "$work"/debs/*.deb; do dpkg-deb -x "$d" "$dest.tmp/root"; done
  dpkg-deb -f "$work"/debs/mesa-vulkan-drivers_*.deb Depends >"$dest.tmp/depends"
  dpkg-deb -f "$work"/debs/mesa-vulkan-drivers_*.deb Version >"$dest.tmp/version"
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  touch "$dest/.complete"
  rm -rf "$work"
  trap - EXIT
fi
lib="$dest/root$arch_dir"
[ -f "$lib/libvulkan_lvp.so" ] || { log "$lib/libvulkan_lvp.so missing; delete $dest and rerun"; exit 1; }

# 2. What lavapipe links against (libllvm15, xcb…) plus the Vulkan loader, from Debian 12 itself. The list is
#    the .deb's own Depends minus libdrm (the unpacked backports copies are newer and found first).
needed=(libvulkan1)
for p in $(sed 's/([^)]*)//g; s/|[^,]*//g; s/,/ /g' "$dest/depends"); do
  case "$p" in libdrm* | libvulkan1) ;; *) needed+=("$p") ;; esac
done
# One dpkg-query for the whole list (one call per package took seconds on every test run).
installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${needed[@]}" 2>/dev/null | awk '/install ok installed$/ { sub(/:.*/, "", $1); print $1 }' || true)"
missing=()
for p in "${needed[@]}"; do
  grep -qxF "$p" <<<"$installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing from Debian 12: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get "${apt_wait[@]}" -qq update >&2
  as_root apt-get "${apt_wait[@]}" -qq install -y --no-install-recommends "${missing[@]}" >&2
fi

# 3. An ICD manifest naming the unpacked driver by absolute path (the packaged one says just
#    "libvulkan_lvp.so", which the loader would resolve to the system's old Mesa if that is installed).
icd="$dest/lvp_icd.json"
cat >"$icd.tmp" <<EOF
{
    "file_format_version": "1.0.0",
    "ICD": { "library_path": "$lib/libvulkan_lvp.so", "api_version": "1.4.305" }
}
EOF
mv "$icd.tmp" "$icd"

# LD_LIBRARY_PATH: the newer libdrm the driver needs (>= 2.4.121; Debian 12 has 2.4.114).
cat >"$dest/env.sh.tmp" <<EOF
export VK_ICD_FILENAMES=$icd
export LD_LIBRARY_PATH=$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
mv "$dest/env.sh.tmp" "$dest/env.sh"
log "lavapipe $(cat "$dest/version") ready in $dest (env: $dest/env.sh)"
cat "$dest/env.sh"
