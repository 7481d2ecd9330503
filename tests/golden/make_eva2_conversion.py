"""Write tests/data/eva2_conversion_tiny.pt: the official conversion of EVA02 weights to 512 px.

Run in the official environment (see tests/data/README.md):

    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/make_eva2_conversion.py /work/official

A tiny EVA02 in the original release layout (the official ``EVA2`` class, which follows the EVA02
code: patch 14, 224 px, i.e. a 16x16 position grid; width 32, four blocks, every weight perturbed) is
converted by the official script tools/convert_models/convert_eva2_512x512.py itself (run as a
program): patch kernel 14 -> 16 and position grid 16x16 -> 32x32, bicubic. Saved: ``release``
(the patch-14 weights) and ``converted`` (what the script wrote).
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from official_env import build_perturbed  # the official code, importable on CPU

OUT = Path(__file__).resolve().parents[1] / "data" / "eva2_conversion_tiny.pt"
OFFICIAL = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/official")

EVA2 = dict(
    type="EVA2",
    img_size=224,
    patch_size=14,
    embed_dim=32,
    depth=4,
    num_heads=2,
    mlp_ratio=4 * 2 / 3,
    qkv_bias=True,
    out_indices=[0, 1, 2, 3],
    subln=True,
    xattn=False,
    naiveswiglu=True,
    rope=True,
    pt_hw_seq_len=16,
    intp_freq=True,
    norm_layer=dict(type="LN", requires_grad=True, eps=1e-6),
)

if __name__ == "__main__":
    model = build_perturbed(EVA2)
    release = {k: v.detach().clone() for k, v in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "eva02_p14.pt", Path(tmp) / "eva02_p16_512.pt"
        torch.save({"model": release}, source)
        script = OFFICIAL / "tools" / "convert_models" / "convert_eva2_512x512.py"
        subprocess.run([sys.executable, str(script), str(source), str(target)], check=True, capture_output=True)
        converted = torch.load(target, weights_only=True)
    torch.save(dict(eva2_config=EVA2, release=release, converted=converted), OUT)
    print("wrote", OUT, converted["pos_embed"].shape, converted["patch_embed.proj.weight"].shape)
