"""gen_core.diffusion: seeded samplers, guidance, losses, autoencoder round trip on real images,
export/reload, and the refusals (mismatched latents, bad labels, bad sampler config)."""

import logging
import math

import pytest
import torch

from benchmarks.ldm_samplers import GaussianEpsilon
from gen_core.errors import LatentMismatchError
from gen_core.config import AutoencoderConfig, ConfigError, DenoiserConfig, EdmConfig, NoiseScheduleConfig, SamplerConfig, config_from_dict
from gen_core.diffusion import (
    AutoencoderRoundTrip, DiffusionGenerator, autoencoder_loss, build_autoencoder, build_denoiser, diffusion_loss, edm_loss, min_snr_weight,
    psnr, sample_diffusion, training_schedule,
)  # fmt: skip
from gen_core.diffusers_pipeline import EDM_TIMESTEP_SCALE, EDMDenoiser, edm_preconditioning, log_sigmas, make_sampler, timestep_sigma
from gen_core.sampling import to_unit
from gen_core.training import autocast_dtype, cooldown
from tests.conftest import REPO, tiny_params, upstream_sections

NUM_CLASSES = 10
TINY_DENOISER = DenoiserConfig(block_out_channels=(32, 32), attention_levels=1, attention_head_dim=8)
TINY_DIT = DenoiserConfig(backbone="dit", dit={"hidden_size": 32, "num_layers": 2, "num_heads": 2})


