"""Guidance against a guide network (`ldm.sampler.guidance: autoguidance | guide_null | guide_blend`, `ldm.guide_dir`): the sampling
formula, export and reload (genforge's own loader and diffusers' DiffusionPipeline), the guide's compatibility checks, the
config's refusals, and the train_ldm stage guiding its in-training evaluations and exporting the guide."""

import json

import pytest
import torch

from gen_core.config import AutoencoderConfig, ConfigError, NoiseScheduleConfig, SamplerConfig, load_config
from gen_core.diffusion import DiffusionGenerator, build_autoencoder, build_denoiser, load_guide, sample_diffusion, training_schedule
from gen_core.errors import LatentMismatchError
from tests.conftest import REPO, run_cli, tiny_params, upstream_sections, write_params
from tests.test_diffusion import NUM_CLASSES, TINY_DENOISER, tiny_denoiser

SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def schedule_config():
    return dict(training_schedule(NoiseScheduleConfig()).config)


def label_sensitive(seed: int, backbone: str = "unet", channels: int = 4, sample_size: int = 8):
    """A tiny random denoiser whose output depends on its class labels (an untrained one barely uses them)."""
    torch.manual_seed(seed)
    net = tiny_denoiser(backbone, channels, sample_size)
    if backbone == "unet":
        with torch.no_grad():
            net.class_embedding.weight.mul_(100)
    return net


@pytest.fixture(scope="module")
def model_net():
    return label_sensitive(0)


@pytest.fixture(scope="module")
def guide_net():
    return label_sensitive(1)


def draw(net, schedule_config, guidance_scale, guide=None, guidance="cfg", interval=None, labels=(4, 5, 7), seeds=(1, 2, 3), blend=None):
    return sample_diffusion(net, schedule_config, torch.tensor(labels), list(seeds), SHAPE, NUM_CLASSES, "dpmsolver++", 6, guidance_scale,
                            guidance_interval=interval, guide=guide, guidance=guidance, guide_blend=blend)  # fmt: skip


class Elementwise(torch.nn.Module):
    """A denoiser whose prediction for each sample is its own elementwise function of that sample and its label, so it
    does not depend on how samples are batched (a real network's convolutions round differently per batch size)."""

    def __init__(self, seed: int):
        super().__init__()
        self.table = torch.randn(NUM_CLASSES + 1, generator=torch.Generator().manual_seed(seed))

    def forward(self, sample, timestep, class_labels=None, return_dict=False):
        return (0.3 * sample + self.table[class_labels].view(-1, 1, 1, 1),)


def test_guiding_against_the_model_itself_gives_the_conditional_model_or_classifier_free_guidance(schedule_config):
    """out = ref + w (cond - ref): with the model as its own guide, autoguidance's ref is cond itself (the conditional
    model at any scale) and guide_null's is the model's null class (classifier-free guidance, two batches instead of one)."""
    net = Elementwise(0)
    conditional, cfg = draw(net, schedule_config, 1.0), draw(net, schedule_config, 3.0)
    assert (conditional - cfg).abs().mean() > 0.1  # the labels matter to this net
    assert torch.equal(draw(net, schedule_config, 3.0, net, "autoguidance"), conditional)
    assert torch.equal(draw(net, schedule_config, 3.0, net, "guide_null"), cfg)
    other = draw(net, schedule_config, 3.0, Elementwise(1), "autoguidance")
    assert (other - conditional).abs().mean() > 0.1 and (other - cfg).abs().mean() > 0.1


