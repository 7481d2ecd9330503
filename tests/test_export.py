"""ONNX export: onnxruntime's logits against PyTorch's (the oracle: the same checkpoint run by
reinseg's PyTorch model, itself checked against the official code in test_official.py)."""

import pytest
import torch
from conftest import tiny_model_config

from reinseg.build import build_segmentor
from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint, segmentor_from_checkpoint
from reinseg.cli import main
from reinseg.config import Config, to_dict


def needs_onnx():
    """onnxruntime, after skipping a test that exports without the [export] extra (imported
    only by the tests that export: onnx and onnxscript take 1.6 s to import)."""
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason="ONNX export needs the [export] extra (onnx, onnxscript, onnxruntime)")
    return pytest.importorskip("onnxruntime", reason="ONNX export needs the [export] extra (onnxruntime)")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return _checkpoint_of("rein", tmp_path / "model.ckpt")


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """The tiny checkpoint and its dynamic graph, written by ``reinseg export --dynamic --no-fold``
    (about 30 s: made once for the tests that read it)."""
    needs_onnx()
    folder = tmp_path_factory.mktemp("dynamic")
    checkpoint = _checkpoint_of("rein", folder / "model.ckpt")
    target = folder / "model.onnx"
    assert main(["export", str(checkpoint), "--dynamic", "--no-fold", "--output", str(target)]) == 0
    return checkpoint, target


def onnx_logits(path, images: torch.Tensor) -> torch.Tensor:
    session = needs_onnx().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: images.numpy()})[0])


@torch.no_grad()
def assert_parity(checkpoint, graph, images):
    segmentor, _ = segmentor_from_checkpoint(checkpoint)
    expected = segmentor.eval().encode_decode(images)
    ours = onnx_logits(graph, images)
    assert ours.shape == expected.shape == (images.shape[0], 19, *images.shape[-2:])
    assert (ours - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_fixed_size_export_matches_pytorch(tiny_checkpoint, tmp_path, capsys):
    needs_onnx()
    import onnx

    target = tmp_path / "out" / "model.onnx"
    assert (
        main(["export", str(tiny_checkpoint), "--format", "onnx", "--size", "64", "96", "--output", str(target)]) == 0
    )
    assert "opset 18" in capsys.readouterr().out
    graph = onnx.load(str(target))
    onnx.checker.check_model(graph)
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    assert_parity(tiny_checkpoint, target, torch.randn(1, 3, 64, 96))
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]  # no temporary left


@pytest.mark.slow
def test_dynamic_export_follows_the_input_size(dynamic_export):
    """Traced at 64x64 (the stored position grid, used as it is), run at other grids (interpolated)
    and batch sizes."""
    checkpoint, target = dynamic_export
    for shape in ((1, 3, 64, 64), (2, 3, 96, 64), (1, 3, 48, 128)):
        assert_parity(checkpoint, target, torch.randn(*shape))


def test_folded_rein_computes_what_rein_does():
    from reinseg.export import FoldedRein
    from reinseg.rein import Rein

    rein = Rein(num_layers=3, embed_dims=24, patch_size=16, query_dims=8, token_length=5, lora_dim=4).eval()
    folded = FoldedRein(rein)
    x = torch.randn(2, 1 + 12, 24)
    with torch.no_grad():
        for layer in range(3):
            torch.testing.assert_close(folded(x, layer), rein(x, layer), rtol=0, atol=1e-6)
        torch.testing.assert_close(folded.queries(), rein.queries(), rtol=0, atol=1e-6)


GRIDS = [(4, 4), (4, 6), (6, 4), (7, 3), (2, 2), (32, 64)]


@pytest.mark.parametrize(
    ("name", "grid"), [(n, g) for n in ("dinov2_vits14", "dinov2_vits14_reg", "clip_vitl14") for g in GRIDS]
)
def test_traceable_position_embedding_is_the_families_interpolation(name, grid):
    """The dynamic graph's matrix form equals the backbone's own (golden-tested) interpolation:
    DINOv2's offset bicubic, antialiased for the models with registers and for plain ViTs (CLIP)."""
    from reinseg.export import _traceable_positions

    model = tiny_model_config()
    model.backbone.name = name
    backbone = build_segmentor(model).backbone
    vit = backbone.vit
    vit.pos_embed.data.normal_()
    expected = backbone.family.position_embedding(vit, grid)
    with _traceable_positions(backbone, dynamic=True) as traceable:
        assert traceable.active
        traced = backbone.family.position_embedding(vit, grid)
    # float32 rounding only (the sums run in another order): assert_close's float32 defaults.
    torch.testing.assert_close(traced, expected)


