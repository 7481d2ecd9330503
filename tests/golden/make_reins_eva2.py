"""Write tests/data/reins_eva2_tiny.pt: the official ReinsEVA2 (EVA02 + Rein after every block).

Run in the official environment (see tests/data/README.md):

    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/make_reins_eva2.py /work/official

A tiny configuration of the official EVA02-L setting (configs/_base_/models/rein_eva02-L_mask2former.py:
rotary embeddings with intp_freq, sub-LN SwiGLU, separate q/k/v projections with q and v biases, no
layer scale, LayerNorm eps 1e-6): img_size 64, patch 16, width 64, depth 4, 4 heads,
``pt_hw_seq_len`` 2 (so the rotary frequencies are interpolated from a 2x2 to the 4x4 grid, as
16 -> 32 at 512 px). ``xattn=False``: xformers' memory-efficient attention needs CUDA; the explicit
softmax attention computes the same function. Every parameter is perturbed with ``randn * 0.1``
after construction (seed 0), so no weight is trivial.

Saved: ``backbone_config`` (the ``backbone=dict(...)``), ``backbone_state_dict`` (EVA02 weights in
the official layout: what tools/convert_models/convert_eva2_512x512.py writes, without the rotary
buffers), ``reins_state_dict`` (``reins.*``), ``image`` (2, 3, 64, 64), ``features`` (the four maps:
the out_indices blocks' patch tokens resized x4, x2, x1, x0.5), ``queries``, ``plain_features`` (the
same without Rein), ``train_features`` / ``train_queries`` after the official ``train()`` and
``train_mode_modules``.
"""

import copy
from pathlib import Path

import torch
from official_env import build_perturbed  # the official code, importable on CPU

OUT = Path(__file__).resolve().parents[1] / "data" / "reins_eva2_tiny.pt"

BACKBONE = dict(
    type="ReinsEVA2",
    reins_config=dict(
        type="LoRAReins",
        token_length=8,
        embed_dims=64,
        num_layers=4,
        patch_size=16,
        link_token_to_query=True,
        lora_dim=4,
        query_dims=32,
    ),
    img_size=64,
    patch_size=16,
    in_chans=3,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=4 * 2 / 3,
    out_indices=[0, 1, 2, 3],
    qkv_bias=True,
    drop_path_rate=0.2,
    init_values=None,
    use_checkpoint=False,
    use_abs_pos_emb=True,
    use_rel_pos_bias=False,
    use_shared_rel_pos_bias=False,
    rope=True,
    pt_hw_seq_len=2,
    intp_freq=True,
    subln=True,
    xattn=False,
    naiveswiglu=True,
    norm_layer=dict(type="LN", requires_grad=True, eps=1e-6),
)


def weights(model, keep):
    """Parameters and persistent buffers whose names satisfy ``keep`` (the official class overrides
    ``state_dict`` to return only Rein's)."""
    named = dict(model.named_parameters())
    named.update({k: v for k, v in model.named_buffers() if "rope" not in k})
    return {k: v.detach().clone() for k, v in named.items() if keep(k)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    model = build_perturbed(BACKBONE)
    model.eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, queries = model(image)
        plain = copy.deepcopy(model)
        plain.reins.scale.zero_()  # Rein adds scale * delta: zero is the plain EVA02
        plain_features, _ = plain(image)
    model.train()
    with torch.no_grad():
        train_features, train_queries = model(image)
    train_mode_modules = [name for name, module in model.named_modules() if module.training and name]
    torch.save(
        dict(
            kind="reins_eva2",
            backbone_config=BACKBONE,
            backbone_state_dict=weights(model, lambda k: not k.startswith("reins.")),
            reins_state_dict=weights(model, lambda k: k.startswith("reins.")),
            image=image,
            features=[f.clone() for f in features],
            queries=queries.clone(),
            plain_features=[f.clone() for f in plain_features],
            train_features=[f.clone() for f in train_features],
            train_queries=train_queries.clone(),
            train_mode_modules=train_mode_modules,
        ),
        OUT,
    )
    print("wrote", OUT, [tuple(f.shape) for f in features], tuple(queries.shape), train_mode_modules[:3])
