#!/usr/bin/env bash
# Every GPU figure of issue 13 in one command, on random weights of the real architectures (no
# downloads), written as a markdown file to paste into benchmarks/RESULTS.md:
#
#     bash benchmarks/gpu.sh [OUT.md]          # default benchmarks/gpu_results.md
#
# Paper config (DINOv2-L + Rein + Mask2Former, 512 crops, batch 4) in fp32 and bf16: train-step
# time (iterations/s = 1 / median step) and peak allocated memory per strategy; the 1024-crop
# recipe (Cityscapes -> ACDC); ViT-g and DINOv3-7B where they fit; sliding-window evaluation of
# 1024x512 images (crop 512, stride 341); Rein's own cost over the frozen backbone.
# SMOKE=1 runs the same steps with a ViT-S on the CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu_results.md}
py=${PYTHON:-python}
if [ "${SMOKE:-0}" = 1 ]; then
    device=cpu; large=dinov2_vits14; giant=dinov2_vits14; huge=dinov2_vits14; steps=1; warmup=0; batch=1
else
    device=cuda; large=dinov2_vitl14; giant=dinov2_vitg14; huge=dinov3_vit7b16; steps=20; warmup=3; batch=4
fi
train() { $py benchmarks/strategies.py train --device "$device" --steps "$steps" --warmup "$warmup" "$@" || echo "(did not run: exit status $?)"; }
{
    echo "# GPU benchmarks, $(date -u +%F)"
    echo
    if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
    $py -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__)"
    echo
    echo "## Paper config: $large + Rein + Mask2Former, 512 crops, batch $batch, fp32 and bf16"
    train --backbone "$large" --batch "$batch" --precision 32 bf16 --strategies rein frozen full
    echo
    echo "## Levers, paper config with Rein (train options; benchmarks/levers.py says what each changes)"
    train --backbone "$large" --batch "$batch" --strategies rein --levers none deformable_recompute=false encoder_ffn_recompute=false \
        activation_checkpointing=true pixel_decoder_checkpointing=true "both checkpointings" frozen_dtype=bfloat16 precision=bf16-mixed "bf16-mixed + frozen bf16" \
        "bf16-mixed + frozen bf16 + checkpointing" compile=true
    echo
    echo "## Every strategy, bf16 (issue 15's table)"
    train --backbone "$large" --batch "$batch" --precision bf16
    echo
    echo "## 1024 crops (Cityscapes -> ACDC recipe), batch $((batch / 2 > 0 ? batch / 2 : 1))"
    train --backbone "$large" --img-size 1024 --batch $((batch / 2 > 0 ? batch / 2 : 1)) --precision 32 bf16 --strategies rein
    echo
    echo "## Larger VFMs, bf16: $giant and $huge"
    train --backbone "$giant" --batch "$batch" --precision bf16 --strategies rein
    train --backbone "$huge" --batch 1 --precision bf16 --strategies rein
    echo
    echo "## Sliding-window evaluation, 1024x512 images, crop 512, stride 341"
    $py benchmarks/strategies.py slide --device "$device" --backbone "$large" --precision 32 bf16 \
        --height 512 --width 1024 --steps "$steps" --warmup "$warmup" || echo "(did not run: exit status $?)"
    echo
    echo "## Rein's cost over the frozen backbone"
    $py benchmarks/rein_overhead.py --device "$device" --batch "$batch" --backbones "$large" \
        --repeats "$steps" --warmup "$warmup" || echo "(did not run: exit status $?)"
} 2>&1 | tee "$out"
