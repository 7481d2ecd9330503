"""Write tests/data/fada_tiny.pt: the official FADA module and DINOv2 + FADA on tiny configurations.

FADA (Bi et al., NeurIPS 2024) is a fork of the official Rein code whose package is also named
``rein``; its module replaces ``Reins`` / ``LoRAReins`` in rein/models/backbones/reins.py. Run in
the official environment with the FADA checkout, and only it, first on the path:

    mkdir -p /work/fada-official && git --git-dir=/work/.mirror/JingjunYi+FADA/repo \\
        --work-tree=/work/fada-official checkout HEAD -- .
    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/make_fada_golden.py /work/fada-official

(``official_env`` puts its first argument first on ``sys.path``; the script checks that the ``rein``
it imported is FADA's.)

The official module hard-codes ``self.wavepool = WavePool(1024)``, the width of ViT-L, so it runs
only on 1024-wide features. The cases:

- ``init_1024``: the unmodified official ``LoRAReins`` at width 1024 (2 layers, 4 tokens, rank 2,
  8-d queries), built after ``torch.manual_seed(1)`` and not perturbed: ``param_sums`` (name ->
  (sum, sum of squares) in float64) pins the initialisation; ``scale`` is then set to 1 so the
  refinement shows in ``outputs`` (``inputs[i]`` -> ``outputs[i]`` at layer i, batch-first
  ``(2, 1 + 16, 1024)``, CLS first); ``queries``.
- The tiny cases at width 64 build ``WavePool(1024)``'s filters at the features' width
  (``get_wav(64)``: the same fixed Haar filters, 64 groups); nothing else is changed. Every
  parameter is perturbed with ``randn * 0.1`` after construction (``official_env.build_perturbed``),
  the Haar filters included (the official training trains them: ``set_requires_grad(self,
  ["reins"])`` turns on every parameter whose name holds "reins", ``reins.wavepool.*`` among them).
  - ``module``: ``LoRAReins`` (3 layers, 6 tokens, rank 4, 16-d queries); ``inputs`` /
    ``outputs`` per layer (``(2, 1 + 16, 64)``: a 4x4 grid; layer 2 an 8x8 grid, ``(2, 1 + 64, 64)``);
    ``queries``; ``loss_weights`` (one per output, then one for the queries) and ``grads``: the
    gradient of ``sum_i <outputs[i], w_i> + <queries, w_q>`` for every parameter, the Haar filters
    included.
  - ``module_full``: ``Reins`` (full-rank tokens) of the same sizes: ``inputs``, ``outputs``,
    ``queries``.
  - ``backbone``: the official ``ReinsDinoVisionTransformer`` (img 64, patch 16, width 64, depth 4,
    4 heads, as the shared dinov2_lora_rein_tiny.pt) with the ``module`` FADA config over 4 layers:
    ``backbone_state_dict`` (original DINOv2 layout), ``fada_state_dict`` (``reins.*`` without the
    prefix), ``image`` (2, 3, 64, 64), ``features`` / ``queries`` in eval mode; after the official
    ``train()``: ``trainable`` (the names ``requires_grad`` turned on), ``train_features``,
    ``loss_weights`` and ``grads`` (``sum_i <features[i], w_i> + <queries, w_q>``, every
    trainable parameter, keyed without the ``reins.`` prefix).
- ``wavepool``: the official ``WavePool(8)`` on a ``(2, 8, 6, 4)`` map: ``input``, ``LL``, ``LH``,
  ``HL``, ``HH``.
- ``vitl_count``: the official ``LoRAReins`` of the released DINOv2-L config
  (configs/_base_/models/rein_dinov2_mask2former.py: 24 layers, width 1024, patch 16, 100 tokens of
  rank 16, 256-d queries): ``config``, ``parameters`` (all of them: what the official training
  trains) and ``requires_grad`` (those made trainable at construction: all but the Haar filters).
"""

import contextlib
import copy
import importlib
import inspect
from pathlib import Path

import torch
from official_env import MODELS, build_perturbed

# FADA's module (official_env put its repository first on the path and imported its `rein`).
fada_reins = importlib.import_module("rein.models.backbones.reins")

OUT = Path(__file__).resolve().parents[1] / "data" / "fada_tiny.pt"

assert hasattr(fada_reins, "WavePool"), f"{fada_reins.__file__} is not FADA's reins.py"
assert "WavePool(1024)" in inspect.getsource(fada_reins.Reins.create_model)

