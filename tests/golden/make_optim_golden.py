"""Golden optimizer data from the official Rein code: parameter groups, lr curves, two AdamW steps.

Run manually (not by pytest) in the official environment (mmengine, mmseg 1.2.2, mmdet 3.3.0,
mmcv-lite 2.1.0, CPU, one thread), from the repository root:

    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/make_optim_golden.py \
        --official /work/official --train-golden tests/data/official_train_tiny.pt \
        --out tests/data/official_optim_tiny.pt

It builds the tiny official segmentor of ``official_train_tiny.pt`` (its ``model_config`` and
weights) and, with the optimizer settings of the official configs read by mmengine
(``optim_wrapper`` with ``PEFTOptimWrapperConstructor`` and ``param_scheduler``), saves:

- ``optimizer``: the AdamW defaults the official constructor built (lr, betas, eps, weight_decay, amsgrad).
- ``param_groups``: official parameter name -> ``(lr, weight_decay)`` of every trainable parameter,
  from ``configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py``.
- ``frozen``: the same for the frozen-VFM baseline (``configs/frozen_vfms/dinov2-L_mask2former.py``,
  whose ``paramwise_cfg`` differs): ``model_config`` (the tiny model as
  ``FrozenBackboneEncoderDecoder`` + ``DinoVisionTransformer`` + mmseg's ``Mask2FormerHead``, which
  learns its own queries) and ``param_groups`` (randomly initialised: only names matter).
- ``lr_curves``: per official config (``gta_512``: the 512 GTAV config, PolyLR; ``citys2acdc_1024``:
  LinearLR warm-up + PolyLR), the lr of the optimizer during iteration ``steps[i]`` (float64),
  stepped as mmengine's ``ParamSchedulerHook`` does (one ``scheduler.step()`` after every iteration).
- ``two_steps``: from the file's weights, two training iterations as mmengine's ``train_step`` runs
  them (loss, ``parse_losses``, ``OptimWrapper.update_params``, then the schedulers' step), on
  ``cases[case_indices[k]]`` of the train golden, with ``torch.rand`` replaced by the file's
  ``rand_scheme``. The schedule is the 512 config's PolyLR with ``end`` = ``max_iters`` (3, so the
  second step's lr differs from the first). ``model_config`` is the train golden's with the pixel
  decoder's GroupNorm at ``num_groups`` 16 (2 channels a group): with one channel a group the
  conv biases before it have a zero true gradient, and Adam turns their float noise into full
  random steps. Saved: ``losses[k]`` (official term names without ``decode.``), ``lrs[k]``, and
  ``weights[k]`` (official name -> the trainable weight after step k + 1), ``grads[k]`` (the
  gradients step k + 1 applied).
- ``seeded``: for each case of the train golden, the official loss with the real ``torch.rand``
  after ``torch.manual_seed(rand_seed)``: ``draws`` (the size of every ``torch.rand`` call, in
  order) and ``losses``. They pin the order of the random draws (an image without a labelled
  pixel still draws its matching points).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import types
from pathlib import Path

import torch


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _package(name: str, path: Path) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def load_official(official: Path) -> None:
    """Import mmseg and the official Rein modules of the DINOv2 recipe."""
    # Compiled mmcv ops are absent (on CPU mmcv uses its pure-PyTorch fallbacks); the CLIP tokenizer is unused.
    for name in ("mmcv._ext", "mmseg.utils.tokenizer"):
        sys.modules[name] = _Stub(name)
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    # The package's __init__ imports every backbone (EVA-02 and CLIP need timm, torchvision,
    # xformers); only the DINOv2 ones are needed here.
    _package("rein", official / "rein")
    _package("rein.models", official / "rein/models")
    _package("rein.models.backbones", official / "rein/models/backbones")
    for name in (
        "rein.models.backbones.reins_dinov2",
        "rein.models.heads",
        "rein.models.segmentors",
        "rein.optimizers",
    ):
        importlib.import_module(name)
    # Imported now; without the stub mmengine's mmcv_full_available() answers False, as with mmcv-lite
    # (the official constructor then marks no module as deformable conv: the recipe has none anyway).
    del sys.modules["mmcv._ext"]


def plain(value):
    """mmengine ConfigDicts (and their nesting) as built-in types, so the file loads without mmengine."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def build_model(model_config: dict, golden: dict | None):
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS

    model = MODELS.build(ConfigDict(copy.deepcopy(model_config)))
    if golden is None:
        model.train()
        return model
    result = model.load_state_dict(golden["release_state_dict"], strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("backbone.") and "reins" not in k for k in result.missing_keys), result.missing_keys
    model.backbone.load_state_dict(golden["backbone_state_dict"], strict=False)
    model.train()
    return model


