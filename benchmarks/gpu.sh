#!/usr/bin/env bash
# Every GPU figure of issue 13 in one command, on random weights of the real architectures (no
# downloads), written as a markdown file to paste into benchmarks/RESULTS.md:
#
#     bash benchmarks/gpu.sh [OUT.md]          # default benchmarks/gpu_results.md
#
# Sections run most important first, each model in a fresh process (peak memory via
# torch.cuda.max_memory_allocated):
#   1. paper config (DINOv2-L + Rein + Mask2Former, 512 crops, batch 4), fp32 and bf16: iterations/s
#      and peak memory;  2. sliding-window evaluation of 1024x512 images (crop 512, stride 341);
#   3. the main levers;  4. 1024 crops (Cityscapes -> ACDC);  5. ViT-g and DINOv3-7B in bf16;
#   6. Rein's cost over the frozen backbone;  7. frozen and full fine-tuning for the ratios;
#   8. the other levers;  9. channels-last on a CNN;  10. every strategy in bf16;  11. torch.compile
#   (minutes of compilation).
#
# BUDGET (seconds, default 420; 0 = no limit) bounds the whole run: a section starts only while
# time is left, its commands are stopped (with every process they started) when it runs out, and
# what was measured so far is already in OUT.md. On the lent device machine, whose calls run at
# most 10 minutes and whose session has 15 minutes of device time in all (the machine's start
# included), one call fits, and leaves a short rerun (BUDGET=90) at most. Its image has PyTorch,
# Lightning, scipy and opencv, and a timm of unknown version, so the call brings the tested timm
# (`pip download --no-deps timm==1.0.31 -d .whl` here first; .whl/ is git-ignored):
#
#     run(command="python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site
#         bash benchmarks/gpu.sh $OUT/gpu.md", carry=[".whl"], timeout_s=480)
#
# reinseg is taken from src/. A longer
# lease: BUDGET=0 for every section. SMOKE=1 runs the same steps with a ViT-S on the CPU, one step
# each, to check the script itself (no budget unless BUDGET is set).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # a section stopped by the budget keeps the lines it printed
out=${1:-benchmarks/gpu_results.md}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMOKE:-0}" = 1 ]; then
    device=cpu; large=dinov2_vits14; giant=dinov2_vits14; huge=dinov2_vits14; steps=1; warmup=0; batch=1
    budget=${BUDGET:-0}
else
    device=cuda; large=dinov2_vitl14; giant=dinov2_vitg14; huge=dinov3_vit7b16; steps=20; warmup=3; batch=4
    budget=${BUDGET:-420}
fi
half=$((batch / 2 > 0 ? batch / 2 : 1))
start=$SECONDS

left() { echo $((budget - (SECONDS - start))); }

# section TITLE: print the title; false (and a note) when the budget is spent.
section() {
    echo
    echo "## $1"
    if [ "$budget" -gt 0 ] && [ "$(left)" -le 0 ]; then
        echo "(skipped: the ${budget} s budget is spent)"
        return 1
    fi
}

# bounded COMMAND...: run it, stopped with its whole process group when the budget runs out.
bounded() {
    local status remaining
    if [ "$budget" -gt 0 ]; then
        remaining=$(left)
        if [ "$remaining" -le 0 ]; then  # (timeout 0 would mean no limit)
            echo "(skipped: the ${budget} s budget is spent)"
            return 0
        fi
        timeout --kill-after=15 "$remaining" "$@"
    else
        "$@"
    fi
    status=$?
    if [ $status -eq 124 ]; then
        echo "(stopped: the ${budget} s budget ran out)"
    elif [ $status -ne 0 ]; then
        echo "(did not run: exit status $status)"
    fi
}

train() { bounded $py benchmarks/strategies.py train --device "$device" --steps "$steps" --warmup "$warmup" "$@"; }