TINY = dict(num_layers=3, embed_dims=64, patch_size=16, query_dims=16, token_length=6, link_token_to_query=True)
VIT = dict(
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


@contextlib.contextmanager
def wavepool_width(width):
    """The official ``WavePool(1024)`` built at ``width`` instead (the only change to the code)."""
    # WavePool.__init__ passes its width to get_wav, which builds the four filters.
    official = fada_reins.get_wav
    fada_reins.get_wav = lambda _hard_coded, pool=True: official(width, pool)
    try:
        yield
    finally:
        fada_reins.get_wav = official


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_layers(module, inputs):
    return [module(x, layer, batch_first=True, has_cls_token=True) for layer, x in enumerate(inputs)]


def weighted_loss(outputs, queries, weights):
    return sum((o * w).sum() for o, w in zip([*outputs, queries], weights, strict=True))


def module_case():
    config = dict(TINY, type="LoRAReins", lora_dim=4)
    with wavepool_width(64):
        module = build_perturbed(config)
    module.requires_grad_(True)  # the official training trains the Haar filters too (see above)
    torch.manual_seed(10)
    inputs = [torch.randn(2, 1 + 16, 64), torch.randn(2, 1 + 16, 64), torch.randn(2, 1 + 64, 64)]
    outputs = run_layers(module, inputs)
    _, queries = module.return_auto([])
    weights = [torch.randn_like(t) for t in [*outputs, queries]]
    weighted_loss(outputs, queries, weights).backward()
    return dict(
        config=config,
        state_dict=state(module),
        inputs=inputs,
        outputs=[o.detach() for o in outputs],
        queries=queries.detach(),
        loss_weights=weights,
        grads={k: p.grad.clone() for k, p in module.named_parameters()},
    )


def module_full_case():
    config = dict(TINY, type="Reins")
    with wavepool_width(64):
        module = build_perturbed(config, seed=2)
    torch.manual_seed(11)
    inputs = [torch.randn(2, 1 + 16, 64) for _ in range(3)]
    with torch.no_grad():
        outputs = run_layers(module, inputs)
        _, queries = module.return_auto([])
    return dict(config=config, state_dict=state(module), inputs=inputs, outputs=outputs, queries=queries)


def init_1024_case():
    config = dict(
        type="LoRAReins", num_layers=2, embed_dims=1024, patch_size=16, query_dims=8, token_length=4, lora_dim=2
    )
    torch.manual_seed(1)
    module = MODELS.build(copy.deepcopy(config))
    sums = {k: (v.double().sum().item(), v.double().square().sum().item()) for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.scale.fill_(1.0)
        torch.manual_seed(12)
        inputs = [torch.randn(2, 1 + 16, 1024) for _ in range(2)]
        outputs = run_layers(module, inputs)
        _, queries = module.return_auto([])
    return dict(config=config, seed=1, param_sums=sums, inputs=inputs, outputs=outputs, queries=queries)


def wavepool_case():
    torch.manual_seed(13)
    x = torch.randn(2, 8, 6, 4)
    with torch.no_grad():
        ll, lh, hl, hh = fada_reins.WavePool(8)(x)
    return {"input": x, "LL": ll, "LH": lh, "HL": hl, "HH": hh}


def vitl_count_case():
    config = dict(
        type="LoRAReins", num_layers=24, embed_dims=1024, patch_size=16, query_dims=256, token_length=100, lora_dim=16
    )
    module = MODELS.build(copy.deepcopy(config))
    return dict(
        config=config,
        parameters=sum(p.numel() for p in module.parameters()),
        requires_grad=sum(p.numel() for p in module.parameters() if p.requires_grad),
    )


def backbone_case():
    config = dict(
        VIT, type="ReinsDinoVisionTransformer", reins_config=dict(TINY, type="LoRAReins", lora_dim=4, num_layers=4)
    )
    with wavepool_width(64):
        model = build_perturbed(config, seed=3)
    model.eval()
    torch.manual_seed(14)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, queries = model(image)
    model.train()  # the official set_requires_grad / set_train
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    train_features, train_queries = model(image)
    weights = [torch.randn_like(t) for t in [*train_features, train_queries]]
    weighted_loss(train_features, train_queries, weights).backward()
    named = dict(model.named_parameters())
    return dict(
        vit_config=VIT,
        fada_config=config["reins_config"],
        backbone_state_dict={k: v.detach().clone() for k, v in named.items() if not k.startswith("reins.")},
        fada_state_dict={k[len("reins.") :]: v.detach().clone() for k, v in named.items() if k.startswith("reins.")},
        image=image,
        features=[f.clone() for f in features],
        queries=queries.clone(),
        trainable=trainable,
        train_features=[f.detach().clone() for f in train_features],
        loss_weights=weights,
        grads={k[len("reins.") :]: named[k].grad.clone() for k in trainable},
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    golden = dict(
        kind="fada",
        source="JingjunYi/FADA " + fada_reins.__file__,
        module=module_case(),
        module_full=module_full_case(),
        init_1024=init_1024_case(),
        wavepool=wavepool_case(),
        backbone=backbone_case(),
        vitl_count=vitl_count_case(),
    )
    torch.save(golden, OUT)
    print("wrote", OUT, "trainable:", golden["backbone"]["trainable"], "ViT-L:", golden["vitl_count"])
