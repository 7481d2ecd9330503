"""Write tests/data/set_tiny.pt: the official SET code (github JingjunYi/SET) on tiny configurations.

SET's repository is a fork of the official Rein code whose package is also named ``rein``; its
``Reins`` / ``LoRAReins`` (rein/models/backbones/reins.py) carry the spectral tokens. Run in the
official environment with SET's checkout as the first argument (``official_env`` puts it first on
``sys.path``; the Rein checkout must not be on it):

    mkdir -p /work/set-official && git --git-dir=/work/.mirror/JingjunYi+SET/repo \\
        --work-tree=/work/set-official checkout HEAD -- .
    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/make_set_golden.py /work/set-official

Every module is built with ``official_env.build_perturbed`` (seed, then every parameter plus
``randn * 0.1``), so no weight is trivial. Saved:

- ``modules``: two cases of the module alone, called as ReinsDinoVisionTransformer calls it
  (batch-first, one CLS token): ``lora`` (``LoRAReins``, C 32, batch 2) and ``full_odd`` (full-rank
  ``Reins``, odd C 15, batch 3, ``use_softmax=False``, ``zero_mlp_delta_f=True``). Each holds
  ``config``, ``state_dict`` (official names), ``inputs[i]`` / ``outputs[i]`` for layer i
  ``(B, 1 + N, C)``, ``queries`` (``lora`` only), ``loss_weights`` and ``grads``: the gradient of
  ``sum_i <outputs[i], loss_weights[i]> (+ <queries, loss_weights[-1]>)`` for every parameter and
  (``input_grads``) for every input.
- ``init``: ``LoRAReins`` built after ``torch.manual_seed(123)`` without perturbation (the official
  initialisation order), ``config`` and ``state_dict``.
- ``backbone``: the official ``ReinsDinoVisionTransformer`` (tiny DINOv2: img 64, patch 16, width
  64, depth 4, 4 heads, LayerScale 1e-5) with SET's ``LoRAReins`` (10 tokens, rank 4, queries 32):
  ``backbone_config``, ``backbone_state_dict`` (DINOv2's layout), ``reins_state_dict``
  (``reins.*``), ``image`` (2, 3, 64, 64), ``features`` (the four maps), ``queries``,
  ``loss_weights`` and ``grads`` (the same loss after the official ``train()``, one entry per
  ``reins.*`` parameter), ``single_features`` (the first image alone: SET's FFT runs over the
  batch axis, so a sample's features depend on its batch).
- ``resnet``: the official ``ReinsResNetV1c`` of tests/data/reins_resnet_tiny.pt (ResNet-18 V1c at
  width 8, its weights and BatchNorm statistics) with SET's ``LoRAReins`` per stage (8 tokens, rank
  4, queries 32), the Reins perturbed, all in float64: ``backbone_config``, ``reins_state_dict``,
  ``image``, ``features``, ``queries``, ``loss_weights``, ``grads`` (as ``backbone``).
"""

import copy
import sys
from pathlib import Path

import torch
from make_reins_eva2 import weights  # parameters and buffers by name (the official state_dict keeps Rein's only)
from official_env import MODELS, build_perturbed  # the official code (SET's checkout), importable on CPU

DATA = Path(__file__).resolve().parents[1] / "data"
OUT = DATA / "set_tiny.pt"

MODULES = {
    "lora": (
        dict(
            type="LoRAReins",
            num_layers=3,
            embed_dims=32,
            patch_size=16,
            query_dims=16,
            token_length=6,
            lora_dim=4,
            link_token_to_query=True,
        ),
        2,
    ),
    "full_odd": (
        dict(
            type="Reins",
            num_layers=2,
            embed_dims=15,
            patch_size=14,
            query_dims=8,
            token_length=5,
            use_softmax=False,
            zero_mlp_delta_f=True,
            link_token_to_query=False,
        ),
        3,
    ),
}
NUM_PATCHES = 12

BACKBONE = dict(
    type="ReinsDinoVisionTransformer",
    reins_config=dict(
        type="LoRAReins",
        token_length=10,
        embed_dims=64,
        num_layers=4,
        patch_size=16,
        query_dims=32,
        lora_dim=4,
        link_token_to_query=True,
    ),
    img_size=64,
    patch_size=16,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=4,
    init_values=1e-05,
    ffn_layer="mlp",
    block_chunks=0,
    qkv_bias=True,
    proj_bias=True,
    ffn_bias=True,
    out_indices=[0, 1, 2, 3],
)


def weighted_sum(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))


