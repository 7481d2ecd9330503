"""Write tests/data/soma_tiny.pt: the official SoMA (ysj9909/SoMA, ``rein/peft/sora.py``) on a tiny DINOv2.

Run in the official environment, with the SoMA repository checked out (its package is also named
``rein``; it needs ``peft==0.11.1`` and ``transformers==4.42.4`` as its README pins):

    git --git-dir=/work/.mirror/ysj9909+SoMA/repo --work-tree=/work/soma-official checkout HEAD -- .
    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/make_soma_golden.py /work/soma-official

The tiny DINOv2 (the official ``DinoVisionTransformer`` of the SoMA code, q/k/v split): img_size 64,
patch 16, width 64, depth 4, 4 heads, MLP ratio 4, LayerScale, out_indices [0, 1, 2, 3]; built with
seed 0 and every parameter perturbed by ``randn * 0.1``. Its weights are saved in the original
DINOv2 layout (``qkv`` fused, as Facebook's release) and loaded into the official model through the
official conversion (``tools/convert_models/convert_dinov2_sora.py``'s ``split_qkv_weights``).
``SoraModel`` with the official DINOv2-L config's settings at small size (rank 4, alpha 8: scaling
2, to exercise it; targets q, k, v, proj, fc1, fc2; ``start_lora_idx`` 2; minor components, full SVD
init "sora") then wraps the loaded model: the method as the paper describes it.

Saved:
- ``vit_config``, ``soma_config``; ``backbone_state_dict`` (original DINOv2 layout); ``image`` (2, 3, 64, 64).
- ``adapters``: official layer name (``blocks.2.attn.q``) -> ``lora_A`` (r, in), ``lora_B`` (out, r),
  ``residual`` (the frozen weight after the split), ``weight`` (the pretrained one).
- ``trainable``: official names of the trainable parameters (``mask_token`` included: the official
  code marks it trainable; it takes no gradient).
- ``features``: the four maps of the adapted backbone; ``probes``: fixed random tensors of their
  shapes; ``grads``: the gradient of ``sum(features[i] * probes[i])`` for every trainable parameter
  that receives one.
- ``param_groups``: official name -> (lr, weight decay) from the official ``PEFTOptimWrapperConstructor``
  with the paramwise_cfg of ``configs/sora/sora_dinov2-L_mask2former.py`` (the backbone under ``backbone.``).
- ``schedule``: that config's ``param_scheduler`` (PolyLR and the cosine weight-decay annealing)
  run by mmengine over its 40k iterations on two groups (weight decay 0.05 and 0): ``steps``, ``lr``
  and ``weight_decay`` per group during those iterations (float64).
- ``dinov2_l_trainable``: the official trainable parameter count of SoraModel on DINOv2-L at 512
  (patch 16) with the official config (meta device), and ``dinov2_l_mask_token`` (its share).
- ``runner_order``: what the official training run does (the segmentor built, SoraModel's SVD on the
  not yet loaded weights, then ``init_weights()`` loading the ``init_cfg`` checkpoint):
  ``weight_is_pretrained`` (the adapted layer's weight afterwards equals the pretrained one),
  ``weight_is_residual``, ``max_abs_lora_product`` (of ``B A`` then).
"""

import copy
import sys
import tempfile
from pathlib import Path

import torch
from official_env import MODELS  # the official code (here SoMA's ``rein``), importable on CPU

OFFICIAL = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/soma-official")
OUT = Path(__file__).resolve().parents[1] / "data" / "soma_tiny.pt"

VIT = dict(
    type="DinoVisionTransformer",
    img_size=64,
    patch_size=16,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=4,
    init_values=1e-5,
    block_chunks=0,
    qkv_bias=True,
    proj_bias=True,
    ffn_bias=True,
    ffn_layer="mlp",
    out_indices=[0, 1, 2, 3],
)
SOMA = dict(
    type="sora",
    r=4,
    first_eigen=False,
    lora_alpha=8,
    lora_dropout=0.0,
    lora_weight_init="sora",
    target_modules=["q", "k", "v", "proj", "fc1", "fc2"],
    start_lora_idx=2,
)
TARGETS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")


def official_converter():
    sys.path.insert(0, str(OFFICIAL / "tools" / "convert_models"))
    import convert_dinov2_sora

    return convert_dinov2_sora.split_qkv_weights


def original_layout(state: dict) -> dict:
    """The official (q/k/v split) weights in DINOv2's release layout (fused qkv)."""
    out = {}
    for key, value in state.items():
        if ".attn.k." in key or ".attn.v." in key:
            continue
        if ".attn.q." in key:
            parts = [state[key.replace(".attn.q.", f".attn.{n}.")] for n in "qkv"]
            out[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
        else:
            out[key] = value.clone()
    return out


def build_vit(state: dict | None = None):
    torch.manual_seed(0)
    vit = MODELS.build(copy.deepcopy(VIT))
    if state is None:
        with torch.no_grad():
            for param in vit.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    else:
        vit.load_state_dict(state, strict=True)
    return vit


def schedule(config) -> dict:
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    holder = torch.nn.Module()
    holder.backbone = torch.nn.Linear(1, 1, bias=False)
    holder.query_feat = torch.nn.Embedding(1, 1)
    wrapper = build_optim_wrapper(holder, copy.deepcopy(config.optim_wrapper))
    groups = wrapper.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0], [g["weight_decay"] for g in groups]
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in copy.deepcopy(config.param_scheduler)]
    max_iters = config.train_cfg["max_iters"]
    keep = set(range(0, max_iters, 97)) | set(range(max_iters - 5, max_iters)) | {1, 2, 3}
    steps, lrs, decays = [], [], []
    for it in range(max_iters):
        if it in keep:
            steps.append(it)
            lrs.append([g["lr"] for g in groups])
            decays.append([g["weight_decay"] for g in groups])
        for scheduler in schedulers:  # ParamSchedulerHook.after_train_iter
            scheduler.step()
    return dict(
        steps=torch.tensor(steps),
        lr=torch.tensor(lrs, dtype=torch.float64),
        weight_decay=torch.tensor(decays, dtype=torch.float64),
        initial_lr=[g["initial_lr"] for g in groups],
        initial_weight_decay=[0.05, 0.0],
        max_iters=max_iters,
    )