def tiny_denoiser(backbone: str, channels: int, sample_size: int):
    """TINY_DENOISER or TINY_DIT; the DiT's zero-initialised layers made random, so that its output depends on its weights."""
    net = build_denoiser(TINY_DIT if backbone == "dit" else TINY_DENOISER, channels=channels, sample_size=sample_size, num_classes=NUM_CLASSES)
    with torch.no_grad():
        for parameter in net.parameters() if backbone == "dit" else []:
            if not parameter.any():
                parameter.normal_(0, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_denoiser(TINY_DENOISER, channels=4, sample_size=8, num_classes=NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def label_sensitive_unet(unet):
    import copy

    net = copy.deepcopy(unet)
    with torch.no_grad():
        net.class_embedding.weight.mul_(100)  # an untrained net barely uses labels; make them matter
    return net


@pytest.fixture(scope="module")
def schedule_config():
    return dict(training_schedule(NoiseScheduleConfig()).config)


def sample(unet, schedule_config, labels, seeds, sampler, guidance=2.0, steps=6):
    return sample_diffusion(unet, schedule_config, torch.tensor(labels), seeds, (4, 8, 8), NUM_CLASSES, sampler, steps, guidance)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++", "heun"])
def test_samplers_are_deterministic_per_seed_whatever_the_batch(unet, schedule_config, sampler):
    batch = sample(unet, schedule_config, [1, 2, 3], [10, 11, 12], sampler)
    alone = sample(unet, schedule_config, [2], [11], sampler)
    again = sample(unet, schedule_config, [1, 2, 3], [10, 11, 12], sampler)
    assert torch.equal(batch, again)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)  # sample i does not depend on its batch
    other_seed = sample(unet, schedule_config, [2], [99], sampler)
    assert (other_seed - alone).abs().mean() > 0.1


def test_guidance_changes_samples_and_scale_one_is_conditional(label_sensitive_unet, schedule_config):
    unet = label_sensitive_unet
    conditional = sample(unet, schedule_config, [4, 5], [1, 2], "ddim", guidance=1.0)
    guided = sample(unet, schedule_config, [4, 5], [1, 2], "ddim", guidance=4.0)
    assert (conditional - guided).abs().mean() > 1e-3
    other_class = sample(unet, schedule_config, [7, 5], [1, 2], "ddim", guidance=1.0)
    assert (other_class[0] - conditional[0]).abs().mean() > 1e-4 and torch.allclose(other_class[1], conditional[1], atol=1e-5)


def test_guidance_in_an_interval_guides_only_the_steps_whose_noise_level_lies_in_it(label_sensitive_unet, schedule_config):
    """DPM-Solver++ 10 steps on the linear schedule visit sigma_t = 157.4, 60.3, 25.5, 11.9, 6.1, 3.4, 2.0, 1.24, 0.72, 0.34:
    (0.5, 7] guides the five from 6.1 to 0.72, each with a doubled batch (conditional + null class), the others with one."""
    batches = []

    def counting(sample, timestep, class_labels=None, return_dict=False):
        batches.append(len(sample))
        return label_sensitive_unet(sample, timestep, class_labels=class_labels, return_dict=return_dict)

    def draw(guidance, interval):
        batches.clear()
        return sample_diffusion(counting, schedule_config, torch.tensor([4, 5]), [1, 2], (4, 8, 8), NUM_CLASSES, "dpmsolver++", 10,
                                guidance, guidance_interval=interval)  # fmt: skip

    draw(3.0, (0.5, 7.0))
    assert batches == [2, 2, 2, 2, 4, 4, 4, 4, 4, 2]
    partial = draw(3.0, (5.0, 30.0))
    assert batches == [2, 2, 4, 4, 4, 2, 2, 2, 2, 2]
    everywhere, conditional = draw(3.0, None), draw(1.0, None)
    assert batches == [2] * 10
    assert torch.equal(draw(3.0, (0.0, 1e4)), everywhere) and torch.equal(draw(3.0, (200.0, 1e4)), conditional)
    assert not partial.requires_grad  # sampling records no graph
    assert not torch.equal(partial, everywhere) and not torch.equal(partial, conditional)  # (an untrained net: its guidance at sigma < 30 moves little)


def test_a_timesteps_noise_level_is_the_samplers_own(schedule_config):
    """guided_steps reads sigma_t off the training schedule at each sampler timestep, fractional ones too: Heun's timesteps
    on Karras noise levels map back to the sigmas it steps through."""
    heun = make_sampler("heun", schedule_config)
    heun.set_timesteps(6)
    torch.testing.assert_close(timestep_sigma(log_sigmas(schedule_config), heun.timesteps), heun.sigmas[:-1].float(), rtol=1e-3, atol=0)


def test_out_of_range_label_is_a_clear_error(unet, schedule_config):
    with pytest.raises(ValueError, match=r"class label out of range: got 0\.\.10, model has 0\.\.9"):
        sample(unet, schedule_config, [0, 10], [1, 2], "ddim")
    with pytest.raises(ValueError, match="out of range"):
        sample(unet, schedule_config, [-1], [1], "ddim")


@pytest.mark.parametrize(
    "ldm, message",
    [
        ({"sampler": {"guidance_scale": -0.5}}, "ldm.sampler.guidance_scale: Input should be greater than or equal to 0"),
        ({"sampler": {"num_steps": 0}}, "ldm.sampler.num_steps: Input should be greater than or equal to 1 (got 0)"),
        ({"sampler": {"name": "euler"}}, "ldm.sampler.name: Input should be 'ddpm', 'ddim', 'dpmsolver++' or 'heun'"),
        ({"noise": {"prediction_type": "sample"}}, "ldm.noise.prediction_type:"),
        ({"sampler": {"num_steps": 2000}}, "sampler.num_steps (2000) exceeds noise.num_train_timesteps (1000)"),
        ({"label_dropout": 1.0}, "ldm.label_dropout: Input should be less than 1"),
        ({"denoiser": {"block_out_channels": [48, 64]}}, "block_out_channels must be multiples of 32"),
        ({"noise": {"prediction_type": "edm"}}, "min_snr_gamma must be null with noise.prediction_type edm"),
        ({"edm": {"p_std": 0}}, "ldm.edm.p_std: Input should be greater than 0"),
        ({"denoiser": {"preset": "m", "layers_per_block": 1}}, "ldm.denoiser: preset m sets layers_per_block: leave it out, or set preset: null"),
        ({"denoiser": {"preset": "xl"}}, "ldm.denoiser.preset: Input should be 's', 'm' or 'l'"),
        ({"sampler": {"guidance_interval": [3, 1]}}, "ldm.sampler.guidance_interval: [lo, hi] with 0 <= lo < hi (noise levels sigma_t), got [3.0, 1.0]"),
        ({"sampler": {"guidance_interval": [-1, 1]}}, "ldm.sampler.guidance_interval: [lo, hi] with 0 <= lo < hi"),
        ({"sampler": {"guidance_interval": [1]}}, "ldm.sampler.guidance_interval.1: Field required (got [1])"),
    ],
)  # fmt: skip
def test_sampler_and_denoiser_config_is_validated(ldm, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"ldm": ldm})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_denoiser_presets_set_the_sizes_and_survive_a_round_trip():
    """A preset fills the four sizes; the dumped config (preset and sizes, as runs log it) parses back to itself; the
    default params' explicit sizes are preset s's."""
    from gen_core.config import DENOISER_PRESETS

    assert DenoiserConfig() == DenoiserConfig(**DENOISER_PRESETS["s"])
    counts = []
    for name, sizes in DENOISER_PRESETS.items():
        cfg = config_from_dict({"ldm": {"denoiser": {"preset": name}}}).ldm.denoiser
        assert cfg.model_dump(exclude={"preset", "backbone", "dit"}) == sizes and config_from_dict({"ldm": {"denoiser": cfg.model_dump()}}).ldm.denoiser == cfg
        counts.append(sum(p.numel() for p in build_denoiser(cfg, 4, 8, NUM_CLASSES).parameters()))
    assert counts == [2_799_556, 8_974_276, 16_270_340]  # the README's table (4x8x8 latents, 10 classes)


