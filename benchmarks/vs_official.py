r"""reinseg against the official Rein code on the CPU: same model, same weights, same inputs.

Needs one environment holding both: the official one (torch, mmcv-lite 2.1.0, mmengine,
mmdet 3.3.0, mmsegmentation 1.2.2, mmpretrain; see tests/data/README.md) with reinseg
installed (``pip install -e .``), and a checkout of the official repository (w1oves/Rein):

    python benchmarks/vs_official.py --official /path/to/Rein --threads 2

The model is the paper's recipe at 512 px with a ViT-S backbone: the official config
``configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py`` with its DINOv2 backbone shrunk to
ViT-S/16 (12 blocks, 384 wide, 6 heads), LoRA-Rein (100 tokens, rank 16) and the full
Mask2Former head (256 wide, 6 deformable encoder and 9 decoder layers), random weights (seed 0).
The official model is built from that config by mmseg; reinseg's from the same config and weights
with :func:`reinseg.from_official`. Each measurement runs in a child process of its own:

- ``train``: one training step (forward, the official loss, backward) on a batch of 2, median
  seconds over ``--repeats`` after ``--warmup``; and the memory the step adds: the peak resident
  set during the steps (warm-up included) minus the resident set before them.
- ``infer``: whole-image inference of one 512x512 image (scores at the input size), median seconds.
- ``check``: both models' scores on one image, to show the two compute the same thing.

``--rounds N`` repeats the four measurements N times in fresh processes and prints each round's
ratios and their median. reinseg keeps freed memory (below), so its first steps still fault in
pages the later ones reuse: ``--warmup 3`` measures both codes in their steady state.

``--products`` runs one train step of each code under a counter of its matrix products
(``mm``/``addmm``/``bmm``/``baddbmm``, convolutions and attention kernels, forward and backward:
:class:`Products`): their multiply-adds and seconds (the products' seconds from that one step, the
rest as the median step's time less them), and this CPU's rates, measured in the same process
after the step, on a large ``sgemm`` (MKL) and on the head's largest convolution (oneDNN). The
official step's products at the faster of the two rates are what that much multiplying costs
here: a floor under the 0.5x train-step target, though not a hard one (no rate measured here is
the processor's peak)::

    OMP_NUM_THREADS=1 python benchmarks/vs_official.py --official /path/to/Rein --threads 1 \
        --warmup 3 --repeats 3 --products

``--levers`` measures reinseg's train step and inference once per lever of ``train``
(:mod:`reinseg.train_options`, bf16 autocast, fused AdamW), each in its own process, against the
official fp32 figures (CPU seconds too: on a shared machine they move less than wall seconds)::

    OMP_NUM_THREADS=1 python benchmarks/vs_official.py --official /path/to/Rein --threads 1 --levers

reinseg's processes keep freed memory as the ``reinseg`` command does
(:func:`reinseg.allocator.keep_freed_memory`; ``REINSEG_ALLOCATOR=system`` in the environment
measures them with the system allocator); ``--official-allocator keep`` gives the official code
the same setting, to tell the allocator's share from the code's.

The official code is imported from its own checkout and never copied here.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _allocator_before_torch(argv: list[str]) -> None:
    """A child process sets its allocator up before PyTorch loads, as the ``reinseg`` command
    does (reinseg.allocator: PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation): reinseg's
    children always, the official code's with ``--official-allocator keep``."""
    if "--child" not in argv:
        return
    side = argv[argv.index("--child") + 1].split("-")[0]
    keep = "--official-allocator" in argv and argv[argv.index("--official-allocator") + 1] == "keep"
    if side == "reinseg" or keep:
        from reinseg.allocator import keep_freed_memory

        keep_freed_memory()


_allocator_before_torch(sys.argv)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# The golden scripts' way of importing the official code on the CPU (stand-ins for the compiled
# mmcv ops), its config flattening and its data samples.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "golden"))
import make_optim_golden as golden  # noqa: E402
from cpu_linear import best_seconds  # noqa: E402
from levers import LEVERS, apply_lever  # noqa: E402

CONFIG = "configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py"
VIT_S = dict(embed_dim=384, depth=12, num_heads=6, out_indices=[3, 5, 7, 11])


def load_official(official: Path) -> None:
    """Import mmseg and the official Rein modules of the DINOv2 recipe, as the golden scripts do."""
    sys.path.insert(0, str(official))
    golden.load_official(official)


def official_model_config(official: Path) -> dict:
    from mmengine.config import Config

    model = golden.plain(Config.fromfile(str(official / CONFIG)).model)
    backbone = model["backbone"]
    backbone.update(VIT_S, init_cfg=None)
    backbone["reins_config"].update(embed_dims=VIT_S["embed_dim"], num_layers=VIT_S["depth"])
    model["decode_head"]["in_channels"] = [VIT_S["embed_dim"]] * 4
    model["test_cfg"] = dict(mode="whole")
    return model


