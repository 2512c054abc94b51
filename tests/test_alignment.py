"""Representation alignment (`ldm.alignment`, gen_core.alignment; REPA with the classifier stage's features): the loss and
its pooling, the projector's tap on both backbones, the denoising loss left as it was, gradients only where the tapped
state comes from, the frozen target, the config's signature, and the train_ldm stage training with it and exporting
the denoiser alone."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from gen_core.alignment import AlignedDenoiser, ClassifierTarget
from gen_core.config import ConfigError, EdmConfig, NoiseScheduleConfig, load_config
from gen_core.diffusion import DiffusionGenerator, alignment_loss, diffusion_loss, edm_loss, training_schedule
from gen_core.models import Classifier
from tests.conftest import REPO, run_cli, tiny_params, upstream_sections, write_params
from tests.test_diffusion import NUM_CLASSES, tiny_denoiser


def test_alignment_loss_is_one_minus_cosine_on_the_coarser_grid():
    torch.manual_seed(0)
    features = torch.randn(3, 16, 8, 8)
    assert torch.allclose(alignment_loss(features, features), torch.zeros(3), atol=1e-6)
    assert torch.allclose(alignment_loss(-features, features), torch.full((3,), 2.0), atol=1e-6)
    assert torch.allclose(alignment_loss(features * 5.0, features), torch.zeros(3), atol=1e-6)  # scale-free
    fine = features.repeat_interleave(4, -1).repeat_interleave(4, -2)  # a 32x32 grid that pools back to `features`
    assert torch.allclose(alignment_loss(fine, features), torch.zeros(3), atol=1e-5)
    assert torch.allclose(alignment_loss(features, fine), torch.zeros(3), atol=1e-5)
    orthogonal = torch.zeros(1, 2, 1, 1)
    orthogonal[0, 0] = 1.0
    assert alignment_loss(orthogonal, orthogonal.flip(1)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_aligned_denoiser_predicts_as_its_denoiser_and_projects_an_early_state(backbone):
    torch.manual_seed(0)
    net = tiny_denoiser(backbone, channels=4, sample_size=8)
    aligned = AlignedDenoiser(net, target_channels=24, projector_width=16)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    prediction, projected = aligned(x, t, class_labels=y)
    assert torch.equal(prediction, net(x, t, class_labels=y, return_dict=False)[0])
    assert projected.shape == (2, 24, 8, 8)
    assert aligned._hidden == []  # nothing held between calls


def test_the_denoising_loss_is_unchanged_and_the_alignment_reaches_only_the_layers_below_the_tap():
    torch.manual_seed(0)
    net = tiny_denoiser("unet", channels=4, sample_size=8)
    aligned = AlignedDenoiser(net, target_channels=24, projector_width=16)
    schedule = training_schedule(NoiseScheduleConfig())
    x0, labels, target = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3]), torch.randn(4, 24, 8, 8)
    plain = diffusion_loss(net, schedule, x0, labels, NUM_CLASSES, 0.5, torch.Generator().manual_seed(3), 5.0)
    loss, alignment = diffusion_loss(aligned, schedule, x0, labels, NUM_CLASSES, 0.5, torch.Generator().manual_seed(3), 5.0, target)
    assert torch.equal(loss, plain) and alignment.shape == (4,) and ((alignment >= 0) & (alignment <= 2)).all()
    alignment.mean().backward()
    reached = {name.split(".")[1] for name, p in aligned.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"conv_in", "down_blocks", "time_embedding", "class_embedding"} <= reached
    assert not reached & {"mid_block", "up_blocks", "conv_out"}  # above the tap: untouched by the alignment term
    assert all(p.grad is not None for p in aligned.projector.parameters())
    sd = 1.0
    edm_plain = edm_loss(net, x0, labels, NUM_CLASSES, 0.0, torch.Generator().manual_seed(3), EdmConfig(), sd)
    edm_aligned, _ = edm_loss(aligned, x0, labels, NUM_CLASSES, 0.0, torch.Generator().manual_seed(3), EdmConfig(), sd, target)
    assert torch.equal(edm_plain, edm_aligned)


def test_the_classifier_target_is_its_last_convolution_frozen():
    torch.manual_seed(0)
    classifier = Classifier(channels=1, num_classes=NUM_CLASSES, width=8).eval()
    target = ClassifierTarget(classifier)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    features = target.train()(images)  # stays in eval mode: running statistics, whatever the caller does
    assert features.shape == (2, 32, 8, 8) and target.channels == 32 and (features >= 0).all()
    expected = classifier.features_net[:11](images)  # conv-bn-relu-pool x2, conv-bn-relu
    assert torch.allclose(features, expected) and not features.requires_grad
    assert not any(p.requires_grad for p in target.parameters())


def test_alignment_is_off_by_default_and_named_only_when_on():
    params = REPO / "params.yaml"
    default = load_config(params)
    assert default.ldm.alignment.weight == 0 and "alignment" not in default.ldm.resume_signature()
    on = load_config(params, ["ldm.alignment.weight=0.5"])
    assert on.ldm.resume_signature()["alignment"] == {"weight": 0.5, "projector_width": 256}
    with pytest.raises(ConfigError, match="weight: Input should be greater than or equal to 0"):
        load_config(params, ["ldm.alignment.weight=-1"])


@pytest.mark.slow
def test_train_ldm_aligns_to_the_classifier_logs_the_term_and_exports_the_denoiser_alone(tmp_path, tiny_upstream):
    """A pixel-space tiny run with `ldm.alignment.weight: 0.5`: without the classifier it is refused in one line before
    Ray starts; with it the alignment term is logged beside the loss, and the export is a plain denoiser that loads and
    samples (the projector is dropped)."""
    params = tiny_params(**upstream_sections(tiny_upstream), ldm={"space": "pixel", "total_steps": 10, "log_every_steps": 5,
                                                               "evaluation": {"every_steps": None}},  # what is checked needs none
                         outputs={"ldm": {"out_dir": str(tmp_path / "ldm"), "losses_file": str(tmp_path / "losses.csv"),
                                          "eval_file": str(tmp_path / "eval.csv")}},
                         ray={"storage_path": str(tmp_path / "runs")})  # fmt: skip
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    path = write_params(tmp_path, params)
    stage = ["python", "-m", "pipelines.train_ldm", "--params", str(path), "--set", "ldm.alignment.weight=0.5"]
    refused = run_cli([*stage, "--set", f"classifier.out_dir={tmp_path / 'none'}"], REPO)
    assert refused.returncode != 0 and not (tmp_path / "runs").exists()
    assert refused.stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'none'}: no trained classifier (run the classifier stage first)")
    trained = run_cli(stage, REPO)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "aligned to the classifier's features (weight 0.5; REPA)" in trained.stdout
    rows = list(csv.DictReader((tmp_path / "losses.csv").open()))
    assert rows and all(0 <= float(row["alignment"]) <= 2 for row in rows), rows
    weights = load_file(str(tmp_path / "ldm" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any(key.startswith(("projector", "denoiser.")) for key in weights)
    model, meta = DiffusionGenerator.from_pretrained(tmp_path / "ldm")
    assert meta["step"] == 10 and model.sample(torch.tensor([0, 1]), [0, 1], num_steps=2).shape == (2, 1, 32, 32)
    assert json.loads((tmp_path / "ldm" / "generator.json").read_text())["family"] == "ldm"