def test_autoencoder_factor_must_leave_a_latent_grid():
    with pytest.raises(ConfigError, match="downsample_factor must be a power of two"):
        config_from_dict({"autoencoder": {"downsample_factor": 3}})
    with pytest.raises(ConfigError, match="leaves latents under 2x2"):
        config_from_dict({"data": {"resolution": 32}, "autoencoder": {"downsample_factor": 32}})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_per_sample_and_seeded(unet, prediction_type):
    schedule = training_schedule(NoiseScheduleConfig(prediction_type=prediction_type))
    x0, labels = torch.randn(6, 4, 8, 8), torch.arange(6)
    first = diffusion_loss(unet, schedule, x0, labels, NUM_CLASSES, 0.5, torch.Generator().manual_seed(3))
    second = diffusion_loss(unet, schedule, x0, labels, NUM_CLASSES, 0.5, torch.Generator().manual_seed(3))
    assert first.shape == (6,) and torch.equal(first, second) and torch.isfinite(first).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_caps_the_x0_weight_at_gamma(unet, prediction_type):
    """Hang et al.'s weights, from the schedule's alphas: an x0-loss weight of min(SNR, gamma), divided by SNR for an
    epsilon target and by SNR + 1 for a v target; the loss is the plain loss times that weight, sample by sample."""
    schedule = training_schedule(NoiseScheduleConfig(prediction_type=prediction_type))
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    alpha_bar = schedule.alphas_cumprod.double()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)  # 0: ~1e4 (almost no noise), 999: ~4e-5
    expected = [min(s, 5.0) / (s if prediction_type == "epsilon" else s + 1) for s in snr.tolist()]
    assert torch.allclose(min_snr_weight(schedule, timesteps, 5.0).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    if prediction_type == "epsilon":  # below the cap an epsilon loss keeps weight 1; near t=0 it is cut by SNR/gamma
        assert min_snr_weight(schedule, timesteps[-1:], 5.0).item() == 1.0 and min_snr_weight(schedule, timesteps[:1], 5.0).item() < 1e-3

    x0, labels = torch.randn(6, 4, 8, 8), torch.arange(6)
    plain = diffusion_loss(unet, schedule, x0, labels, NUM_CLASSES, 0.5, torch.Generator().manual_seed(3))
    weighted = diffusion_loss(unet, schedule, x0, labels, NUM_CLASSES, 0.5, torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    drawn = torch.randint(0, 1000, (6,), generator=_after_noise(x0, torch.Generator().manual_seed(3)))  # the loss's own timesteps
    assert torch.allclose(weighted, plain * min_snr_weight(schedule, drawn, 5.0), rtol=1e-5)


def _after_noise(x0: torch.Tensor, generator: torch.Generator) -> torch.Generator:
    torch.randn(x0.shape, generator=generator)  # diffusion_loss draws its noise first, then the timesteps
    return generator


def test_edm_preconditioning_follows_the_papers_table():
    """Karras et al. 2022, Table 1: c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4; the loss weight lambda = (s^2 + sd^2) / (s sd)^2 is 1 / c_out^2, so that the effective target
    has unit weight; and D interpolates from the identity (no noise) to the data's mean (all noise)."""
    sigma, sd = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64), 0.5
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sd)
    s = sigma.tolist()
    expected = [[sd**2 / (x**2 + sd**2) for x in s], [x * sd / (x**2 + sd**2) ** 0.5 for x in s], [1 / (x**2 + sd**2) ** 0.5 for x in s],
                [math.log(x) / 4 for x in s]]  # fmt: skip
    for got, want in zip((c_skip, c_out, c_in, c_noise), expected):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(1 / c_out**2, (sigma**2 + sd**2) / (sigma * sd) ** 2, rtol=1e-12, atol=0)
    assert c_skip[0] > 0.9999 and c_out[0] < 0.0021 and c_skip[-1] < 1e-4 and abs(c_out[-1] - sd) < 1e-4


def test_edm_denoiser_reads_each_samplers_timesteps_as_its_noise_levels(schedule_config):
    """Integer timesteps are the schedule's sigma_t = sqrt((1 - abar_t) / abar_t); Heun's fractional ones (Karras noise
    levels, interpolated in log sigma) map back to the very sigmas the scheduler steps with."""
    wrapped = EDMDenoiser(None, schedule_config, 1.0)
    abar = make_sampler("ddpm", schedule_config).alphas_cumprod.double()
    t = torch.tensor([0, 1, 250, 999])
    torch.testing.assert_close(wrapped.sigma(t).double(), ((1 - abar[t]) / abar[t]).sqrt(), rtol=1e-5, atol=0)
    heun = make_sampler("heun", schedule_config)
    torch.testing.assert_close(heun.alphas_cumprod.double(), abar)  # the training schedule's, not the sampler's default betas
    heun.set_timesteps(8)
    torch.testing.assert_close(wrapped.sigma(heun.timesteps), heun.sigmas[:-1].float(), rtol=1e-4, atol=0)