def module_case(config, batch):
    module = build_perturbed(config, seed=0)
    layers, width = config["num_layers"], config["embed_dims"]
    inputs = [torch.randn(batch, 1 + NUM_PATCHES, width, requires_grad=True) for _ in range(layers)]
    outputs = [module(x, i, batch_first=True, has_cls_token=True) for i, x in enumerate(inputs)]
    results = list(outputs)
    queries = None
    if config["link_token_to_query"]:
        _, queries = module.return_auto(None)
        results.append(queries)
    weights = [torch.randn_like(r) for r in results]
    weighted_sum(results, weights).backward()
    return dict(
        config=config,
        state_dict={k: v.detach().clone() for k, v in module.state_dict().items()},
        inputs=[x.detach().clone() for x in inputs],
        outputs=[o.detach().clone() for o in outputs],
        queries=None if queries is None else queries.detach().clone(),
        loss_weights=weights,
        grads={k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None},
        input_grads=[x.grad.clone() for x in inputs],
    )


def backbone_case():
    model = build_perturbed(BACKBONE, seed=1)
    image = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        features, queries = model(image)
        single_features, _ = model(image[:1])
    model.train()  # the official train(): only the Reins require gradients
    train_features, train_queries = model(image)
    results = [*train_features, train_queries]
    loss_weights = [torch.randn_like(r) for r in results]
    weighted_sum(results, loss_weights).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert grads and all(k.startswith("reins.") for k in grads), sorted(grads)
    for ours, theirs in zip(train_features, features, strict=True):
        assert torch.equal(ours.detach(), theirs), "SET has no dropout: train and eval features agree"
    return dict(
        backbone_config=BACKBONE,
        backbone_state_dict=weights(model, lambda k: not k.startswith("reins.")),
        reins_state_dict=weights(model, lambda k: k.startswith("reins.")),
        image=image,
        features=[f.clone() for f in features],
        queries=queries.clone(),
        single_features=[f.clone() for f in single_features],
        loss_weights=loss_weights,
        grads=grads,
    )


def resnet_case():
    """The official ReinsResNetV1c of tests/data/reins_resnet_tiny.pt (its ResNet weights and
    BatchNorm statistics) with SET's LoRAReins per stage, perturbed after ``torch.manual_seed(2)``."""
    cnn = torch.load(DATA / "reins_resnet_tiny.pt", weights_only=True)
    model = MODELS.build(copy.deepcopy(cnn["backbone_config"]))
    missing, unexpected = model.load_state_dict(cnn["backbone_state_dict"], strict=False)
    assert not unexpected and all(k.startswith("reins.") for k in missing), (missing, unexpected)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.reins.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    # float64: through eight blocks and their BatchNorms float32 rounding alone reaches 1e-5 of the
    # largest gradient; in float64 the comparison pins the method, not the rounding.
    model.double().eval()
    image = cnn["image"].double()
    with torch.no_grad():
        features, queries = model(image)
    model.train()  # the official train(): only the Reins train, the ResNet stays in eval mode
    train_features, train_queries = model(image)
    results = [*train_features, train_queries]
    loss_weights = [torch.randn_like(r) for r in results]
    weighted_sum(results, loss_weights).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert grads and all(k.startswith("reins.") for k in grads), sorted(grads)
    for ours, theirs in zip(train_features, features, strict=True):
        assert torch.equal(ours.detach(), theirs)
    return dict(
        backbone_config=cnn["backbone_config"],
        reins_state_dict=weights(model, lambda k: k.startswith("reins.")),
        image=image,
        features=[f.clone() for f in features],
        queries=queries.clone(),
        loss_weights=loss_weights,
        grads=grads,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    import rein

    source = Path(rein.__file__).resolve().parents[1]
    assert source == Path(sys.argv[1]).resolve(), f"rein imported from {source}, not SET's checkout"
    assert hasattr(MODELS.get("Reins"), "get_tokens2"), "this `rein` is not SET's (no get_tokens2)"

    modules = {}
    for name, (config, batch) in MODULES.items():
        torch.manual_seed(10)
        modules[name] = module_case(copy.deepcopy(config), batch)
    init_config = dict(MODULES["lora"][0])
    torch.manual_seed(123)
    init_module = MODELS.build(copy.deepcopy(init_config))
    torch.manual_seed(20)
    backbone = backbone_case()
    resnet = resnet_case()
    torch.save(
        dict(
            source="github JingjunYi/SET (official), " + str(source),
            modules=modules,
            init=dict(config=init_config, state_dict={k: v.clone() for k, v in init_module.state_dict().items()}),
            backbone=backbone,
            resnet=resnet,
        ),
        OUT,
    )
    print("wrote", OUT)
    print({k: tuple(v.shape) for k, v in backbone["grads"].items()})