def test_a_blend_of_the_guides_classes_is_each_end_and_the_formula_between(schedule_config):
    """guide_blend a: ref = a guide(c) + (1 - a) guide(null). a = 1 is autoguidance and a = 0 guide_null, bit for bit; with
    the model as its own guide, out = ref + w (c - ref) = null + (a + (1 - a) w) (c - null): classifier-free guidance at
    a + (1 - a) w (at w = 3, a = 0.5: 2)."""
    net, guide = Elementwise(0), Elementwise(1)
    assert torch.equal(draw(net, schedule_config, 3.0, guide, "guide_blend", blend=1.0), draw(net, schedule_config, 3.0, guide, "autoguidance"))
    assert torch.equal(draw(net, schedule_config, 3.0, guide, "guide_blend", blend=0.0), draw(net, schedule_config, 3.0, guide, "guide_null"))
    torch.testing.assert_close(draw(net, schedule_config, 3.0, net, "guide_blend", blend=0.5), draw(net, schedule_config, 2.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(draw(net, schedule_config, 3.0, net, "guide_blend", blend=0.25), draw(net, schedule_config, 2.5), rtol=1e-5, atol=1e-5)
    assert (draw(net, schedule_config, 3.0, guide, "guide_blend", blend=0.5) - draw(net, schedule_config, 2.0)).abs().mean() > 0.1


def test_a_weaker_guide_moves_the_samples_by_the_formula_at_each_step(model_net, guide_net, schedule_config):
    """Each guided step calls the model on the conditional batch and the guide once (its labels: the conditional ones for
    autoguidance, the null class for guide_null); scale 1 and steps outside the interval never call the guide."""
    calls = []

    def recording(name, net):
        def call(sample, timestep, class_labels=None, return_dict=False):
            calls.append((name, len(sample), sorted(set(class_labels.tolist()))))
            return net(sample, timestep, class_labels=class_labels, return_dict=return_dict)

        return call

    model, guide = recording("model", model_net), recording("guide", guide_net)
    auto = draw(model, schedule_config, 2.0, guide, "autoguidance")
    assert calls == [("model", 3, [4, 5, 7]), ("guide", 3, [4, 5, 7])] * 6
    calls.clear()
    null = draw(model, schedule_config, 2.0, guide, "guide_null")
    assert calls == [("model", 3, [4, 5, 7]), ("guide", 3, [NUM_CLASSES])] * 6
    calls.clear()
    assert torch.equal(draw(model, schedule_config, 1.0, guide, "autoguidance"), draw(model_net, schedule_config, 1.0))
    assert calls == [("model", 3, [4, 5, 7])] * 6  # guidance 1: the conditional model alone
    calls.clear()
    draw(model, schedule_config, 2.0, guide, "guide_blend", blend=0.3)
    assert calls == [("model", 3, [4, 5, 7]), ("guide", 6, [4, 5, 7, NUM_CLASSES])] * 6  # both of the guide's classes, one batch
    calls.clear()
    draw(model, schedule_config, 2.0, guide, "autoguidance", interval=(1.0, 30.0))  # dpmsolver++ 6 steps: sigma_t 157.4, 33.5, 9.5, 3.4, 1.5, 0.58
    assert [name for name, _, _ in calls] == ["model", "model", *["model", "guide"] * 3, "model"]
    conditional = draw(model_net, schedule_config, 1.0)
    assert (auto - conditional).abs().mean() > 1e-3 and (null - auto).abs().mean() > 1e-3
    assert not auto.requires_grad and torch.isfinite(auto).all() and torch.isfinite(null).all()


def test_the_guide_and_the_guidance_must_agree(model_net, guide_net, schedule_config):
    with pytest.raises(ValueError, match="guidance autoguidance needs a guide network"):
        draw(model_net, schedule_config, 2.0, None, "autoguidance")
    with pytest.raises(ValueError, match="guidance cfg takes no guide network"):
        draw(model_net, schedule_config, 2.0, guide_net, "cfg")
    with pytest.raises(ValueError, match="unknown guidance 'auto'"):
        draw(model_net, schedule_config, 2.0, guide_net, "auto")
    with pytest.raises(ValueError, match=r"guide_blend None: a share in \[0, 1\] with guidance guide_blend, None otherwise \(here guide_blend\)"):
        draw(model_net, schedule_config, 2.0, guide_net, "guide_blend")
    with pytest.raises(ValueError, match=r"guide_blend 0.5: .* None otherwise \(here autoguidance\)"):
        draw(model_net, schedule_config, 2.0, guide_net, "autoguidance", blend=0.5)
    with pytest.raises(ValueError, match=r"guide_blend 1.5: a share in \[0, 1\]"):
        draw(model_net, schedule_config, 2.0, guide_net, "guide_blend", blend=1.5)
    with pytest.raises(LatentMismatchError, match="sampler guidance guide_null needs a guide"):
        DiffusionGenerator(model_net, None, schedule_config, NUM_CLASSES, SamplerConfig(guidance="guide_null"), (1, 32, 32))


@pytest.mark.parametrize("guidance, blend, guide_backbone, guide_sigma_data",
                         [("autoguidance", None, "unet", None), ("guide_null", None, "dit", 0.8), ("guide_blend", 0.6, "unet", None)])
def test_an_autoguided_export_carries_its_guide_and_draws_the_same_images_through_diffusers(tmp_path, schedule_config, guidance, blend,
                                                                                           guide_backbone, guide_sigma_data):  # fmt: skip
    """save_pretrained writes guide/ beside unet/ (a DiT guide with its class file; an EDM guide's sigma_data in the
    config); DiffusionGenerator.from_pretrained and DiffusionPipeline.from_pretrained both sample through it, with
    genforge's images."""
    from diffusers import DiffusionPipeline

    torch.manual_seed(3)
    vae = build_autoencoder(AutoencoderConfig(width=8), channels=1, scaling_factor=0.7).eval()
    sampler = SamplerConfig(name="ddim", num_steps=3, guidance_scale=2.0, guidance=guidance, guide_blend=blend)
    model = DiffusionGenerator(label_sensitive(0), vae, schedule_config, NUM_CLASSES, sampler, (1, 32, 32), None,
                               label_sensitive(1, guide_backbone), guide_sigma_data)  # fmt: skip
    model.save_pretrained(tmp_path, {"class_names": [f"c{i}" for i in range(NUM_CLASSES)]})
    assert (tmp_path / "guide" / "config.json").exists() and (guide_backbone == "dit") == (tmp_path / "guide" / "genforge_dit.py").exists()
    reloaded, meta = DiffusionGenerator.from_pretrained(tmp_path)
    assert reloaded.sampler.guidance == guidance and reloaded.sampler.guide_blend == blend and meta["guide_edm_sigma_data"] == guide_sigma_data
    assert type(reloaded.guide) is type(model.guide) and reloaded.guide_edm_sigma_data == guide_sigma_data
    labels, seeds = torch.tensor([1, 8]), [4, 5]
    images = model.sample(labels, seeds)
    assert torch.equal(reloaded.sample(labels, seeds), images)
    unguided = DiffusionGenerator(model.unet, vae, schedule_config, NUM_CLASSES, sampler.model_copy(update={"guidance": "cfg", "guide_blend": None}), (1, 32, 32))
    assert (unguided.sample(labels, seeds) - images).abs().mean() > 1e-3  # the guide is what made them
    pipe = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True, low_cpu_mem_usage=False)
    assert type(pipe.guide).__name__ == type(model.guide).__name__ and pipe.config.guidance == guidance and pipe.config.guide_blend == blend
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    through_diffusers = pipe(class_labels=[1, "C8"], generator=generators, output_type="pt").images
    assert (through_diffusers * 2 - 1 - images).abs().max() <= 1e-5


def test_a_guide_must_share_the_models_latents_schedule_and_classes(tmp_path, schedule_config):
    """load_guide reads an export and names the first thing that differs: the autoencoder (by its weights' sha256), the
    latent shape, the classes, the noise schedule."""
    vae = build_autoencoder(AutoencoderConfig(width=8), channels=1, scaling_factor=0.7).eval()
    guide = DiffusionGenerator(label_sensitive(1), vae, schedule_config, NUM_CLASSES, SamplerConfig(), (1, 32, 32))
    guide.save_pretrained(tmp_path, {"autoencoder": {"sha256": "aaaa"}, "step": 7})
    network, sigma_data = load_guide(tmp_path, schedule_config, SHAPE, NUM_CLASSES, "latent", "aaaa")
    assert sigma_data is None and all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), guide.unet.state_dict().values()))
    other_schedule = dict(training_schedule(NoiseScheduleConfig(beta_schedule="squaredcos_cap_v2")).config)
    for args, message in [
        ((schedule_config, SHAPE, NUM_CLASSES, "latent", "bbbb"), "its autoencoder sha256 is aaaa, the model's bbbb"),
        ((schedule_config, (8, 8, 8), NUM_CLASSES, "latent", "aaaa"), r"its latent shape is \[4, 8, 8\], the model's \[8, 8, 8\]"),
        ((schedule_config, SHAPE, 3, "latent", "aaaa"), "its classes is 10, the model's 3"),
        ((schedule_config, (1, 32, 32), NUM_CLASSES, "pixel", None), "its space is latent, the model's pixel"),
        ((other_schedule, SHAPE, NUM_CLASSES, "latent", "aaaa"), "its noise schedule is .*'linear'.*, the model's .*'squaredcos_cap_v2'"),
    ]:
        with pytest.raises(LatentMismatchError, match=f"^{tmp_path}: not a guide for this model: {message}"):
            load_guide(tmp_path, *args)
    with pytest.raises(LatentMismatchError, match=r"missing: no exported guide \(train it first with train_ldm"):
        load_guide(tmp_path / "missing", schedule_config, SHAPE, NUM_CLASSES, "latent", "aaaa")