class _IdealDenoiser(torch.nn.Module):
    """The exact F for data that is one point x0: D(x; sigma) = x0 for every x, i.e. F = (x0 - c_skip x) / c_out, recovered
    from the network's inputs (c_in x, 1000 c_noise) the way EDMDenoiser and edm_loss make them."""

    def __init__(self, x0: torch.Tensor, sigma_data: float):
        super().__init__()
        self.x0, self.sigma_data = x0, sigma_data

    def forward(self, scaled, noise_label, class_labels=None, return_dict=False):
        sigma = (noise_label.double() * 4 / EDM_TIMESTEP_SCALE).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm_preconditioning(sigma, self.sigma_data)
        return (((self.x0 - c_skip * scaled.double() / c_in) / c_out).float(),)


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("dpmsolver++", 5), ("heun", 5), ("ddpm", 50)])
def test_an_ideal_edm_network_samples_its_data_with_every_sampler(schedule_config, sampler, steps):
    """Through EDMDenoiser the samplers see the true noise of a one-point distribution, so every one of them (guided
    or not) ends at that point: the VP/VE conversion, the timestep -> sigma map and the preconditioning are consistent."""
    x0 = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    wrapped = EDMDenoiser(_IdealDenoiser(x0, 0.7), schedule_config, 0.7)
    out = sample_diffusion(wrapped, schedule_config, torch.tensor([0, 3]), [1, 2], (4, 8, 8), NUM_CLASSES, sampler, steps, 2.0)
    assert (out - x0.float()).abs().max() < 2e-3, (out - x0.float()).abs().max()


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_dpm_solver_starts_where_a_networks_error_is_not_amplified(beta_schedule):
    """DPM-Solver++'s data prediction x_0 = (x_t - sigma_t eps) / alpha_t multiplies the network's error by sigma_t / alpha_t:
    2e4 at the cosine schedule's t = 999. It starts where lambda_t = ln(alpha_t / sigma_t) >= -5.1 (diffusers'
    lambda_min_clipped): measured, an epsilon off by 0.01 gave samples 29x the data's spread from t = 999, 0.97x so. The
    linear schedule ends at lambda -5.06, so its sampler starts at t = 999 as it always has."""
    config = dict(training_schedule(NoiseScheduleConfig(beta_schedule=beta_schedule)).config)
    sampler = make_sampler("dpmsolver++", config)
    sampler.set_timesteps(10)
    assert (int(sampler.timesteps[0]) == 999) == (beta_schedule == "linear")
    exact, off = (sample_diffusion(GaussianEpsilon(config, 0.5, error), config, torch.zeros(16, dtype=torch.long), list(range(16)),
                                   (4, 8, 8), NUM_CLASSES, "dpmsolver++", 10, 1.0) for error in (0.0, 0.01))  # fmt: skip
    assert 0.75 < float(exact.std()) / 0.5 < 1.0  # 10 steps uniform in t shrink the spread (ldm_samplers.py --gaussian)
    assert abs(float(off.std()) / float(exact.std()) - 1) < 0.1, (float(off.std()), float(exact.std()))


def test_edm_loss_is_the_weighted_denoising_error_per_sample(unet):
    """edm_loss = lambda(sigma) |D(x0 + sigma n; sigma) - x0|^2 per sample, ln sigma ~ N(p_mean, p_std^2), seeded."""
    edm, sd = EdmConfig(), 0.8
    x0, labels = torch.randn(6, 4, 8, 8), torch.arange(6)
    loss = edm_loss(unet, x0, labels, NUM_CLASSES, 0.0, torch.Generator().manual_seed(3), edm, sd)
    again = edm_loss(unet, x0, labels, NUM_CLASSES, 0.0, torch.Generator().manual_seed(3), edm, sd)
    assert loss.shape == (6,) and torch.equal(loss, again) and torch.isfinite(loss).all()
    generator = torch.Generator().manual_seed(3)  # the loss's own draws: the noise, then the noise levels
    noise = torch.randn(x0.shape, generator=generator)
    sigma = (torch.randn(6, generator=generator) * edm.p_std + edm.p_mean).exp().view(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sd)
    x = x0 + sigma * noise
    with torch.no_grad():
        denoised = c_skip * x + c_out * unet(c_in * x, (c_noise * EDM_TIMESTEP_SCALE).flatten(), class_labels=labels, return_dict=False)[0]
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(loss, (weight * (denoised - x0) ** 2).flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError):
        config_from_dict({"ldm": {"noise": {"prediction_type": "edm"}, "min_snr_gamma": 5}})
    assert config_from_dict({"ldm": {"noise": {"prediction_type": "edm"}, "min_snr_gamma": None}}).ldm.edm.sigma_data is None


