#!/usr/bin/env bash
# The GPU checks, for the day a GPU is at hand (issue 14). Builds with the GPU feature and runs
#   1. the training-step bench (2D and 3D UNet steps) on the GPU beside flex, in one run;
#   2. PyTorch's identical steps on CUDA (benches/reference/unet_step.py --device cuda), when
#      torch is installed;
#   3. the brain quality test (and the 3D one) with the GPU as the training device;
# then prints one table. Usage: benches/gpu.sh [cuda|wgpu]   (default cuda; device cuda:0)
#
# The cuda build needs no network beyond crates.io (vendor/cubecl-cuda/PATCH.md); at run time it
# needs the NVIDIA driver and NVRTC (libnvrtc.so, from the CUDA toolkit or PyPI's
# nvidia-cuda-nvrtc with its lib/ on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
feature=${1:-cuda}
case "$feature" in
  cuda) device=cuda:0 ;;
  wgpu) device=wgpu ;;
  *) echo "usage: $0 [cuda|wgpu]" >&2; exit 2 ;;
esac
out=$(mktemp -d)

cargo bench -p medmesh-benches --bench training_step --features "$feature" -- --noplot \
  2>&1 | tee "$out/bench.log"
torch2d=- torch3d=-
if python3 -c 'import torch' 2>/dev/null; then
  torch2d=$(python3 benches/reference/unet_step.py --device cuda | grep -o '[0-9.]* ms')
  torch3d=$(python3 benches/reference/unet_step.py --device cuda --dims 3 | grep -o '[0-9.]* ms')
fi
MEDMESH_TEST_DEVICE=$device cargo test --release -p medmesh-training --features "$feature" \
  --test quality -- brain_site_alone a_3d_unet --nocapture 2>&1 | tee "$out/quality.log"

# The median of each criterion group's measurements ("time: [low median high]").
step() { grep -A1 "^$1/$2\$" "$out/bench.log" | grep -o 'time: *\[[^]]*\]' | awk '{print $4, $5}'; }
printf '\n| measurement | %s | flex | PyTorch %s |\n| --- | --- | --- | --- |\n' "$device" "$device"
printf '| UNet step, batch 8 of 128x128 | %s | %s | %s |\n' \
  "$(step unet_train_step_b8_128px_base16_depth4 "$device")" \
  "$(step unet_train_step_b8_128px_base16_depth4 flex)" "$torch2d"
printf '| 3D UNet step, batch 2 of 16x64x64 | %s | %s | %s |\n' \
  "$(step unet3d_train_step_b2_16x64x64_base16_depth4 "$device")" \
  "$(step unet3d_train_step_b2_16x64x64_base16_depth4 flex)" "$torch3d"
grep -E '^(brain|3D): ' "$out/quality.log" | sed 's/^/| quality on '"$device"': /; s/$/ | | |/'