def test_guidance_against_a_guide_needs_one_is_read_at_export_and_is_the_ldm_familys_only():
    params = REPO / "params.yaml"
    guided = load_config(params, ["ldm.sampler.guidance=autoguidance", "ldm.guide_dir=models/ldm-guide"])
    assert guided.ldm.resume_signature() == load_config(params).ldm.resume_signature()  # a finished run re-exports with it
    with pytest.raises(ConfigError, match="sampler.guidance guide_null needs guide_dir"):
        load_config(params, ["ldm.sampler.guidance=guide_null"])
    with pytest.raises(ConfigError, match="Input should be 'cfg', 'autoguidance', 'guide_null' or 'guide_blend'"):
        load_config(params, ["ldm.sampler.guidance=auto"])
    blended = load_config(params, ["ldm.sampler.guidance=guide_blend", "ldm.sampler.guide_blend=0.5", "ldm.guide_dir=models/ldm-guide"])
    assert blended.ldm.sampler.guide_blend == 0.5
    for sets, message in [(["ldm.sampler.guidance=guide_blend"], "guidance guide_blend needs guide_blend"),
                          (["ldm.sampler.guide_blend=0.5"], r"guide_blend applies to guidance guide_blend only \(here cfg\)"),
                          (["ldm.sampler.guidance=guide_blend", "ldm.sampler.guide_blend=2"], "guide_blend: Input should be less than or equal to 1")]:
        with pytest.raises(ConfigError, match=message):
            load_config(params, [*sets, "ldm.guide_dir=models/ldm-guide"])
    with pytest.raises(ConfigError, match="the text-to-image family guides with cfg only"):
        load_config(params, ["t2i.sampler.guidance=autoguidance"])