def data_samples(labels: torch.Tensor):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for label in labels:
        shape = tuple(label.shape)
        sample = SegDataSample(metainfo=dict(img_shape=shape, pad_shape=shape, ori_shape=shape))
        sample.gt_sem_seg = PixelData(data=label[None].long())
        samples.append(sample)
    return samples


def official_param_groups(model, optim_wrapper_cfg) -> dict:
    """Official name -> (lr, weight decay) of every trainable parameter, from mmengine's constructor."""
    from mmengine.optim import build_optim_wrapper

    optimizer = build_optim_wrapper(model, copy.deepcopy(optim_wrapper_cfg)).optimizer
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    groups = {
        n: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"])
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert len(group_of) == len(groups), "a parameter group holds a frozen parameter"
    return groups


def lr_curve(config, steps: set[int]) -> dict:
    """The lr during each iteration in ``steps`` of the config's whole schedule (group 0; all groups scale alike)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    param = torch.nn.Parameter(torch.zeros(1))
    holder = torch.nn.Module()
    holder.weight = param
    optim_wrapper = build_optim_wrapper(holder, copy.deepcopy(config.optim_wrapper))
    schedulers = [
        PARAM_SCHEDULERS.build(dict(s, optimizer=optim_wrapper)) for s in copy.deepcopy(config.param_scheduler)
    ]
    max_iters = config.train_cfg["max_iters"]
    kept, lrs = [], []
    for it in range(max_iters):
        if it in steps:
            kept.append(it)
            lrs.append(optim_wrapper.optimizer.param_groups[0]["lr"])
        optim_wrapper.optimizer.step()
        for scheduler in schedulers:  # ParamSchedulerHook.after_train_iter
            scheduler.step()
    return dict(
        steps=torch.tensor(kept),
        lr=torch.tensor(lrs, dtype=torch.float64),
        base_lr=config.optim_wrapper["optimizer"]["lr"],
        max_iters=max_iters,
        param_scheduler=plain(config.param_scheduler),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, default=Path("/work/official"))
    parser.add_argument("--train-golden", type=Path, default=Path("tests/data/official_train_tiny.pt"))
    parser.add_argument("--out", type=Path, default=Path("tests/data/official_optim_tiny.pt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(args.official))
    load_official(args.official)
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    golden = torch.load(args.train_golden, map_location="cpu", weights_only=False)
    configs = {
        "frozen": args.official / "configs/frozen_vfms/dinov2-L_mask2former.py",
        "gta_512": args.official / "configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py",
        "citys2acdc_1024": args.official / "configs/dinov2_citys2acdc/rein_dinov2_mask2former_1024x1024_bs4x2.py",
    }
    configs = {name: Config.fromfile(str(path)) for name, path in configs.items()}
    gta = configs["gta_512"]

    # Parameter groups: the tiny official model through the official constructor.
    model = build_model(golden["model_config"], golden)
    param_groups = official_param_groups(model, gta.optim_wrapper)
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(gta.optim_wrapper))
    optimizer = optim_wrapper.optimizer
    defaults = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")}
    defaults["type"] = type(optimizer).__name__
    defaults["optim_wrapper"] = type(optim_wrapper).__name__

    # The frozen baseline: the tiny model without Rein, the head with its own queries.
    frozen_config = copy.deepcopy(golden["model_config"])
    frozen_config["type"] = configs["frozen"].model["type"]
    del frozen_config["backbone"]["reins_config"]
    frozen_config["backbone"]["type"] = configs["frozen"].model["backbone"]["type"]
    del frozen_config["decode_head"]["replace_query_feat"]
    frozen_config["decode_head"]["type"] = configs["frozen"].model["decode_head"]["type"]
    assert frozen_config["type"] == "FrozenBackboneEncoderDecoder"
    frozen = dict(
        model_config=frozen_config,
        param_groups=official_param_groups(build_model(frozen_config, None), configs["frozen"].optim_wrapper),
        optim_wrapper_cfg=plain(configs["frozen"].optim_wrapper),
    )
    del configs["frozen"]

    # The lr curves over whole runs, kept at a subset of the iterations: dense at the ends and
    # around the warm-up's end, every 50th elsewhere.
    keep = set(range(0, 40000, 50)) | set(range(300)) | set(range(9700, 10300)) | set(range(39700, 40000))
    lr_curves = {name: lr_curve(config, keep) for name, config in configs.items()}

    # Two whole iterations.
    ns: dict = {"torch": torch}
    exec(golden["rand_scheme"], ns)
    real_rand = torch.rand
    fake_rand = ns["shape_rand_factory"](golden["rand_seed"], real_rand)
    for probe in golden["rand_probe"]:
        assert torch.equal(fake_rand(tuple(probe.shape)), probe)
    step_config = copy.deepcopy(golden["model_config"])
    step_config["decode_head"]["pixel_decoder"]["norm_cfg"]["num_groups"] = 16
    model = build_model(step_config, golden)
    max_iters = 3
    schedule = [dict(s, end=max_iters) for s in copy.deepcopy(gta.param_scheduler)]
    assert len(schedule) == 1 and schedule[0]["type"] == "PolyLR" and schedule[0]["begin"] == 0
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(gta.optim_wrapper))
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=optim_wrapper)) for s in schedule]
    case_indices = [0, 1]
    losses, lrs, weights, grads = [], [], [], []
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # update_params runs backward, step and zero_grad: the gradients are read just before the step.
    optim_wrapper.optimizer.register_step_pre_hook(
        lambda *_: grads.append({n: p.grad.detach().clone() for n, p in trainable.items()})
    )
    for k in case_indices:
        case = golden["cases"][k]
        lrs.append(optim_wrapper.optimizer.param_groups[0]["lr"])
        torch.rand = fake_rand
        try:
            with optim_wrapper.optim_context(model):
                loss_dict = model.loss(case["images"], data_samples(case["labels"]))
        finally:
            torch.rand = real_rand
        total, _ = model.parse_losses(loss_dict)
        optim_wrapper.update_params(total)
        for scheduler in schedulers:
            scheduler.step()
        losses.append({k.removeprefix("decode."): v.item() for k, v in loss_dict.items()})
        weights.append({n: p.detach().clone() for n, p in trainable.items()})
        print(f"step {len(losses)}: lr {lrs[-1]:.6e}, total {total.item():.6f}")

    # The same set-up reproduces the train golden (default GroupNorm) before any step.
    check = build_model(golden["model_config"], golden)
    for case in golden["cases"]:
        torch.rand = fake_rand
        try:
            terms = check.loss(case["images"], data_samples(case["labels"]))
        finally:
            torch.rand = real_rand
        for name, value in case["losses"].items():
            assert abs(terms["decode." + name].item() - value) <= 1e-5 * abs(value), (case["name"], name)

    # Seeded runs with the real torch.rand: the draws in order.
    seeded = []
    for case in golden["cases"]:
        draws = []

        def recording_rand(*size, draws=draws, **kwargs):
            shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            draws.append(tuple(int(s) for s in shape))
            return real_rand(*size, **kwargs)

        torch.manual_seed(golden["rand_seed"])
        torch.rand = recording_rand
        try:
            with torch.no_grad():
                terms = check.loss(case["images"], data_samples(case["labels"]))
        finally:
            torch.rand = real_rand
        seeded.append(
            dict(name=case["name"], draws=draws, losses={k.removeprefix("decode."): v.item() for k, v in terms.items()})
        )
        print(case["name"], "draws", draws)

    import mmdet
    import mmengine
    import mmseg

    torch.save(
        dict(
            kind="official_optim",
            made_from=args.train_golden.name,
            optimizer=defaults,
            optim_wrapper_cfg=plain(gta.optim_wrapper),
            param_groups=param_groups,
            frozen=frozen,
            lr_curves=lr_curves,
            two_steps=dict(
                model_config=step_config,
                case_indices=case_indices,
                max_iters=max_iters,
                param_scheduler=plain(schedule),
                losses=losses,
                lrs=lrs,
                weights=weights,
                grads=grads,
            ),
            seeded=seeded,
            versions=dict(
                torch=str(torch.__version__),
                mmengine=mmengine.__version__,
                mmseg=mmseg.__version__,
                mmdet=mmdet.__version__,
            ),
        ),
        args.out,
    )
    torch.load(args.out, weights_only=True)  # plain data only
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