def build_official(model_config: dict):
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS

    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(copy.deepcopy(model_config)))
    model.init_weights()
    return model


def build_reinseg(model_config: dict, official_model):
    from reinseg import from_official

    # The official backbone's state_dict() keeps only Rein's weights (what its releases hold);
    # the frozen DINOv2 weights are the module's parameters and buffers.
    release = official_model.state_dict()
    backbone = {
        name: value
        for name, value in [*official_model.backbone.named_parameters(), *official_model.backbone.named_buffers()]
        if not name.startswith("reins.")
    }
    return from_official(model_config, release, backbone)


def inputs(batch: int):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 512, 512, generator=generator)
    labels = torch.randint(0, 19, (batch, 512, 512), generator=generator)
    labels[:, :64] = 255
    return images, labels


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(step, warmup: int, repeats: int) -> dict:
    """Median seconds (wall and this process's CPU) of ``step()`` and the peak resident memory
    it adds (MiB) over the resident set before the first (warm-up) step: with an allocator that
    keeps freed memory (reinseg.allocator) the set after a warm-up already holds the step's."""
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return dict(
        seconds=statistics.median(times),
        cpu_seconds=statistics.median(cpu),
        added_mib=(_rss_kib("VmHWM") - before) / 1024,
    )


def optimizer_step_seconds(model, repeats: int) -> dict:
    """Median seconds of one AdamW step over the trainable parameters (random gradients),
    PyTorch's default implementation against ``fused=True``."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    found = {}
    for name, extra in (("default", {}), ("fused", dict(fused=True))):
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **extra)
        optimizer.step()  # the state is made in the first step
        found[f"adamw_{name}"] = measure(optimizer.step, 0, repeats)["cpu_seconds"]
    return found


def _macs(func, args: tuple, out) -> int:
    """Multiply-adds of one matrix-product, convolution or attention call (0 for anything else).

    Attention backward counts what the CPU's flash kernel computes: the scores again, then the
    gradients of values, probabilities, queries and keys (five products of the forward's two).
    Sparse products (reinseg's CSR deformable attention on the CPU, where the official code
    samples with ``grid_sample``) count as the rest of the step, not as dense products.
    """
    op = func.overloadpacket.__name__  # "mm" for mm.default and mm.out
    if op in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"):
        a, b = (args[0], args[1]) if op in ("mm", "bmm") else (args[1], args[2])
        return math.prod(a.shape) * b.shape[-1] if a.layout == b.layout == torch.strided else 0
    if op == "convolution":
        x, weight, transposed = args[0], args[1], args[6]
        # weight (C_out, C_in / groups, k...) or, transposed, (C_in, C_out / groups, k...)
        return (x if transposed else out).numel() * math.prod(weight.shape[1:])
    if op == "convolution_backward":
        grad_output, x, weight, transposed, mask = args[0], args[1], args[2], args[7], args[10]
        per_gradient = (x if transposed else grad_output).numel() * math.prod(weight.shape[1:])
        return per_gradient * (int(mask[0]) + int(mask[1]))
    if "scaled_dot_product" in op:
        backward = op.endswith("_backward")
        q, k, v = args[1:4] if backward else args[0:3]
        scores = math.prod(q.shape[:-1]) * k.shape[-2]  # (B, heads, L) x S
        return scores * (3 * q.shape[-1] + 2 * v.shape[-1] if backward else q.shape[-1] + v.shape[-1])
    return 0


class Products(TorchDispatchMode):
    """Counts the multiply-adds of every matrix product, convolution and attention kernel run
    under it (:func:`_macs`) and the seconds they take, by operation name."""

    def __init__(self) -> None:
        super().__init__()
        self.macs: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        macs = _macs(func, args, out)
        if macs:
            op = func.overloadpacket.__name__
            self.macs[op] = self.macs.get(op, 0) + macs
            self.seconds[op] = self.seconds.get(op, 0.0) + elapsed
        return out


def product_rates(threads: int) -> dict[str, float]:
    """This CPU's float32 multiply-adds per second, the best of five calls each: ``sgemm``, a
    2048^3 matrix product (MKL's), and ``conv3x3``, the pixel decoder's 3x3 convolution at the
    stride-4 level of the step's batch (oneDNN's: ``(2, 256, 128, 128)``, 256 filters)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    maps, filters = torch.randn(2, 256, 128, 128), torch.randn(256, 256, 3, 3)
    calls = {
        "sgemm": (lambda: a @ b, 2048**3),
        "conv3x3": (lambda: F.conv2d(maps, filters, padding=1), maps.numel() * filters[0].numel()),
    }
    return {name: macs / best_seconds(call, 5) for name, (call, macs) in calls.items()}


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    # The allocator was set up before torch loaded (_allocator_before_torch).
    load_official(args.official)
    model_config = official_model_config(args.official)
    official = build_official(model_config)
    side, what = args.child.split("-")
    if what == "check":  # both models on one image: the comparison is of the same computation
        model = build_reinseg(model_config, official).eval()
        official.eval()
        images, _ = inputs(1)
        metas = [dict(img_shape=(512, 512), ori_shape=(512, 512), pad_shape=(512, 512))]
        with torch.no_grad():
            difference = (model.predict(images, mode="whole") - official.inference(images, metas)).abs().max()
        return dict(max_abs_difference=difference.item())
    autocast = False
    if side == "reinseg":
        model = build_reinseg(model_config, official)
        del official
        if args.lever is not None:
            autocast = apply_lever(model, args.lever)
    else:
        model = official
    if what in ("train", "products"):
        model.train()
        images, labels = inputs(2)
        samples = golden.data_samples(labels)

        def step():
            if side == "reinseg":
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    losses = model.loss(images, labels)
                total = losses["loss"]
            else:
                total, _ = model.parse_losses(model.loss(images, samples))
            total.backward()
            model.zero_grad(set_to_none=True)

    else:
        model.eval()
        images, _ = inputs(1)
        metas = [dict(img_shape=(512, 512), ori_shape=(512, 512), pad_shape=(512, 512))]

        @torch.no_grad()
        def step():
            if side == "reinseg":
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    return model.predict(images, mode="whole")
            return model.inference(images, metas)

    found = measure(step, args.warmup, args.repeats)
    if what == "products":
        products = Products()
        with products:
            step()
        # The rates in the same process, right after the step: this machine's speed drifts.
        found.update(macs=products.macs, product_seconds=products.seconds, rates=product_rates(args.threads))
    if what == "train" and side == "reinseg" and args.lever == "none":
        found.update(optimizer_step_seconds(model, args.repeats))
    return found


def run_child(args, name: str, lever: str | None = None) -> dict:
    command = [sys.executable, __file__, "--official", str(args.official), "--threads", str(args.threads)]
    command += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--child", name]
    command += ["--official-allocator", args.official_allocator]
    if lever is not None:
        command += ["--lever", lever]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    print(name, lever or "", found, file=sys.stderr, flush=True)
    return found


def levers(args) -> None:
    """One row per lever: reinseg's train step and inference against the official fp32 ones."""
    train_o, infer_o = run_child(args, "official-train"), run_child(args, "official-infer")
    print(f"torch {torch.__version__}, {args.threads} threads, ViT-S/16 + LoRA-Rein + Mask2Former, 512 px")
    print(
        f"official fp32: train step {train_o['seconds']:.2f} s (CPU {train_o['cpu_seconds']:.2f} s), "
        f"{train_o['added_mib']:.0f} MiB added; inference {infer_o['seconds']:.3f} s "
        f"(CPU {infer_o['cpu_seconds']:.3f} s)\n"
    )
    print(
        "| lever | train step CPU s | / official | memory added MiB | / official | "
        "inference CPU s | / official | numerics it changes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    optimizer = {}
    for lever, (_, _, numerics) in LEVERS.items():
        try:
            train_r = run_child(args, "reinseg-train", lever)
            infer_r = run_child(args, "reinseg-infer", lever)
        except subprocess.CalledProcessError as err:
            print(f"| {lever} | failed: {(err.stderr or '').strip().splitlines()[-1:]} | | | | | | |", flush=True)
            continue
        optimizer.update({k: v for k, v in train_r.items() if k.startswith("adamw_")})
        print(
            f"| {lever} | {train_r['cpu_seconds']:.2f} | {train_r['cpu_seconds'] / train_o['cpu_seconds']:.2f} | "
            f"{train_r['added_mib']:.0f} | {train_r['added_mib'] / train_o['added_mib']:.2f} | "
            f"{infer_r['cpu_seconds']:.3f} | {infer_r['cpu_seconds'] / infer_o['cpu_seconds']:.2f} | {numerics} |",
            flush=True,
        )
    if optimizer:
        print(
            f"\nAdamW step over the trainable parameters (CPU s): default {optimizer['adamw_default']:.4f}, "
            f"fused=True {optimizer['adamw_fused']:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of the official Rein repository")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the plain comparison in fresh processes; report the median ratios"
    )
    parser.add_argument("--levers", action="store_true", help="one row per training lever (see the docstring)")
    parser.add_argument(
        "--products", action="store_true", help="the train steps' matrix products and the floor they set (docstring)"
    )
    parser.add_argument("--only", nargs="+", choices=list(LEVERS), help="with --levers: these levers only")
    parser.add_argument(
        "--official-allocator",
        choices=["system", "keep"],
        default="system",
        help="run the official code with the system allocator (as it ships) or with reinseg's setting",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lever", default=None, choices=list(LEVERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.products and (args.levers or args.rounds != 1):
        parser.error("--products runs once, without --levers or --rounds")
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.levers:
        if args.only:
            for name in list(LEVERS):
                if name not in args.only and name != "none":
                    del LEVERS[name]
        levers(args)
        return
    if args.products:
        products(args)
        return
    compare(args)


# The four measurements of a round, official and reinseg alternating.
NAMES = ("official-train", "reinseg-train", "official-infer", "reinseg-infer")


def compare(args) -> None:
    """The plain comparison, ``--rounds`` times: each round runs the four measurements in fresh
    processes (official and reinseg alternating); the table gives each round's ratios and their
    median (on a shared or frequency-scaling machine a single round's ratio moves by several
    hundredths)."""
    check = run_child(args, "both-check")
    rows: list[dict[str, float]] = []
    for _ in range(args.rounds):
        found = {name: run_child(args, name) for name in NAMES}
        rows.append(
            {
                "train_o": found["official-train"]["seconds"],
                "train_r": found["reinseg-train"]["seconds"],
                "memory_o": found["official-train"]["added_mib"],
                "memory_r": found["reinseg-train"]["added_mib"],
                "infer_o": found["official-infer"]["seconds"],
                "infer_r": found["reinseg-infer"]["seconds"],
            }
        )
    print(
        f"torch {torch.__version__}, {args.threads} threads, ViT-S/16 + LoRA-Rein + Mask2Former, 512 px; "
        f"median of {args.repeats} steps after {args.warmup} per process"
    )
    print(f"scores of the two models differ by at most {check['max_abs_difference']:.1e}\n")
    print(
        "| round | official train s | reinseg train s | ratio | official MiB | reinseg MiB | ratio "
        "| official infer s | reinseg infer s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {"train": [], "memory": [], "infer": []}
    for i, row in enumerate(rows, 1):
        cells = []
        for key, fmt in (("train", ".2f"), ("memory", ".0f"), ("infer", ".3f")):
            official, ours = row[f"{key}_o"], row[f"{key}_r"]
            ratios[key].append(ours / official)
            cells.append(f"{official:{fmt}} | {ours:{fmt}} | {ours / official:.3f}")
        print(f"| {i} | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        print("| median | | | " + " | | | ".join(f"{statistics.median(ratios[k]):.3f}" for k in ratios) + " |")


def products(args) -> None:
    """Each code's train-step products (:class:`Products`) against the 0.5x target."""
    found = {side: run_child(args, f"{side}-products") for side in ("official", "reinseg")}
    official_step = found["official"]["seconds"]
    print(f"torch {torch.__version__}, {args.threads} threads, ViT-S/16 + LoRA-Rein + Mask2Former, 512 px, batch 2")
    print("rates: float32 GMAC/s in each code's process after its step (best of 5), the faster one used\n")
    print(
        "| code | step s | products GMAC | products s | GMAC/s in them | sgemm | conv3x3 | of the rate | the rest s "
        "| products at the rate s | / official step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for side, row in found.items():
        macs, seconds = sum(row["macs"].values()), sum(row["product_seconds"].values())
        rate = max(row["rates"].values())
        print(
            f"| {side} | {row['seconds']:.2f} | {macs / 1e9:.1f} | {seconds:.2f} | {macs / seconds / 1e9:.1f} | "
            f"{row['rates']['sgemm'] / 1e9:.1f} | {row['rates']['conv3x3'] / 1e9:.1f} | {macs / seconds / rate:.0%} | "
            f"{row['seconds'] - seconds:.2f} | {macs / rate:.2f} | {macs / rate / official_step:.3f} |"
        )
    print(f"\n0.5x the official step: {official_step / 2:.2f} s")
    print("\n| operation | official GMAC | official s | reinseg GMAC | reinseg s |")
    print("|---|---|---|---|---|")
    counted = {op for row in found.values() for op in row["macs"]}
    ops = sorted(counted, key=lambda op: -max(row["macs"].get(op, 0) for row in found.values()))
    for op in ops:
        cells = [
            f"{found[side]['macs'].get(op, 0) / 1e9:.1f} | {found[side]['product_seconds'].get(op, 0.0):.2f}"
            for side in found
        ]
        print(f"| `{op}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