def test_autoencoder_shapes_follow_the_downsample_factor():
    vae = build_autoencoder(AutoencoderConfig(downsample_factor=8, latent_channels=3, width=8), channels=1)
    latents = vae.encode(torch.zeros(2, 1, 32, 32)).latent_dist.mean
    assert latents.shape == (2, 3, 4, 4) and vae.decode(latents).sample.shape == (2, 1, 32, 32)


@pytest.mark.slow  # 200 training steps in this process: about 37 CPU-s (width 16 at 2e-3: 70 CPU-s, 21.1 dB)
def test_autoencoder_round_trip_on_real_digits(real_digits):
    """200 steps on real MNIST digits must reconstruct held-out digits well above the
    PSNR of predicting the mean image (about 11 dB): the bound is 18 dB."""
    images, _ = real_digits  # (5000, 28, 28) uint8, sorted by label
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(torch.from_numpy(images[:, None])[order], (2, 2, 2, 2))
    train, held_out = to_unit(padded[:4000]), to_unit(padded[4800:])
    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(width=8), channels=1)
    round_trip = AutoencoderRoundTrip(vae)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    amp = autocast_dtype("auto", torch.device("cpu"))  # bf16 where native (AMX); emulated bf16 is far slower (RESULTS.md)
    for step in range(200):  # 21.4 dB measured at 200 steps, 19.1 at 150 (benchmarks/ae_round_trip_steps.py 3e-3 --width 8)
        batch = train[torch.randint(0, len(train), (64,), generator=generator)]
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):  # as the loop's precision auto
            loss, _ = autoencoder_loss(round_trip, batch, "l1", 1e-6, generator)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(held_out).latent_dist.mode()).sample
    mean_image_psnr = psnr(held_out, train.mean(0, keepdim=True).expand_as(held_out)).mean()
    assert mean_image_psnr < 14
    assert psnr(held_out, reconstruction).mean() > 18


@pytest.mark.parametrize("backbone, sampler, edm_sigma_data, interval", [("unet", "ddim", None, None), ("unet", "dpmsolver++", 0.9, None),
                                                                       ("unet", "heun", None, (0.5, 20.0)), ("dit", "dpmsolver++", None, None)])  # fmt: skip
def test_export_and_reload_give_identical_samples(tmp_path, backbone, sampler, edm_sigma_data, interval):
    """The exported model samples as the trained one did: the same weights and the same sampler settings (before, a
    reloaded schedule gave DPM-Solver++ and Heun DDPM's "leading" timesteps, from t = 900, and the in-training model 999)."""
    torch.manual_seed(1)
    vae = build_autoencoder(AutoencoderConfig(width=8), channels=1, scaling_factor=0.7).eval()
    unet = tiny_denoiser(backbone, channels=4, sample_size=8)
    model = DiffusionGenerator(unet, vae, dict(training_schedule(NoiseScheduleConfig()).config), NUM_CLASSES,
                               SamplerConfig(name=sampler, num_steps=4, guidance_scale=2.0, guidance_interval=interval), (1, 32, 32), edm_sigma_data)  # fmt: skip
    model.save_pretrained(tmp_path, {"step": 3})
    assert {p.name for p in tmp_path.iterdir()} == {"unet", "vae", "scheduler", "generator.json", "model_index.json", "genforge_pipeline.py"}
    assert type(DiffusionGenerator.from_pretrained(tmp_path)[0].unet) is type(unet)
    warnings = []  # diffusers logs to its own stderr handler, which does not propagate
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        reloaded, meta = DiffusionGenerator.from_pretrained(tmp_path)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert warnings == []  # quietly: before, a notice to install `accelerate` on every load
    assert meta["step"] == 3 and reloaded.vae.config.scaling_factor == pytest.approx(0.7) and reloaded.edm_sigma_data == edm_sigma_data
    assert reloaded.sampler == model.sampler
    labels, seeds = torch.tensor([0, 5, 9]), [7, 8, 9]
    images = model.sample(labels, seeds)
    assert images.shape == (3, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, reloaded.sample(labels, seeds))


PER_CHANNEL = {"scaling_factor": 1.0, "latents_mean": [0.3, -0.8, 0.0, 0.1], "latents_std": [0.6, 1.3, 1.0, 0.9]}


def per_channel_autoencoder():
    """A 4-channel autoencoder whose config normalises latents per channel, as an export with
    autoencoder.latent_normalisation per_channel is written."""
    vae = build_autoencoder(AutoencoderConfig(width=8), channels=1).eval()
    vae.register_to_config(**PER_CHANNEL)
    return vae