{
    echo "# GPU benchmarks, $(date -u +%F)"
    echo
    if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
    $py -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__,
        '| fp32 products: matmul precision', torch.get_float32_matmul_precision(), '| cuDNN TF32', torch.backends.cudnn.allow_tf32,
        '| cuDNN algorithm search: on in strategies.py runs (train.cudnn_benchmark default)')"
    echo "budget: $([ "$budget" -gt 0 ] && echo "$budget s" || echo none)"
    # Fail in seconds, not per section, where the environment does not hold reinseg's needs (timm
    # outside pyproject.toml's range, say: carry a wheel, DEVELOPERS.md "Benchmarks").
    # reinseg imports timm only when it builds a model, so its version is checked apart.
    if ! $py benchmarks/check_env.py torch timm numpy scipy 2>&1 | tail -6; then
        echo "this environment is outside reinseg's requirements: stopped"
        exit 1
    fi
    if ! $py -c "import reinseg.build, reinseg.tuning, scipy.optimize, cv2, timm" 2>&1 | tail -3; then
        echo "reinseg does not import in this environment: stopped"
        exit 1
    fi

    section "Paper config: $large + Rein + Mask2Former, 512 crops, batch $batch, fp32 and bf16" &&
        train --backbone "$large" --batch "$batch" --precision 32 bf16 --strategies rein

    section "Sliding-window evaluation, 1024x512 images, crop 512, stride 341" &&
        bounded $py benchmarks/strategies.py slide --device "$device" --backbone "$large" --precision 32 bf16 \
            --height 512 --width 1024 --steps "$steps" --warmup "$warmup" --window-batch 1 3

    section "Evaluation as reinseg eval scores a 2048x1024 Cityscapes image (official protocol: 1024x512, crop 512, stride 341)" &&
        bounded $py benchmarks/eval_protocols.py --device "$device" --backbone "$large" --images "$steps" \
            --protocols official

    section "Main levers, paper config with Rein (benchmarks/levers.py says what each changes)" &&
        train --backbone "$large" --batch "$batch" --strategies rein --levers "bf16-mixed + frozen bf16" \
            activation_checkpointing=true frozen_dtype=bfloat16 "bf16-mixed + frozen bf16 + checkpointing"

    section "1024 crops (Cityscapes -> ACDC recipe), batch $half" &&
        train --backbone "$large" --img-size 1024 --batch "$half" --precision bf16 32 --strategies rein

    # benchmarks/memory_estimate.py puts both at batch 4 well inside 80 GiB (lower bounds): ViT-g in bf16 17 GiB,
    # the 7B with its frozen weights in bf16 37 GiB (RESULTS.md, sixteenth and twenty-second sessions).
    section "Larger VFMs, bf16: $giant and $huge (frozen weights in bf16), batch $batch" &&
        train --backbone "$giant" --batch "$batch" --precision bf16 --strategies rein &&
        train --backbone "$huge" --batch "$batch" --strategies rein --levers "bf16-mixed + frozen bf16"

    section "Rein's cost over the frozen backbone" &&
        bounded $py benchmarks/rein_overhead.py --device "$device" --batch "$batch" --backbones "$large" \
            --repeats "$steps" --warmup "$warmup"

    section "Frozen VFM (head only) and full fine-tuning, for the ratios" &&
        train --backbone "$large" --batch "$batch" --precision 32 bf16 --strategies frozen full

    section "Other levers, paper config with Rein" &&
        train --backbone "$large" --batch "$batch" --strategies rein --levers deformable_recompute=false \
            encoder_ffn_recompute=false pixel_decoder_checkpointing=true "both checkpointings" \
            "bf16-mixed + frozen bf16 + both checkpointings" channels_last=true "bf16-mixed + channels_last"

    section "The batch's classes read back from the GPU after the forward (as before 2026-12-07), paper config" &&
        train --backbone "$large" --batch "$batch" --precision 32 bf16 --strategies rein --segments device

    section "Channels-last on a CNN: ResNet-50 V1c + Rein + Mask2Former, batch $batch, bf16" &&
        train --backbone resnet50_v1c --batch "$batch" --strategies rein --levers precision=bf16-mixed \
            "bf16-mixed + channels_last"

    section "Every strategy, bf16 (issue 15's table)" &&
        train --backbone "$large" --batch "$batch" --precision bf16

    section "torch.compile, paper config with Rein (the first steps compile)" &&
        train --backbone "$large" --batch "$batch" --strategies rein --levers compile=true

    echo
    echo "finished in $((SECONDS - start)) s"
} 2>&1 | tee "$out"
