"""The GAN generator in ONNX (gen_core.onnx_gan): ONNX Runtime gives the torch images for the same labels and
seeds, at any batch size, and refuses a label the model does not have."""

import pytest
import torch

from gen_core.generators import GanGenerator
from gen_core.io import sha256_file
from gen_core.models import GeneratorSpec, build_generator
from gen_core.onnx_gan import OnnxGanGenerator, export_gan_onnx


@pytest.fixture(params=["dcgan", "resnet"])
def exported(request, tmp_path):
    torch.manual_seed(0)
    spec = GeneratorSpec(resolution=32, channels=1, num_classes=10, z_dim=32, width=16, arch=request.param)
    generator = build_generator(spec)
    with torch.no_grad():  # non-trivial batch-norm statistics: eval mode must use them, not the batch's
        for module in generator.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "generator.onnx"
    digest = export_gan_onnx(generator, path)
    return GanGenerator(generator.eval()), OnnxGanGenerator(path, spec.z_dim, spec.num_classes, threads=1), path, digest


def test_onnx_runtime_gives_the_torch_images_for_the_same_seeds(exported):
    torch_generator, onnx_generator, path, digest = exported
    assert digest == sha256_file(path)
    labels, seeds = torch.arange(64) % 10, list(range(100, 164))
    with torch.no_grad():
        expected = torch_generator.sample(labels, seeds)
    images = onnx_generator.sample(labels, seeds)
    assert images.shape == (64, 1, 32, 32) and expected.std() > 0.01
    assert (images - expected).abs().max() <= 1e-4
    # the batch axis is dynamic and a sample depends only on its own label and seed
    assert (onnx_generator.sample(labels[5:6], seeds[5:6]) - expected[5:6]).abs().max() <= 1e-4


def test_a_label_the_model_does_not_have_is_refused(exported):
    _, onnx_generator, _, _ = exported
    with pytest.raises(ValueError, match=r"class label out of range: got 3..10, model has 0..9"):
        onnx_generator.sample(torch.tensor([3, 10]), [1, 2])