def test_latents_are_normalised_by_one_scale_or_per_channel_and_back():
    from gen_core.diffusers_pipeline import from_denoiser_latents, to_denoiser_latents
    from gen_core.latents import latent_normalisation

    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(width=8), channels=1).eval()
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([2.0, -1.0, 0.0, 0.5])  # posterior means off centre, per channel
    images = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = vae.encode(to_unit(images)).latent_dist.mode()
        one, per = latent_normalisation(vae, images, batch_size=40), latent_normalisation(vae, images, per_channel=True, batch_size=40)
    assert set(one) == {"scaling_factor"} and one["scaling_factor"] == pytest.approx(1 / z.std().item(), rel=1e-5)
    assert torch.equal(to_denoiser_latents(z, one), z * one["scaling_factor"])  # an autoencoder of before: as it was
    assert per["scaling_factor"] == 1.0 and len(per["latents_mean"]) == len(per["latents_std"]) == 4
    normalised = to_denoiser_latents(z, per)
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (normalised.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    assert z.mean(dim=(0, 2, 3)).abs().max() > 0.3  # the per-channel offsets were there to remove
    for config in (one, per):
        assert (from_denoiser_latents(to_denoiser_latents(z, config), config) - z).abs().max() < 1e-5


@pytest.mark.parametrize("space, edm_sigma_data, backbone, interval", [("latent", None, "unet", None), ("pixel", None, "unet", None),
                                                                      ("latent", 1.1, "unet", (0.5, 20.0)), ("latent", None, "dit", None),
                                                                      ("latent per channel", None, "unet", None)])  # fmt: skip
def test_an_export_is_a_diffusers_pipeline_that_draws_genforges_images(tmp_path, space, edm_sigma_data, backbone, interval):
    """DiffusionPipeline.from_pretrained(export) with diffusers alone (the class comes from the genforge_pipeline.py beside
    model_index.json, a DiT's from unet/genforge_dit.py): class ids or names, the exported sampler settings by default,
    and with one generator per image seeded like genforge's samples, the same images (an autoencoder normalising its
    latents per channel too)."""
    from diffusers import DiffusionPipeline

    torch.manual_seed(2)
    vae = build_autoencoder(AutoencoderConfig(width=8), channels=1, scaling_factor=0.7).eval() if space == "latent" else None
    vae = per_channel_autoencoder() if space == "latent per channel" else vae
    unet = tiny_denoiser(backbone, channels=4 if vae else 1, sample_size=8 if vae else 32)
    model = DiffusionGenerator(unet, vae, dict(training_schedule(NoiseScheduleConfig()).config), NUM_CLASSES,
                               SamplerConfig(name="ddim", num_steps=3, guidance_scale=2.0, guidance_interval=interval), (1, 32, 32), edm_sigma_data)  # fmt: skip
    names = [f"class {i}" for i in range(NUM_CLASSES)]
    model.save_pretrained(tmp_path, {"class_names": names})
    pipe = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True, low_cpu_mem_usage=False)
    assert type(pipe).__name__ == "GenforgeLatentDiffusionPipeline" and (pipe.vae is None) == (space == "pixel")
    assert type(pipe.unet).__name__ == type(unet).__name__ and pipe.config.guidance_interval == (list(interval) if interval else None)
    seeds = [4, 5]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    images = pipe(class_labels=[1, "CLASS 8"], generator=generators, output_type="pt").images
    assert images.shape == (2, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert (images * 2 - 1 - model.sample(torch.tensor([1, 8]), seeds)).abs().max() <= 1e-5  # ddim 3 steps, guidance 2: the export's
    other = pipe(class_labels=[1], generator=torch.Generator().manual_seed(4), sampler="ddpm", num_inference_steps=2, guidance_scale=1.0,
                 output_type="pt").images  # fmt: skip
    assert (other * 2 - 1 - model.sample(torch.tensor([1]), [4], sampler="ddpm", num_steps=2, guidance_scale=1.0)).abs().max() <= 1e-5
    assert pipe(class_labels=3, generator=torch.Generator().manual_seed(0), num_inference_steps=1).images[0].size == (32, 32)  # PIL
    with pytest.raises(ValueError, match=r"class label 'dog' out of range: the model has 0\.\.9 \(class 0, class 1"):
        pipe(class_labels=["dog"])


def test_denoiser_that_does_not_match_the_autoencoder_is_refused(tmp_path):
    vae = build_autoencoder(AutoencoderConfig(width=8, latent_channels=4), channels=1)
    unet = build_denoiser(TINY_DENOISER, channels=3, sample_size=8, num_classes=NUM_CLASSES)
    DiffusionGenerator(unet, vae, dict(training_schedule(NoiseScheduleConfig()).config), NUM_CLASSES, SamplerConfig(),
                       (1, 32, 32)).save_pretrained(tmp_path, {})  # fmt: skip
    with pytest.raises(LatentMismatchError, match="denoiser expects 3 latent channels, autoencoder has 4"):
        DiffusionGenerator.from_pretrained(tmp_path)


def test_cached_latents_must_match_the_autoencoder():
    from gen_core.latents import check_latents

    record = {"latent_channels": 4, "scaling_factor": 0.5, "autoencoder_sha256": "a"}
    latents = torch.zeros(2, 4, 8, 8)
    check_latents(record, latents, {"latent_channels": 4, "scaling_factor": 0.5}, "a", "cache")  # matches: no error
    with pytest.raises(LatentMismatchError, match="cache: latents have 4 channels, autoencoder has 3"):
        check_latents(record, latents, {"latent_channels": 3, "scaling_factor": 0.5}, "a", "cache")
    with pytest.raises(LatentMismatchError, match="scaled by 0.5, autoencoder uses 0.6"):
        check_latents(record, latents, {"latent_channels": 4, "scaling_factor": 0.6}, "a", "cache")
    with pytest.raises(LatentMismatchError, match="different autoencoder"):
        check_latents(record, latents, {"latent_channels": 4, "scaling_factor": 0.5}, "b", "cache")
    per_channel = {"latent_channels": 4, **PER_CHANNEL}
    check_latents({**record, **PER_CHANNEL}, latents, per_channel, "a", "cache")
    for stale in (record, {**record, **PER_CHANNEL, "latents_std": [0.6, 1.3, 1.0, 1.0]}):
        with pytest.raises(LatentMismatchError, match=r"other per-channel statistics \(latents_mean, latents_std\)"):
            check_latents({**stale, "scaling_factor": 1.0}, latents, per_channel, "a", "cache")
    with pytest.raises(LatentMismatchError, match="per-channel"):  # per-channel latents, an autoencoder of one scale
        check_latents({**record, **PER_CHANNEL}, latents, {"latent_channels": 4, "scaling_factor": 1.0}, "a", "cache")


# ---------------------------------------------------------------------------
# The autoencoder's PatchGAN term
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layers, patches", [(1, 14), (2, 6), (3, 2)])
def test_patch_discriminator_judges_overlapping_patches(layers, patches):
    from gen_core.diffusion import PatchDiscriminator

    logits = PatchDiscriminator(channels=3, width=8, layers=layers)(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 1, patches, patches) and torch.isfinite(logits).all()


def test_patch_hinge_loss_and_the_adaptive_weight_follow_their_formulas():
    from gen_core.diffusion import adaptive_weight, patch_hinge_loss

    real, fake = torch.tensor([[2.0, 0.5]]), torch.tensor([[-2.0, 0.0]])
    assert patch_hinge_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(8, 5)
    out = layer(x)
    reconstruction_loss, adversarial_loss = out.pow(2).mean(), -3.0 * out.sum()
    weight = adaptive_weight(reconstruction_loss, adversarial_loss, layer.weight)
    g_rec = torch.autograd.grad(out.pow(2).mean(), layer.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(-3.0 * out.sum(), layer.weight, retain_graph=True)[0]
    assert weight.item() == pytest.approx((g_rec.norm() / (g_adv.norm() + 1e-4)).item(), rel=1e-6) and not weight.requires_grad
    (reconstruction_loss + weight * adversarial_loss).backward()  # the graphs were kept for the step's backward
    assert adaptive_weight(1e6 * layer.weight.sum(), 1e-12 * layer.weight.sum(), layer.weight).item() == 1e4  # clamped


def test_the_denoisers_cooldown_holds_the_rate_then_falls_along_a_half_cosine_and_a_run_resumes_across_it():
    rates = [cooldown(step, 1000, 0.2) for step in range(1000)]
    assert rates[:800] == [1.0] * 800 and rates[900] == pytest.approx(0.5) and 0 < rates[-1] < 1e-4
    assert all(later < earlier for earlier, later in zip(rates[800:], rates[801:]))  # falling at every step of the cooldown
    assert cooldown(999, 1000, 1.0) < 1e-4 and cooldown(500, 1000, 1.0) == pytest.approx(0.5)  # 1: a cosine over the whole run
    assert {cooldown(step, 1000, 0.0) for step in range(1000)} == {1.0}  # 0 (the default): constant
    # a schedule, like total_steps: changing it resumes the run (same run name) instead of training afresh
    on = config_from_dict({"ldm": {"lr_cooldown": 0.2}})
    assert on.ldm.resume_signature() == config_from_dict({}).ldm.resume_signature()
    with pytest.raises(ConfigError, match="ldm.lr_cooldown"):
        config_from_dict({"ldm": {"lr_cooldown": 1.5}})


def test_the_adversarial_block_off_leaves_run_names_alone_and_needs_ddp_on():
    from gen_core.config import load_config
    from pipelines.common import StageError
    from pipelines.train_autoencoder import training_job

    off, on = load_config(REPO / "params.yaml"), load_config(REPO / "params.yaml", ["autoencoder.adversarial.weight=0.5"])
    assert "adversarial" not in off.autoencoder.resume_signature() and on.autoencoder.resume_signature()["adversarial"]["weight"] == 0.5
    classifier_term = load_config(REPO / "params.yaml", ["autoencoder.perceptual=classifier"])  # likewise the perceptual network
    assert "perceptual" not in off.autoencoder.resume_signature() and classifier_term.autoencoder.resume_signature()["perceptual"] == "classifier"
    with pytest.raises(StageError) as err:
        training_job(load_config(REPO / "params.yaml", ["autoencoder.adversarial.weight=0.5", "ray.strategy=fsdp"]))
    assert str(err.value) == ("autoencoder.adversarial: needs ray.strategy ddp, not fsdp (its adaptive weight takes gradients at the "
                              "decoder's last layer, which fsdp and deepspeed shard)")


def test_latent_normalisation_is_read_at_export_so_a_run_keeps_its_name_and_a_wrong_value_is_refused():
    from gen_core.config import load_config

    per_channel = load_config(REPO / "params.yaml", ["autoencoder.latent_normalisation=per_channel"])
    assert per_channel.autoencoder.resume_signature() == load_config(REPO / "params.yaml").autoencoder.resume_signature()
    with pytest.raises(ConfigError, match=r"params.yaml: autoencoder.latent_normalisation: Input should be 'global' or 'per_channel' \(got 'channel'\)$"):
        load_config(REPO / "params.yaml", ["autoencoder.latent_normalisation=channel"])


@pytest.mark.slow
def test_the_autoencoder_trains_with_its_patchgan_term_on_two_workers_and_checkpoints_the_discriminator(tiny_upstream):
    """The stage under DDP on 2 workers: the term starts after its warm-up (D and G losses logged from there), the
    discriminator and its optimizer are in the checkpoint, and a resume (by one worker, in the stage's process) continues them."""
    import csv
    import json

    from tests.conftest import run_cli, write_params

    root = tiny_upstream / "adversarial"
    root.mkdir()
    params = tiny_params(**upstream_sections(tiny_upstream), ray={"strategy": "ddp"})
    params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    params["autoencoder"] = {**params["autoencoder"], "adversarial": {"weight": 0.5, "start_step": 2, "d_width": 8},
                             "checkpoint_every_steps": 4, "log_every_steps": 1}  # fmt: skip
    params["ray"] = {**params["ray"], "storage_path": str(root / "runs")}
    params["outputs"] = {"autoencoder": {"out_dir": str(root / "ae"), "losses_file": str(root / "losses.csv"), "metrics_file": str(root / "ae.json")}}
    command = ["python", "-m", "pipelines.train_autoencoder", "--params", str(write_params(root, params))]
    first = run_cli([*command, "--set", "autoencoder.total_steps=4"], REPO)
    assert first.returncode == 0 and "2 worker(s) on cpu, ddp" in first.stdout, first.stderr[-3000:]
    (checkpoint,) = root.glob("runs/*/checkpoint_0000004")
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert {"disc", "opt_disc", "vae", "opt_vae"} <= set(state)
    # resumed by one worker of 2 CPUs (the default layout: in the stage's own process) from the two workers' checkpoint
    second = run_cli([*command, "--set", "autoencoder.total_steps=6", "--set", "ray.num_workers=1", "--set", "ray.cpus_per_worker=2"], REPO)
    assert second.returncode == 0 and "resumed from checkpoint at step 4 (ddp, written by 2 worker(s))" in second.stdout, second.stderr[-3000:]
    assert "1 worker(s) on cpu, ddp" in second.stdout and "RayTrainWorker" not in second.stdout
    rows = list(csv.DictReader((root / "losses.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["d_loss"]) == 0 for r in rows[:2]) and all(float(r["d_loss"]) > 0 and float(r["adv_scale"]) > 0 for r in rows[2:])
    assert json.loads((root / "ae.json").read_text())["step"] == 6


def test_compile_is_how_a_step_runs_so_switching_it_resumes_the_same_run_and_a_wrong_value_is_refused():
    from gen_core.config import load_config

    plain = load_config(REPO / "params.yaml")
    compiled = load_config(REPO / "params.yaml", ["autoencoder.compile=true", "ldm.compile=true"])
    assert compiled.autoencoder.compile and compiled.ldm.compile and not plain.autoencoder.compile and not plain.ldm.compile
    assert compiled.autoencoder.resume_signature() == plain.autoencoder.resume_signature()
    assert compiled.ldm.resume_signature() == plain.ldm.resume_signature()
    with pytest.raises(ConfigError, match=r"params.yaml: ldm.compile: Input should be a valid boolean"):
        load_config(REPO / "params.yaml", ["ldm.compile=sometimes"])