def test_a_sam_checkpoint_is_refused_before_exporting(tmp_path, capsys):
    model = tiny_model_config()
    model.backbone.name = "sam_vitb16"
    model.backbone.timm_kwargs = dict(embed_dim=32, depth=4, num_heads=2, global_attn_indexes=[1, 3], window_size=2)
    checkpoint = save_checkpoint(
        tmp_path / "sam.ckpt", to_dict(Config(model=model)), checkpoint_state_dict(build_segmentor(model))
    )
    target = tmp_path / "sam.onnx"
    assert main(["export", str(checkpoint), "--output", str(target)]) == 2
    assert "ONNX export of sam backbones is not supported" in capsys.readouterr().err
    assert not target.exists()


def test_missing_vfm_weights_are_named_and_nothing_is_written(tmp_path, capsys):
    model = tiny_model_config()
    segmentor = build_segmentor(model)
    config = to_dict(Config(model=model))
    config["model"]["backbone"]["checkpoint"] = str(tmp_path / "gone" / "dinov2_converted.pth")
    save_checkpoint(tmp_path / "model.ckpt", config, checkpoint_state_dict(segmentor))
    target = tmp_path / "out" / "model.onnx"
    assert main(["export", str(tmp_path / "model.ckpt"), "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert "dinov2_converted.pth" in err and "model.ckpt" in err
    assert not target.parent.exists() or not any(target.parent.iterdir())


def test_a_size_off_the_patch_grid_is_refused(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    assert main(["export", str(tiny_checkpoint), "--size", "64", "90", "--output", str(target)]) == 2
    assert "--size 64 90" in capsys.readouterr().err
    assert not target.exists()


def _tiny_config(tuning: str):
    """The tiny model with Rein, SET or FADA tokens of the tiny Rein's sizes."""
    model = tiny_model_config()
    model.tuning = tuning
    if tuning in ("set", "fada"):
        options = getattr(model, tuning)
        options.token_length, options.lora_dim, options.query_dims = 8, 4, 32
    return model


def _checkpoint_of(tuning: str, path, img_size: int = 64):
    model = _tiny_config(tuning)
    model.backbone.img_size = img_size
    torch.manual_seed(0)
    segmentor = build_segmentor(model, load_backbone_weights=False)
    return save_checkpoint(path, to_dict(Config(model=model)), checkpoint_state_dict(segmentor))


@pytest.fixture(scope="module")
def fada_checkpoint(tmp_path_factory):
    return _checkpoint_of("fada", tmp_path_factory.mktemp("fada") / "fada.ckpt", img_size=48)  # 3 x 3 by default


@pytest.mark.parametrize(
    "options, message",
    [
        (["--dynamic"], "--dynamic: FADA's Haar split takes the token grid as a square"),
        (["--size", "64", "96"], "--size 64 96: FADA needs a square patch grid with an even side, got 4x6"),
        ([], "the default size 48x48 (the backbone's img_size): FADA needs a square patch grid with an even side"),
        (["--size", "48", "48"], "got 3x3 patches"),
    ],
)
def test_fada_is_exported_at_one_square_size_with_an_even_side(fada_checkpoint, tmp_path, capsys, options, message):
    """FADA's graph takes the square grid it was traced at alone: a dynamic or another-shaped
    export is refused before exporting (onnxruntime failed on a reshape at the check's size)."""
    checkpoint = fada_checkpoint
    target = tmp_path / "fada.onnx"
    assert main(["export", str(checkpoint), *options, "--output", str(target)]) == 2
    assert message in capsys.readouterr().err
    assert not target.exists()


@pytest.mark.parametrize("value", ["0", "-1e-3", "nan", "inf"])
def test_a_tolerance_that_is_not_positive_and_finite_is_refused_first(tmp_path, capsys, monkeypatch, value):
    """Refused before the checkpoint is read (inf would accept any graph, even one of another
    output shape, whose difference is inf)."""
    import reinseg.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "segmentor_from_checkpoint", lambda *a, **k: pytest.fail("read the checkpoint"))
    target = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "model.ckpt"), f"--tolerance={value}", "--output", str(target)]) == 2
    assert f"--tolerance {float(value)}: must be a positive, finite number" in capsys.readouterr().err
    assert not target.exists()