@pytest.mark.slow
def test_train_ldm_refuses_a_guide_that_does_not_fit_then_guides_its_evaluations_and_exports_the_guide(tmp_path, tiny_upstream):
    """A pixel-space tiny run with `ldm.sampler.guidance: autoguidance`: a guide of other classes is refused in one line
    before training; a fitting one (an export of the same schedule and image shape) guides the in-training evaluations,
    is copied into the export and recorded in generator.json."""
    params = tiny_params(**upstream_sections(tiny_upstream), ldm={"space": "pixel", "total_steps": 10},  # one checkpoint, one evaluation
                         outputs={"ldm": {"out_dir": str(tmp_path / "ldm"), "losses_file": str(tmp_path / "losses.csv"),
                                          "eval_file": str(tmp_path / "eval.csv")}},
                         ray={"storage_path": str(tmp_path / "runs")})  # fmt: skip
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    path = write_params(tmp_path, params)
    cfg = load_config(path)
    schedule = dict(training_schedule(cfg.ldm.noise).config)
    for name, classes in (("wrong", 3), ("guide", NUM_CLASSES)):
        torch.manual_seed(5)
        net = build_denoiser(TINY_DENOISER, channels=1, sample_size=32, num_classes=classes)
        DiffusionGenerator(net, None, schedule, classes, SamplerConfig(), (1, 32, 32)).save_pretrained(tmp_path / name, {"step": 9})
    stage = ["python", "-m", "pipelines.train_ldm", "--params", str(path), "--set", "ldm.sampler.guidance=autoguidance"]
    refused = run_cli([*stage, "--set", f"ldm.guide_dir={tmp_path / 'wrong'}"], REPO)
    assert refused.returncode != 0 and not (tmp_path / "runs").exists()
    assert refused.stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'wrong'}: not a guide for this model: its classes is 3, the model's 10")
    trained = run_cli([*stage, "--set", f"ldm.guide_dir={tmp_path / 'guide'}"], REPO)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "evaluation at step 10" in trained.stdout and len((tmp_path / "eval.csv").read_text().splitlines()) == 2
    meta = json.loads((tmp_path / "ldm" / "generator.json").read_text())
    assert meta["sampler"]["guidance"] == "autoguidance" and meta["guide"]["dir"] == str(tmp_path / "guide") and meta["guide"]["step"] == 9
    exported, _ = DiffusionGenerator.from_pretrained(tmp_path / "ldm")
    guide, _ = DiffusionGenerator.from_pretrained(tmp_path / "guide")
    assert all(torch.equal(a, b) for a, b in zip(exported.guide.state_dict().values(), guide.unet.state_dict().values()))