def param_groups(model, config) -> dict:
    from mmengine.optim import build_optim_wrapper

    holder = torch.nn.Module()
    holder.backbone = model
    optimizer = build_optim_wrapper(holder, copy.deepcopy(config.optim_wrapper)).optimizer
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {
        n: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"])
        for n, p in holder.named_parameters()
        if p.requires_grad
    }


def dinov2_l_count(config) -> tuple[int, int]:
    from rein.peft.sora import SoraConfig, SoraModel

    backbone = {k: v for k, v in config.model.backbone.items() if k not in ("init_cfg", "lora_cfg")}
    vit = MODELS.build(backbone).to("meta")  # built on the CPU (its constructor calls .item())
    with torch.device("meta"):
        model = SoraModel(SoraConfig(**config.model.backbone.lora_cfg), vit)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, model.model.mask_token.numel()


def runner_order(state_path: str, official_state: dict) -> dict:
    """The official segmentor as the runner builds it, then ``init_weights()`` as ``Runner.train`` calls it."""
    from mmengine.config import ConfigDict

    torch.manual_seed(1)
    segmentor = MODELS.build(
        ConfigDict(
            type="PEFTBackboneEncoderDecoder",
            backbone=dict(VIT, init_cfg=dict(type="Pretrained", checkpoint=state_path), lora_cfg=SOMA),
            decode_head=dict(type="FCNHead", in_channels=64, channels=8, num_convs=1, num_classes=19, in_index=3),
        )
    )
    segmentor.init_weights()
    layer = segmentor.backbone.model.blocks[2].attn.q
    pretrained = official_state["blocks.2.attn.q.weight"]
    product = layer.lora_B.weight @ layer.lora_A.weight
    residual = pretrained - layer.scaling * product
    return dict(
        weight_is_pretrained=bool(torch.equal(layer.weight.data, pretrained)),
        weight_is_residual=bool(torch.allclose(layer.weight.data, residual, atol=1e-6)),
        max_abs_lora_product=product.abs().max().item(),
    )


def main() -> None:
    from mmengine.config import Config
    from rein.peft.sora import SoraConfig, SoraModel

    torch.set_num_threads(1)
    original = original_layout(build_vit().state_dict())
    official_state = copy.deepcopy(original)
    official_converter()(official_state)  # the official qkv split
    vit = build_vit(official_state)
    model = SoraModel(SoraConfig(**SOMA), vit)
    model.train()

    adapters = {}
    for index in range(SOMA["start_lora_idx"], VIT["depth"]):
        for target in TARGETS:
            name = f"blocks.{index}.{target}"
            layer = vit.get_submodule(name)
            adapters[name] = dict(
                lora_A=layer.lora_A.weight.detach().clone(),
                lora_B=layer.lora_B.weight.detach().clone(),
                residual=layer.weight.detach().clone(),
                weight=official_state[f"{name}.weight"].clone(),
                scaling=layer.scaling,
            )
    trainable = [n for n, p in vit.named_parameters() if p.requires_grad]

    torch.manual_seed(2)
    image = torch.randn(2, 3, 64, 64)
    features = model(image)
    probes = [torch.randn_like(f) for f in features]
    sum((f * p).sum() for f, p in zip(features, probes, strict=True)).backward()
    grads = {n: p.grad.detach().clone() for n, p in vit.named_parameters() if p.requires_grad and p.grad is not None}
    assert set(trainable) - set(grads) == {"mask_token"}, set(trainable) - set(grads)

    config = Config.fromfile(str(OFFICIAL / "configs" / "sora" / "sora_dinov2-L_mask2former.py"))
    # Everything is imported now; without the stub mmengine's mmcv_full_available() answers False,
    # as with mmcv-lite (the constructor asks it).
    del sys.modules["mmcv._ext"]
    groups = param_groups(model, config)
    trainable_l, mask_token = dinov2_l_count(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "dinov2_sora_converted.pth")
        torch.save(official_state, path)
        order = runner_order(path, official_state)

    payload = dict(
        vit_config=VIT,
        soma_config=SOMA,
        backbone_state_dict=original,
        image=image,
        adapters=adapters,
        trainable=trainable,
        features=[f.detach() for f in features],
        probes=probes,
        grads=grads,
        param_groups=groups,
        schedule=schedule(config),
        dinov2_l_trainable=trainable_l,
        dinov2_l_mask_token=mask_token,
        runner_order=order,
        torch_version=torch.__version__,
    )
    torch.save(payload, OUT)
    print(f"wrote {OUT}: DINOv2-L trainable {trainable_l} (mask_token {mask_token}); runner order {order}")


if __name__ == "__main__":
    main()