@pytest.mark.slow
def test_set_exports_within_a_tolerance_of_its_own(tmp_path, capsys):
    """SET's graphs differ from PyTorch's by more than the default 1e-4 (its phase, ``atan2`` of
    a spectrum, follows an FFT's last bits): ``--tolerance`` accepts what onnxruntime gives, and
    a tolerance under the measured difference refuses the graph."""
    needs_onnx()
    from reinseg.export import check_parity, export_onnx

    checkpoint = _checkpoint_of("set", tmp_path / "set.ckpt")
    target = tmp_path / "set.onnx"
    assert main(["export", str(checkpoint), "--tolerance", "1e-2", "--output", str(target)]) == 0
    segmentor, _ = segmentor_from_checkpoint(checkpoint)
    with torch.no_grad():  # the export's own check (its images, seed 1), run again on the written graph
        error = check_parity(segmentor.eval(), target, (64, 64))
    assert f"64x64: {error:.1e}" in capsys.readouterr().out
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = segmentor.eval().encode_decode(images)
    assert (onnx_logits(target, images) - expected).abs().max().item() <= 1e-2
    # 1.9e-4 with torch 2.14.1 and onnxruntime 1.32: never 0, so a tolerance under it exists.
    assert error > 0, "SET's graph matched PyTorch exactly: its phase no longer follows the FFT's last bits"
    with pytest.raises(RuntimeError, match="> --tolerance"):
        export_onnx(checkpoint, tmp_path / "refused.onnx", tolerance=error / 2)
    assert not (tmp_path / "refused.onnx").exists()


@pytest.mark.parametrize("tuning", ["rein", "set", "fada"])
def test_folding_keeps_what_each_rein_computes(tuning):
    """Only plain Rein folds; SET and FADA refine otherwise and are exported as they are (their
    folded form gave 0.12 off for SET and a shape error for FADA)."""
    from reinseg.export import FoldedRein, fold_rein

    torch.manual_seed(0)
    segmentor = build_segmentor(_tiny_config(tuning), load_backbone_weights=False).eval()
    folded = fold_rein(segmentor)
    assert isinstance(folded.backbone.rein, FoldedRein) == (tuning == "rein")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded.encode_decode(images), segmentor.encode_decode(images), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_cnn_is_traced_at_its_configured_size_by_default(tmp_path, monkeypatch):
    """A CNN has no ViT grid to take the size from: its ``model.backbone.img_size`` is used."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from test_cnn import tiny_cnn_config

    import reinseg.export as export

    model = tiny_cnn_config()
    model.backbone.img_size = 96
    checkpoint = save_checkpoint(
        tmp_path / "cnn.ckpt", to_dict(Config(model=model)), checkpoint_state_dict(build_segmentor(model))
    )
    traced = []

    def record(segmentor, size, dynamic, fold):
        traced.append(size)
        raise RuntimeError("recorded")  # stop before the export itself

    monkeypatch.setattr(export, "segmentor_to_onnx", record)
    with pytest.raises(RuntimeError, match="recorded"):
        export.export_onnx(checkpoint, tmp_path / "cnn.onnx")
    assert traced == [(96, 96)]


@pytest.mark.slow
def test_a_dynamic_graph_of_a_model_whose_images_mix_keeps_batch_one(dynamic_export):
    """SET's and FADA's refinement depends on the batch (``mixes_batch``): their graph takes one
    image, as predict runs them; H and W stay free. A model that does not mix keeps a free batch."""
    import onnx

    from reinseg.export import segmentor_to_onnx

    def input_dims(graph):
        (dims,) = [[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
        return dims

    checkpoint, target = dynamic_export
    free = input_dims(onnx.load(str(target)))
    assert isinstance(free[0], str) and free[1] == 3 and all(isinstance(d, str) for d in free[2:])
    segmentor, _ = segmentor_from_checkpoint(checkpoint)
    segmentor.backbone.rein.mixes_batch = True
    assert segmentor.mixes_batch
    fixed = input_dims(onnx.load_from_string(segmentor_to_onnx(segmentor.eval(), (64, 64), dynamic=True, fold=False)))
    assert fixed[:2] == [1, 3] and all(isinstance(d, str) for d in fixed[2:])
