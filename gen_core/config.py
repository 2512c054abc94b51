"""One typed, validated config for a genforge run.

`params.yaml` is parsed once into `RunConfig`. Every section is a frozen pydantic
model that rejects unknown keys, so a typo or an out-of-range value fails before
any work starts, with one line that names the key:

    params.yaml: gan.lr_g: Input should be greater than 0 (got -0.1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params file that cannot be turned into a RunConfig. The message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf / .nan are refused everywhere


# ---------------------------------------------------------------------------
# Sections, one per DVC stage
# ---------------------------------------------------------------------------


class DataConfig(_Section):
    """`prepare`: source -> validated uint8 shards + manifest."""

    source: Literal["fashion_mnist", "mnist", "mnist5k", "digits", "image_folder"] = "fashion_mnist"
    # Directory of idx files (fashion_mnist, mnist) or of class sub-folders (image_folder).
    # Local path or s3:// URL. None means the offline default for the source.
    source_uri: str | None = None
    resolution: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    resize: Literal["pad", "resize"] = "pad"  # pad keeps pixels exact; resize is bicubic
    max_train_images: int | None = Field(20_000, ge=1)  # None: all
    eval_images: int = Field(1000, ge=10)
    shard_images: int = Field(10_000, ge=100)
    on_bad_image: Literal["error", "skip"] = "error"  # also for unmatched or malformed pairs
    # image_folder only: pairs for image-to-image models (pix2pix.condition: pairs). folders: A/<class>/<file> is the
    # input of B/<class>/<file>; side_by_side: each image is A on the left half, B on the right. none: plain images.
    pairs: Literal["none", "folders", "side_by_side"] = "none"
    split_seed: int = 0
    out_dir: str = "data/prepared"

    @model_validator(mode="after")
    def _power_of_two(self) -> "DataConfig":
        if self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two (got {self.resolution})")
        if self.pairs != "none" and self.source != "image_folder":
            raise ValueError(f"pairs {self.pairs}: user pairs come from an image_folder source (got {self.source}; pix2pix.condition edges makes pairs from any)")
        return self


class ClassifierConfig(_Section):
    """`classifier`: small CNN used for conditional accuracy and domain-feature FID."""

    width: int = Field(32, ge=4)
    feature_dim: int = Field(128, ge=8)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0
    out_dir: str = "models/classifier"
    metrics_file: str = "metrics/classifier.json"


class InceptionConfig(_Section):
    """Where the FID Inception network comes from. `package` works offline."""

    source: Literal["package", "url"] = "package"
    url: str = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
    sha256: str | None = None  # required for source=url; downloads are never trusted unverified
    batch_size: int = Field(25, ge=1)  # the features are the same to the bit at any batch size
    # auto: ONNX Runtime for fp32 features on a CPU (2.2x torch there, same features to 1e-6), torch for
    # bf16 and on GPUs. Precision is the evaluation protocol's (evaluate.protocols.<name>.inception_precision).
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"


class RefStatsConfig(_Section):
    """`ref_stats`: reference statistics and the real-vs-real floor of the evaluation protocol in use,
    in <out_dir>/<protocol>/."""

    inception: InceptionConfig = InceptionConfig()
    out_dir: str = "data/ref_stats"


EVAL_METRIC_MODES: dict[str, str] = {
    "fid_classifier": "min", "fid": "min", "class_accuracy": "max", "recall_classifier": "max", "recall": "max", "diversity": "max",
}  # fmt: skip


class TrainingEvalConfig(_Section):
    """Evaluation during training: at every `every_steps` and at the last step (each also a checkpoint step),
    the EMA model's samples on fixed seeds (sample i: class i mod K, seed evaluate.seed + i), spread over every rank, are measured against the protocol's reference set. The curves go to MLflow
    and to outputs.<section>.eval_file (DVC plots); the export is the best checkpoint by `metric` (or the
    last); `patience` stops a run after that many evaluations without improvement."""

    every_steps: int | None = Field(None, ge=1)  # null: no evaluation during training
    num_samples: int = Field(500, ge=10)
    inception: bool = False  # also Inception FID, recall and precision (slow on a CPU: ~10 img/s)
    metric: Literal["fid_classifier", "fid", "class_accuracy", "recall_classifier", "recall", "diversity"] = "fid_classifier"
    export: Literal["best", "last"] = "best"
    patience: int | None = Field(None, ge=1)  # evaluations without improvement before stopping; null: never stop early
    # "mode collapse suspected" warning when a class's sample diversity (mean pairwise classifier-feature distance)
    # falls under this fraction of the real images' of that class; null: no warning
    collapse_warning: float | None = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _metric_measured(self):
        if self.metric in ("fid", "recall") and not self.inception:
            raise ValueError(f"evaluation.metric {self.metric} needs evaluation.inception: true")
        return self


class DiffusionTrainingEvalConfig(TrainingEvalConfig):
    """A diffusion model's evaluation during training: also the classifier-free guidance its samples are drawn with.
    The export samples at sampler.guidance_scale; judging checkpoints at a lower scale keeps the choice of the
    best one from trading diversity for class accuracy (RESULTS.md: at guidance 3 the 6,000-step quality run
    exported step 1000; judged at 1.5 the 3,000-step run exported step 2000, FID 31.3 against 39.4).
    A diffusion run exports its last step by default: the judge, at any fixed scale, scores a longer-trained model's
    sharper samples as worse where Inception's FID says better (RESULTS.md, sessions 50 and 68-69)."""

    export: Literal["best", "last"] = "last"
    guidance_scale: float | None = Field(None, ge=0)  # null: sampler.guidance_scale (what the export samples with)


class TrainingConfig(_Section):
    """What every training stage shares: length, batch, precision, checkpoint and log cadence.
    Each model family subclasses it with its own defaults and knobs. Where a stage writes is not
    here but in `outputs` (OutputsConfig): a section says what a run is, not where it goes."""

    # Fields that may change between a checkpoint and the run that resumes it; every other field
    # is part of the resume signature (a changed value trains afresh in a run directory of its own).
    resumable_fields: ClassVar[frozenset[str]] = frozenset(
        {"total_steps", "checkpoint_every_steps", "checkpoints_to_keep", "log_every_steps", "sample_grid_seed", "evaluation"}
    )

    # Names the run, not what it is: part of the run directory's name, not of the resume signature. One per
    # family, so renaming one family's run (to train it afresh) leaves the other families' DVC stages up to date.
    run_name: str = Field("genforge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # <ray.storage_path>/<run_name>-<kind>-<signature>
    total_steps: int = Field(2000, ge=1)
    global_batch_size: int = Field(64, ge=1)  # split evenly over ray.num_workers
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware runs it natively
    seed: int = 0
    checkpoint_every_steps: int = Field(250, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)
    log_every_steps: int = Field(50, ge=1)
    sample_grid_seed: int = 1234
    # No check that checkpoint_every_steps fits in total_steps: the last step always checkpoints, so a run
    # shorter than the interval (`dvc exp run -S gan.total_steps=50`) checkpoints once, at its end.

    def is_eval_step(self, step: int) -> bool:
        """Whether the loop evaluates after `step` completed steps (at the last step too, when evaluating at all).
        Generator sections (gan, ldm) have an `evaluation`; the autoencoder's own measure is its export's rFID."""
        evaluation = getattr(self, "evaluation", None)
        every = evaluation.every_steps if evaluation is not None else None
        return every is not None and (step % every == 0 or step == self.total_steps)

    def is_log_step(self, step: int) -> bool:
        """Whether the loop logs after `step` completed steps (the last step always)."""
        return step % self.log_every_steps == 0 or step == self.total_steps

    def is_checkpoint_step(self, step: int) -> bool:
        """Whether the loop checkpoints after `step` completed steps: every checkpoint_every_steps, every
        evaluation step (the best evaluated step is exported from its checkpoint) and the last step."""
        return step % self.checkpoint_every_steps == 0 or step == self.total_steps or self.is_eval_step(step)

    def resume_signature(self) -> dict:
        """What a checkpoint must share with this section to be resumed: every field but `resumable_fields` and the run's name."""
        return self.model_dump(mode="json", exclude={*self.resumable_fields, "run_name"})


class GanModelConfig(_Section):
    """The GAN's networks: a preset of gen_core.models.GAN_ARCHS and its sizes. Resolution and channels come from `data`."""

    arch: Literal["dcgan", "resnet"] = "resnet"  # resnet: SNGAN-style blocks; dcgan: the seed's baseline (README)
    z_dim: int = Field(64, ge=1)
    g_width: int = Field(16, ge=8)  # channels at the highest resolution, doubled per downsample
    d_width: int = Field(16, ge=8)
    spectral_norm: bool = True
    mbstd_group: int = Field(0, ge=0)  # D's minibatch standard deviation over groups of this many samples; 0: off


class GanRegularizationConfig(_Section):
    """Gradient penalties of the D loss (gen_core.losses). 0 switches one off."""

    r1_gamma: float = Field(0.0, ge=0)  # zero-centred penalty gamma/2 |grad D(real)|^2
    r2_gamma: float = Field(0.0, ge=0)  # the same on fakes (R3GAN uses both)
    gp_lambda: float = Field(0.0, ge=0)  # WGAN-GP on interpolates; only with loss: wgan
    interval: int = Field(1, ge=1)  # lazy: every k-th D step with weight k; D's rate and betas scaled by k/(k+1)


class GanScheduleConfig(_Section):
    """Ramps over the first `ramp_kimg` thousand images (cosine from the start value to the configured one, then
    constant), as R3GAN ramps its rates and penalties. null: no ramp."""

    ramp_kimg: float | None = Field(None, gt=0)
    lr_start_ratio: float = Field(1.0, gt=0)  # the learning rates start at this multiple of lr_g / lr_d
    gamma_start_ratio: float = Field(1.0, gt=0)  # r1/r2 gamma start at this multiple of theirs


class GanConfig(TrainingConfig):
    """`train_gan`: Ray Train run of the conditional GAN."""

    total_steps: int = Field(2400, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)  # with evaluation every 500: each checkpoint is an evaluation's
    model: GanModelConfig = GanModelConfig()
    loss: Literal["nonsaturating", "hinge", "wgan", "rpgan"] = "hinge"  # rpgan: relativistic pairing (R3GAN)
    regularization: GanRegularizationConfig = GanRegularizationConfig()
    augment: list[Literal["color", "translation", "cutout"]] = []  # DiffAugment policy for every D input; []: off
    schedule: GanScheduleConfig = GanScheduleConfig()
    lr_g: float = Field(2e-4, gt=0, le=1)
    lr_d: float = Field(4e-4, gt=0, le=1)  # TTUR: D at 2x the learning rate of G
    adam_beta1: float = Field(0.0, ge=0, lt=1)
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    d_steps_per_g_step: int = Field(1, ge=1)
    ema_halflife_kimg: float = Field(10.0, gt=0)  # EMA of G: half-life in thousands of images
    ema_rampup_ratio: float | None = Field(0.05, gt=0)  # half-life <= this x images seen; null: off
    evaluation: TrainingEvalConfig = TrainingEvalConfig(every_steps=500)  # evaluation during training

    @model_validator(mode="after")
    def _objective(self):
        r = self.regularization
        if r.gp_lambda and self.loss != "wgan":
            raise ValueError(f"regularization.gp_lambda is WGAN-GP's penalty and needs loss: wgan (got {self.loss}); "
                             "zero-centred penalties are r1_gamma / r2_gamma")  # fmt: skip
        if self.loss == "wgan" and not (r.gp_lambda or self.model.spectral_norm):
            raise ValueError("loss wgan needs a Lipschitz constraint on D: regularization.gp_lambda > 0 or model.spectral_norm: true")
        if len(set(self.augment)) != len(self.augment):
            raise ValueError(f"augment lists a transform twice: {self.augment}")
        return self

    @property
    def penalised(self) -> bool:
        r = self.regularization
        return bool(r.r1_gamma or r.r2_gamma or r.gp_lambda)


class AdversarialConfig(_Section):
    """The autoencoder's PatchGAN term, as in the latent-diffusion autoencoders (Esser et al. 2021, Rombach et al. 2022):
    a patch discriminator on reconstructions vs images (hinge loss), its generator term scaled by the adaptive weight
    |grad rec| / |grad adv| at the decoder's last layer, times `weight`, from `start_step` on (a warm-up first)."""

    weight: float = Field(0.0, ge=0)  # 0: off. The LDM recipe: 0.5
    start_step: int = Field(0, ge=0)  # the discriminator and the term start here
    d_width: int = Field(32, ge=8)  # channels of D's first convolution, doubled per downsample (at most 8x)
    d_layers: int = Field(2, ge=1, le=4)  # stride-2 convolutions: 32x32 images -> 6x6 patches with 2
    lr_d: float = Field(1e-4, gt=0, le=1)  # Adam(0.5, 0.9), as the recipe's


class AutoencoderConfig(TrainingConfig):
    """`train_autoencoder`: KL-regularised autoencoder (diffusers AutoencoderKL) for latent diffusion."""

    # rfid_images only sizes the export's reconstruction FID; latent_normalisation is measured at export; compile is how the
    # same step runs
    resumable_fields: ClassVar[frozenset[str]] = TrainingConfig.resumable_fields | {"rfid_images", "latent_normalisation", "compile"}

    downsample_factor: int = Field(4, ge=1, le=32)  # latents are resolution / factor on a side
    latent_channels: int = Field(4, ge=1)
    width: int = Field(16, ge=8)  # channels at full resolution, doubled per downsample
    layers_per_block: int = Field(1, ge=1)
    reconstruction_loss: Literal["l1", "mse"] = "l1"
    kl_weight: float = Field(1e-6, ge=0)  # small: the KL only keeps latents near N(0, I) in scale
    perceptual_weight: float = Field(1.0, ge=0)  # perceptual term beside the pixel loss (CompVis' autoencoders: LPIPS x 1.0); 0: off
    perceptual: Literal["lpips", "classifier"] = "lpips"  # LPIPS-VGG16, or the distance in the pipeline's own classifier's features
    perceptual_images: int | None = Field(None, ge=1)  # of each rank's batch, how many get the (costly) LPIPS term; None: all
    lr: float = Field(1e-3, gt=0, le=1)
    total_steps: int = Field(400, ge=1)
    # torch.compile (inductor) the round trip and the frozen LPIPS network: 1.27x steps on a 2-core AMX Xeon, after a
    # one-off compilation of about 90 s (benchmarks/RESULTS.md); needs a C++ compiler on CPU. Off: bit-for-bit repeatable runs
    compile: bool = False
    sample_grid_seed: int = 0
    rfid_images: int | None = Field(500, ge=10)  # eval images whose reconstructions get an Inception FID; None: all
    adversarial: AdversarialConfig = AdversarialConfig()
    # how the export normalises latents for the denoiser: "global" one scale, 1/std over all channels (Stable Diffusion);
    # "per_channel" each channel's mean and std (EDM2 on SD latents; diffusers' latents_mean / latents_std)
    latent_normalisation: Literal["global", "per_channel"] = "global"

    def resume_signature(self) -> dict:
        """The adversarial block counts only when it is on, and the perceptual network only when it is not the LPIPS
        of before the choice existed, so runs from before either existed keep their names."""
        signature = super().resume_signature()
        if not self.adversarial.weight:
            signature.pop("adversarial")
        if self.perceptual == "lpips":
            signature.pop("perceptual")
        return signature

    @model_validator(mode="after")
    def _power_of_two(self):
        if self.downsample_factor & (self.downsample_factor - 1):
            raise ValueError(f"downsample_factor must be a power of two (got {self.downsample_factor})")
        if self.width % min(self.width, 32):
            raise ValueError(f"width must be a multiple of 32 when above 32 (got {self.width})")
        return self


class LatentsConfig(_Section):
    """`encode_latents`: the train split's latents (posterior means), cached once for train_ldm."""

    batch_size: int = Field(500, ge=1)
    out_dir: str = "data/latents"


# Named denoiser sizes (parameter counts in the README): s is the 15-minute default's, m and l for longer runs
DENOISER_PRESETS = {
    "s": {"block_out_channels": (64, 128), "layers_per_block": 1, "attention_levels": 1, "attention_head_dim": 32},
    "m": {"block_out_channels": (96, 192), "layers_per_block": 2, "attention_levels": 1, "attention_head_dim": 32},
    "l": {"block_out_channels": (128, 256), "layers_per_block": 2, "attention_levels": 2, "attention_head_dim": 64},
}
# DiT sizes (gen_core.dit; parameter counts in the README). l is DiT-S's width and depth (Peebles & Xie 2023)
DIT_PRESETS = {
    "s": {"hidden_size": 128, "num_layers": 6, "num_heads": 4},
    "m": {"hidden_size": 256, "num_layers": 8, "num_heads": 4},
    "l": {"hidden_size": 384, "num_layers": 12, "num_heads": 6},
}


def _apply_preset(data, presets: dict):
    """A `preset` key's sizes merged into the section's raw fields; a field given that the preset sets differently is refused."""
    if not isinstance(data, dict) or data.get("preset") is None:
        return data
    sizes = presets.get(data["preset"])
    if sizes is None:
        return data  # the Literal names the choices
    norm = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
    clashes = [key for key in sizes if key in data and norm(data[key]) != sizes[key]]
    if clashes:
        raise ValueError(f"preset {data['preset']} sets {', '.join(clashes)}: leave {'them' if len(clashes) > 1 else 'it'} out, or set preset: null")
    return {**data, **sizes}


class DitConfig(_Section):
    """The transformer denoiser (gen_core.dit.GenforgeDiT: adaLN-Zero blocks over patch_size x patch_size patches of the
    latent). A `preset` (a key of DIT_PRESETS) sets the three sizes at once; null: the fields as given."""

    preset: Literal["s", "m", "l"] | None = None
    hidden_size: int = Field(128, ge=4)
    num_layers: int = Field(6, ge=1)
    num_heads: int = Field(4, ge=1)
    patch_size: int = Field(1, ge=1)  # 1: a token per latent pixel (8x8 latents: 64 tokens)
    mlp_ratio: float = Field(4.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        return _apply_preset(data, DIT_PRESETS)

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of 4 and of num_heads ({self.num_heads})")
        return self


class DenoiserConfig(_Section):
    """The denoiser: `backbone` unet, diffusers UNet2DModel with a class embedding and self-attention in the lowest
    `attention_levels` (a `preset`, a key of DENOISER_PRESETS, sets its four sizes at once; null: the fields as given),
    or dit, the transformer of the `dit` section. The class table has one extra "null" class for guidance either way."""

    backbone: Literal["unet", "dit"] = "unet"
    preset: Literal["s", "m", "l"] | None = None
    block_out_channels: tuple[int, ...] = Field((64, 128), min_length=1)
    layers_per_block: int = Field(1, ge=1)
    attention_levels: int = Field(1, ge=0)
    attention_head_dim: int = Field(32, ge=1)
    dit: DitConfig = DitConfig()

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        return _apply_preset(data, DENOISER_PRESETS)

    @model_validator(mode="after")
    def _groups(self):
        if any(c % 32 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be multiples of 32 (got {list(self.block_out_channels)})")
        if self.attention_levels > len(self.block_out_channels):
            raise ValueError(f"attention_levels ({self.attention_levels}) exceeds the number of levels")
        return self

    def signature(self) -> dict:
        """What a run's checkpoint must share: the chosen backbone's sizes only (a U-Net run from before the choice
        existed keeps its name)."""
        fields = self.model_dump(mode="json")
        if self.backbone == "unet":
            return {key: value for key, value in fields.items() if key not in ("backbone", "dit")}
        return {"backbone": "dit", "dit": fields["dit"]}


class NoiseScheduleConfig(_Section):
    """The forward process the denoiser is trained on (diffusers DDPMScheduler config)."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    # what the network predicts: the noise, the velocity, or edm (Karras et al. 2022: F inside the preconditioned
    # denoiser, trained on ldm.edm's log-normal noise levels; it samples with every sampler, gen_core.diffusers_pipeline)
    prediction_type: Literal["epsilon", "v_prediction", "edm"] = "epsilon"


class EdmConfig(_Section):
    """EDM training (noise.prediction_type edm): noise levels ln(sigma) ~ N(p_mean, p_std^2); the loss is EDM's
    weighted denoising error, lambda(sigma) = 1 / c_out^2, i.e. plain MSE on the network's own target."""

    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    sigma_data: float | None = Field(None, gt=0)  # the data's std; null: measured on the training set (~1 for scaled latents)


class SamplerConfig(_Section):
    """How samples are drawn (evaluate, sample grids, the registered model)."""

    name: Literal["ddpm", "ddim", "dpmsolver++", "heun"] = "dpmsolver++"  # heun: n steps are 2n - 1 network evaluations
    num_steps: int = Field(10, ge=1)  # ddpm at num_train_timesteps is the full chain
    # Classifier-free guidance: 1 = conditional model as is, 0 = unconditional, > 1 = sharper classes.
    # 3: the default LDM's lowest FID with class accuracy >= 0.9 (benchmarks/RESULTS.md).
    guidance_scale: float = Field(3.0, ge=0)
    # Guidance only at the steps whose noise level sigma_t = sqrt((1 - abar_t) / abar_t) lies in (lo, hi]; the others are
    # the conditional model's, one network call instead of two (Kynkaanniemi et al. 2024). null: every step.
    guidance_interval: tuple[float, float] | None = None
    # What the guided prediction is pushed away from: out = ref + guidance_scale * (model(c) - ref), with ref
    #   cfg          the model's own null-class prediction (classifier-free guidance, Ho & Salimans 2022);
    #   autoguidance a guide's conditional prediction: a smaller, shorter-trained denoiser on the same latents
    #                (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): quality without
    #                the class emphasis, recall kept;
    #   guide_null   the guide's null-class prediction: classifier-free guidance against the weak model, both effects;
    #   guide_blend  guide_blend x the guide's conditional + (1 - guide_blend) x its null class: between autoguidance
    #                (1) and guide_null (0), its two predictions one batch.
    # The guide: ldm.guide_dir (the latent-diffusion family only).
    guidance: Literal["cfg", "autoguidance", "guide_null", "guide_blend"] = "cfg"
    guide_blend: float | None = Field(None, ge=0, le=1)  # guidance guide_blend only: the guide's conditional share

    @model_validator(mode="after")
    def _blend(self):
        if self.guidance == "guide_blend" and self.guide_blend is None:
            raise ValueError("guidance guide_blend needs guide_blend (the guide's conditional share, 0..1)")
        if self.guidance != "guide_blend" and self.guide_blend is not None:
            raise ValueError(f"guide_blend applies to guidance guide_blend only (here {self.guidance})")
        return self

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, interval):
        if interval is not None and not 0 <= interval[0] < interval[1]:
            raise ValueError(f"[lo, hi] with 0 <= lo < hi (noise levels sigma_t), got {list(interval)}")
        return interval


class AlignmentConfig(_Section):
    """Representation alignment (REPA, Yu et al. 2025; gen_core.alignment): an early hidden state of the denoiser,
    through a projector, is pulled towards the classifier stage's features of the clean image while it trains.
    weight 0: off (the denoiser trains as without it, and its runs keep their names)."""

    weight: float = Field(0.0, ge=0)  # REPA's lambda on 1 - cosine similarity; the paper's 0.5
    projector_width: int = Field(256, ge=8)  # the projector's hidden channels (1x1 convolutions; dropped at export)


class LdmConfig(TrainingConfig):
    """`train_ldm`: class-conditional denoiser in the autoencoder's latent space (or on pixels: the baseline)."""

    # the sampler is used only when sampling; the cooldown follows total_steps (gen_core.training.cooldown)
    resumable_fields: ClassVar[frozenset[str]] = TrainingConfig.resumable_fields | {"sampler", "lr_cooldown", "guide_dir", "compile"}

    space: Literal["latent", "pixel"] = "latent"  # pixel: same denoiser family on the images themselves
    denoiser: DenoiserConfig = DenoiserConfig()
    noise: NoiseScheduleConfig = NoiseScheduleConfig()
    edm: EdmConfig = EdmConfig()
    sampler: SamplerConfig = SamplerConfig(name="heun")  # heun 10: more recall and less FID than dpmsolver++ 10 on the default LDM
    # The guide of sampler.guidance autoguidance / guide_null / guide_blend: an exported diffusion model (this stage's output, trained
    # smaller and shorter on the same latents and noise schedule), copied into the export beside the denoiser
    guide_dir: str | None = None
    # Dropping labels (to the extra "null" class) trains the unconditional model that
    # classifier-free guidance needs, inside the same network.
    label_dropout: float = Field(0.1, ge=0, lt=1)
    # Min-SNR-gamma loss weighting (Hang et al. 2023): each timestep's loss weighted as an x0 loss capped at
    # SNR = gamma, so the low-noise steps stop dominating training; 5 is the paper's; null: the plain MSE.
    min_snr_gamma: float | None = Field(5.0, gt=0)
    lr: float = Field(1e-3, gt=0, le=1)
    # the last lr_cooldown x total_steps steps take the rate down to 0 along a half cosine; 0: constant
    lr_cooldown: float = Field(0.0, ge=0, le=1)
    # torch.compile (inductor) the training forward: 1.20x steps for preset s on a 2-core AMX Xeon, after a one-off
    # compilation of about 65 s (benchmarks/RESULTS.md); needs a C++ compiler on CPU. Off: bit-for-bit repeatable runs
    compile: bool = False
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    ema_halflife_kimg: float = Field(10.0, gt=0)
    ema_rampup_ratio: float | None = Field(0.1, gt=0)
    global_batch_size: int = Field(128, ge=1)
    total_steps: int = Field(1000, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)
    evaluation: DiffusionTrainingEvalConfig = DiffusionTrainingEvalConfig(every_steps=1000)  # evaluation during training
    alignment: AlignmentConfig = AlignmentConfig()

    def resume_signature(self) -> dict:
        """The alignment counts only when it is on: runs from before it existed keep their names."""
        signature = {**super().resume_signature(), "denoiser": self.denoiser.signature()}
        if not self.alignment.weight:
            signature.pop("alignment")
        return signature

    @model_validator(mode="after")
    def _consistent(self):
        if self.noise.prediction_type == "edm" and self.min_snr_gamma is not None:
            raise ValueError("min_snr_gamma must be null with noise.prediction_type edm (EDM weights its loss by its preconditioning)")
        if self.sampler.num_steps > self.noise.num_train_timesteps:
            raise ValueError(
                f"sampler.num_steps ({self.sampler.num_steps}) exceeds noise.num_train_timesteps ({self.noise.num_train_timesteps})"
            )
        if self.sampler.guidance != "cfg" and not self.guide_dir:
            raise ValueError(f"sampler.guidance {self.sampler.guidance} needs guide_dir (an exported denoiser on the same latents)")
        return self


class Pix2PixModelConfig(_Section):
    """The Pix2Pix networks (gen_core.pix2pix): a U-Net generator A -> B and the conditional PatchGAN discriminator."""

    g_width: int = Field(64, ge=8)  # channels of G's first level, doubled per level (at most 8x)
    g_levels: int = Field(3, ge=1, le=6)  # stride-2 levels: the resolution must be divisible by 2**levels
    d_width: int = Field(32, ge=8)  # channels of D's first convolution; its depth follows the resolution (pix2pix.patch_layers)


class Pix2PixConfig(TrainingConfig):
    """`pix2pix`: image-to-image translation (Isola et al. 2017) on pairs made from the prepared data: the input A is
    a deterministic transform of the image B (`condition: edges`: the Sobel edge map, gen_core.paired.edges), and G
    learns A -> B with the conditional GAN loss plus l1_weight x L1 to B. Off the default pipeline: conditional/dvc.yaml."""

    total_steps: int = Field(4000, ge=1)
    global_batch_size: int = Field(64, ge=1)
    condition: Literal["edges", "pairs"] = "edges"  # pairs: the inputs the user paired with the images (data.pairs)
    edge_threshold: float | None = Field(0.2, gt=0, lt=1)  # binary edge map where the Sobel magnitude exceeds this; null: the magnitude
    model: Pix2PixModelConfig = Pix2PixModelConfig()
    l1_weight: float = Field(100.0, ge=0)  # the paper's lambda
    lr_g: float = Field(2e-4, gt=0, le=1)
    lr_d: float = Field(2e-4, gt=0, le=1)
    adam_beta1: float = Field(0.5, ge=0, lt=1)  # the paper's Adam(0.5, 0.999)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    checkpoint_every_steps: int = Field(500, ge=1)


class TextDenoiserConfig(_Section):
    """The text-to-image denoiser: a diffusers UNet2DConditionModel whose lowest level and middle cross-attend to the
    text encoder's per-token states (gen_core.text_diffusion.build_text_denoiser)."""

    block_out_channels: tuple[int, ...] = Field((64, 128), min_length=1)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _groups(self) -> "TextDenoiserConfig":
        if any(c % 32 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {list(self.block_out_channels)}: each must be a multiple of 32 (GroupNorm groups)")
        return self


class T2iConfig(TrainingConfig):
    """`t2i`: text-to-image latent diffusion on the ldm family's autoencoder and cached latents. Each training image's
    caption is made from its class and measured attributes (gen_core.captions); the frozen all-MiniLM-L6-v2 encodes it
    (gen_core.text_encoder); classifier-free guidance is against the empty prompt. Off the default pipeline: conditional/dvc.yaml."""

    resumable_fields: ClassVar[frozenset[str]] = TrainingConfig.resumable_fields | {"sampler"}

    denoiser: TextDenoiserConfig = TextDenoiserConfig()
    noise: NoiseScheduleConfig = NoiseScheduleConfig()
    sampler: SamplerConfig = SamplerConfig(guidance_scale=3.0)
    text_dropout: float = Field(0.1, ge=0, lt=1)  # captions replaced by the empty prompt: trains the unconditional half of CFG
    min_snr_gamma: float | None = Field(5.0, gt=0)
    lr: float = Field(1e-3, gt=0, le=1)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    ema_halflife_kimg: float = Field(10.0, gt=0)
    ema_rampup_ratio: float | None = Field(0.1, gt=0)
    global_batch_size: int = Field(128, ge=1)
    total_steps: int = Field(1500, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _epsilon_or_v(self) -> "T2iConfig":
        if self.noise.prediction_type == "edm":
            raise ValueError("noise.prediction_type edm: not for the text-to-image family yet (epsilon or v_prediction)")
        if self.sampler.guidance != "cfg":
            raise ValueError(f"sampler.guidance {self.sampler.guidance}: the text-to-image family guides with cfg only")
        return self


class ModelOutputs(_Section):
    """Where one training stage writes: the exported model and its loss curve (DVC outs and plots)."""

    out_dir: str
    losses_file: str
    metrics_file: str | None = None  # train_autoencoder only: reconstruction PSNR and FID (DVC metrics)
    eval_file: str | None = None  # gan, ldm: the evaluation-during-training curve (DVC plots; a header only when off)


class OutputsConfig(_Section):
    """`outputs`: the training stages' locations, apart from their hyperparameters. A sweep trial or a
    benchmark derives its own with `model_copy(update=...)`."""

    gan: ModelOutputs = ModelOutputs(out_dir="models/gan", losses_file="metrics/gan_losses.csv", eval_file="metrics/gan_eval.csv")
    autoencoder: ModelOutputs = ModelOutputs(out_dir="models/autoencoder", losses_file="metrics/autoencoder_losses.csv",
                                             metrics_file="metrics/autoencoder.json")  # fmt: skip
    ldm: ModelOutputs = ModelOutputs(out_dir="models/ldm", losses_file="metrics/ldm_losses.csv", eval_file="metrics/ldm_eval.csv")
    pix2pix: ModelOutputs = ModelOutputs(out_dir="models/pix2pix", losses_file="metrics/pix2pix_losses.csv")
    t2i: ModelOutputs = ModelOutputs(out_dir="models/t2i", losses_file="metrics/t2i_losses.csv")


class FsdpConfig(_Section):
    """ray.strategy fsdp: torch FSDP2 (`fully_shard`) inside the worker loop."""

    granularity: Literal["block", "model"] = "block"  # block: each stage of the network is a unit; model: one unit
    reshard_after_forward: bool = True  # False keeps gathered weights between forward and backward (ZeRO-2-like)
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # compute/communication dtype of the gathered weights
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduce-scatter dtype


class DeepSpeedConfig(_Section):
    """ray.strategy deepspeed: one engine per model, ZeRO stage from a DeepSpeed JSON config."""

    config: str = "cluster_configs/deepspeed/zero2.json"  # relative to the code's checkout (a submitted job's copy of it), or absolute


class RayConfig(_Section):
    """How training/eval use Ray. `address: null` starts a local Ray, unless RAY_ADDRESS is set."""

    address: str | None = None
    num_workers: int = Field(1, ge=1)  # 1 worker with every core is fastest on one small machine
    use_gpu: bool = False
    cpus_per_worker: int = Field(2, ge=1)  # also the worker's torch threads
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp: FsdpConfig = FsdpConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    storage_path: str = "runs/ray"  # local path or s3:// URL; checkpoints live in <storage_path>/<section.run_name>-<kind>-<signature>
    max_failures: int = Field(0, ge=-1)
    dashboard: bool = False
    in_process: bool = True  # one DDP worker, no address, max_failures 0, no dashboard: trains in the stage's process, no Ray

    @model_validator(mode="before")
    @classmethod
    def _run_name_moved(cls, data):
        if isinstance(data, dict) and "run_name" in data:
            raise ValueError("ray.run_name is now per family: set gan.run_name, autoencoder.run_name or ldm.run_name")
        return data


EXTRAPOLATION_MIN_SAMPLES = 4 * 2048  # FID extrapolation's fit runs from twice Inception's 2048 dimensions to N >= twice that


class ProtocolConfig(_Section):
    """An evaluation protocol. Numbers compare only within one protocol: the gate refuses to compare a
    candidate with a champion measured under another, and every report shows the protocol's real-vs-real
    floor (as many real training images as it generates, against its reference set)."""

    num_samples: int = Field(ge=10)  # generated images (and real training images of the floor)
    reference: Literal["eval", "test"] = "eval"  # eval: the prepared eval split; test: the source's whole test split
    reference_images: int | None = Field(None, ge=10)  # null: all of the reference split; else exactly this many
    inception_precision: Literal["fp32", "bf16"] = "fp32"  # bf16: where the hardware runs it natively, else fp32
    resize: Literal["clean"] = "clean"  # clean-fid's `clean` mode (PIL bicubic on float images)
    # also report FID predicted at this many samples (published figures use 50,000) from a fit in 1/N over subsets of
    # the samples (gen_core.metrics.fid_extrapolated); null: none. Needs num_samples >= 8,192; FID itself is unchanged
    fid_extrapolate_to: int | None = None

    @model_validator(mode="after")
    def _extrapolation(self) -> "ProtocolConfig":
        if self.fid_extrapolate_to is not None and not (self.num_samples >= EXTRAPOLATION_MIN_SAMPLES and self.fid_extrapolate_to > self.num_samples):
            raise ValueError(f"fid_extrapolate_to: {self.fid_extrapolate_to} needs num_samples >= {EXTRAPOLATION_MIN_SAMPLES} (got {self.num_samples}) "
                             "and more samples than num_samples")  # fmt: skip
        return self


def _default_protocols() -> dict:
    return {
        "quick": ProtocolConfig(num_samples=1000, reference="eval", inception_precision="bf16"),
        "standard": ProtocolConfig(num_samples=10000, reference="test", reference_images=10000, inception_precision="fp32",
                                   fid_extrapolate_to=50000),
    }


class GuidanceSweepConfig(_Section):
    """`python -m pipelines.evaluate --family ldm --guidance-sweep`: one diffusion model's metrics at each
    classifier-free guidance scale (same weights, same seeds), and the scale with the lowest FID among those
    whose class accuracy reaches `class_accuracy_floor`."""

    scales: list[float] = Field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0], min_length=1)
    class_accuracy_floor: float = Field(0.9, ge=0, le=1)

    @field_validator("scales")
    @classmethod
    def _non_negative(cls, scales: list[float]) -> list[float]:
        if any(s < 0 for s in scales):
            raise ValueError(f"guidance scales must be >= 0, got {min(scales)}")
        return sorted(set(scales))


class EvaluateConfig(_Section):
    """`evaluate`: metrics of generated samples against the protocol's reference set."""

    protocol: str = "quick"  # a key of `protocols`: the protocol of the evaluate stage, the gate and ref_stats
    protocols: dict[str, ProtocolConfig] = Field(default_factory=_default_protocols)
    batch_size: int = Field(50, ge=1)
    seed: int = 2024  # sample i uses generator seeded seed + i: independent of world size
    kid_subset_size: int = Field(100, ge=2)
    kid_subsets: int = Field(50, ge=1)
    pr_neighbors: int = Field(3, ge=1)
    classifier_score_splits: int = Field(10, ge=1)  # the classifier score's splits (as Inception Score's 10)
    coverage_recall: float = Field(0.1, ge=0, le=1)  # a class counts as covered when its recall reaches this
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # of the sampler network (Inception follows the protocol)
    out_dir: str = "metrics/eval"  # <out_dir>/<protocol>/<family>.json
    guidance: GuidanceSweepConfig = GuidanceSweepConfig()  # `evaluate --guidance-sweep` (diffusion models)

    @model_validator(mode="after")
    def _known_protocol(self) -> "EvaluateConfig":
        if self.protocol not in self.protocols:
            raise ValueError(f"evaluate.protocol: '{self.protocol}' is not one of evaluate.protocols ({', '.join(self.protocols)})")
        return self

    @property
    def active(self) -> ProtocolConfig:
        return self.protocols[self.protocol]


class GateConfig(_Section):
    """The champion alias moves only when every criterion holds (and FID beats the champion's, measured
    under the same protocol). The floors reject a collapsed model however low its FID."""

    model_name: str
    fid_threshold: float = Field(150.0, gt=0)
    recall_floor: float = Field(0.1, ge=0, le=1)  # real data reaches 0.77 under `quick`; a collapsed GAN 0.003
    class_accuracy_floor: float = Field(0.5, ge=0, le=1)  # of the pipeline's classifier on the samples


class RegistryConfig(_Section):
    """`register`: MLflow model version + FID gate for the `champion` alias, per model family."""

    gan: GateConfig = GateConfig(model_name="genforge-gan", fid_threshold=200.0)
    ldm: GateConfig = GateConfig(model_name="genforge-ldm")
    # translations of the reference images' edge maps vs the images themselves; recall and class accuracy as for the others
    pix2pix: GateConfig = GateConfig(model_name="genforge-pix2pix", fid_threshold=100.0, class_accuracy_floor=0.7)
    # generated from the reference images' captions: class accuracy is against the class each prompt names
    t2i: GateConfig = GateConfig(model_name="genforge-t2i")
    alias: str = "champion"
    out_dir: str = "metrics/register"  # <out_dir>/<family>.json


class ServingConfig(_Section):
    """`serving`: where `python -m pipelines.export` writes a registered version in ONNX; the demo's limits."""

    onnx_dir: str = "models/onnx"
    max_images: int = Field(64, ge=1, le=1024)  # images one request may ask for (the demo)
    demo_host: str = "127.0.0.1"  # the demo binds here; another address exposes it to the network
    demo_port: int = Field(7860, ge=0, le=65535)  # 0: any free port


class TrackingConfig(_Section):
    """MLflow. `tracking_uri: null` uses MLFLOW_TRACKING_URI, else sqlite in the repo."""

    tracking_uri: str | None = None
    experiment: str = "genforge"
    # where a new experiment keeps its artifacts; null: <the sqlite file's directory>/mlartifacts for a
    # sqlite store, the server's own setting for an http(s) one
    artifact_location: str | None = None
    # how long a client waits for a tracking server that does not answer (retries with backoff), then one line
    server_wait_s: float = Field(45.0, gt=0, le=3600)


Family = Literal["gan", "ldm", "pix2pix", "t2i"]  # what is evaluated and registered
SweepFamily = Literal["gan", "ldm"]  # what the sweep searches


# ---------------------------------------------------------------------------
# Sweeps (pipelines.sweep, Ray Tune)
# ---------------------------------------------------------------------------

LR_RATIO_KEY = "lr_d_over_lr_g"  # GAN sweeps: lr_d = lr_g * ratio, the knob searched on a log scale


class SearchDimension(_Section):
    """One searched knob: loguniform/uniform over [low, high], randint over low..high, or choice of values."""

    type: Literal["loguniform", "uniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[float | int | str | bool] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "SearchDimension":
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("choice takes a non-empty `values` list and no low/high")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise ValueError(f"{self.type} takes `low` and `high` and no values")
        if self.low >= self.high:
            raise ValueError(f"inverted or empty range: low {self.low} >= high {self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        return self

    def bounds(self) -> list:
        """The extreme values a trial can get: each is checked against the family's config before a sweep."""
        return list(self.values) if self.type == "choice" else [self.low, self.high]


class AshaConfig(_Section):
    grace_period: int = Field(1, ge=1)  # in reports: no trial is stopped before this many
    reduction_factor: float = Field(2.0, gt=1)


class PbtConfig(_Section):
    perturbation_interval: int = Field(1, ge=1)  # in reports
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    # true: every trial waits at each perturbation point and the bottom quantile then exploits the top (deterministic,
    # idles the fast trials); false: a trial exploits when it reports, against whatever the others reported last
    synch: bool = False


def _default_space() -> dict:
    return {family: {key: SearchDimension(**dim) for key, dim in space.items()} for family, space in _DEFAULT_SPACE.items()}


_DEFAULT_SPACE = {
    "gan": {
        "lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-3},
        LR_RATIO_KEY: {"type": "loguniform", "low": 0.5, "high": 8.0},
        "d_steps_per_g_step": {"type": "choice", "values": [1, 2]},
        "adam_beta1": {"type": "choice", "values": [0.0, 0.5]},
        "ema_halflife_kimg": {"type": "loguniform", "low": 1.0, "high": 20.0},
        "loss": {"type": "choice", "values": ["hinge", "nonsaturating"]},
    },
    "ldm": {
        "lr": {"type": "loguniform", "low": 2e-4, "high": 3e-3},
        "label_dropout": {"type": "uniform", "low": 0.05, "high": 0.25},
        "ema_halflife_kimg": {"type": "loguniform", "low": 2.0, "high": 20.0},
    },
}


class SweepConfig(_Section):
    """`sweep`: Ray Tune over one family's training; every trial is a real Ray Train run of that stage."""

    sweepable_keys: ClassVar[dict[str, tuple[str, ...]]] = {
        "gan": ("lr_g", "lr_d", LR_RATIO_KEY, "d_steps_per_g_step", "adam_beta1", "adam_beta2", "ema_halflife_kimg", "loss"),
        "ldm": ("lr", "label_dropout", "ema_halflife_kimg", "adam_beta1", "adam_beta2", "weight_decay"),
    }
    # What a trial reports at every checkpoint (the schedulers' time unit). Inception `fid` comes only at the end.
    trial_metrics: ClassVar[dict[str, tuple[str, ...]]] = {
        "gan": ("fid_classifier", "class_accuracy", "recall_classifier", "diversity", "d_loss", "g_loss"),
        "ldm": ("fid_classifier", "class_accuracy", "recall_classifier", "diversity", "loss"),
    }

    enabled: bool = False  # the dvc `sweep` stage only runs a sweep when true
    family: SweepFamily = "gan"
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    searcher: Literal["random", "optuna"] = "random"  # pbt mutates its own population: random only
    num_trials: int = Field(8, ge=1)
    metric: str = "fid_classifier"  # reported by trials at every checkpoint; see trial_metrics
    mode: Literal["min", "max"] = "min"
    total_steps: int = Field(600, ge=1)  # per trial
    report_every_steps: int = Field(150, ge=1)  # checkpoint + metrics: the schedulers' time unit
    global_batch_size: int | None = Field(None, ge=1)  # null: the family's
    workers_per_trial: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)  # null: as many as the cluster's CPUs (GPUs) hold
    probe_samples: int = Field(500, ge=10)  # cheap FID per report: classifier features at fixed seeds
    final_fid_samples: int = Field(500, ge=10)  # Inception FID at each finished trial's last step
    seed: int = 0
    asha: AshaConfig = AshaConfig()
    pbt: PbtConfig = PbtConfig()
    space: dict[SweepFamily, dict[str, SearchDimension]] = Field(default_factory=_default_space)
    storage_path: str = "runs/tune"  # local path or s3://; Tune state and the trials' checkpoints
    name: str = "genforge-sweep"  # the same name resumes an interrupted sweep (Tuner.restore)
    out_dir: str = "sweep"  # best_params.yaml, trials.csv, the best trial's model and its gate record
    metrics_file: str = "metrics/sweep.json"

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        space = self.space.get(self.family) or {}
        if not space:
            raise ValueError(f"space.{self.family}: empty search space")
        unknown = sorted(set(space) - set(self.sweepable_keys[self.family]))
        if unknown:
            raise ValueError(f"space.{self.family}.{unknown[0]}: not a sweepable key (one of {', '.join(self.sweepable_keys[self.family])})")
        if LR_RATIO_KEY in space and "lr_d" in space:
            raise ValueError(f"space.gan: search lr_d or {LR_RATIO_KEY}, not both")
        if self.metric not in self.trial_metrics[self.family]:
            raise ValueError(f"metric {self.metric!r}: {self.family} trials never report it (they report {', '.join(self.trial_metrics[self.family])})")
        if self.report_every_steps > self.total_steps:
            raise ValueError(f"report_every_steps ({self.report_every_steps}) exceeds total_steps ({self.total_steps})")
        if self.scheduler == "pbt" and self.searcher != "random":
            raise ValueError("searcher: pbt explores by mutating its population; use searcher: random")
        return self
# What a training stage trains: the model kind names its params section (and its `outputs` entry).
# A model *family* (gan | ldm | pix2pix | t2i) is what gets evaluated and registered; the ldm family is trained in
# two stages, the autoencoder and then the latent denoiser.
TRAINING_SECTIONS = ("gan", "autoencoder", "ldm", "pix2pix", "t2i")


class RunConfig(_Section):
    data: DataConfig = DataConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    ref_stats: RefStatsConfig = RefStatsConfig()
    gan: GanConfig = GanConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    latents: LatentsConfig = LatentsConfig()
    ldm: LdmConfig = LdmConfig()
    pix2pix: Pix2PixConfig = Pix2PixConfig()
    t2i: T2iConfig = T2iConfig()
    outputs: OutputsConfig = OutputsConfig()
    ray: RayConfig = RayConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    serving: ServingConfig = ServingConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        for name in TRAINING_SECTIONS:
            section = getattr(self, name)
            if section.global_batch_size % self.ray.num_workers:
                raise ValueError(
                    f"{name}.global_batch_size ({section.global_batch_size}) must be divisible by "
                    f"ray.num_workers ({self.ray.num_workers})"
                )
        if self.gan.penalised and self.ray.strategy != "ddp":
            raise ValueError(
                f"gan.regularization (r1/r2/gp) needs ray.strategy ddp: its double backward through D fails under "
                f"{self.ray.strategy} (FSDP2 frees the gathered weights it needs, ZeRO's gradient hooks fire early)"
            )
        group = self.gan.model.mbstd_group
        if group and (self.gan.global_batch_size // self.ray.num_workers) % group:
            raise ValueError(
                f"gan.model.mbstd_group ({group}) must divide the per-worker batch (gan.global_batch_size / ray.num_workers = "
                f"{self.gan.global_batch_size // self.ray.num_workers}), so that no group mixes real and fake images"
            )
        sweep_batch = self.sweep.global_batch_size or self.family(self.sweep.family).global_batch_size
        if sweep_batch % self.sweep.workers_per_trial:
            raise ValueError(
                f"sweep: global batch ({sweep_batch}) must be divisible by sweep.workers_per_trial ({self.sweep.workers_per_trial})"
            )
        if self.data.resolution // self.autoencoder.downsample_factor < 2:
            raise ValueError(
                f"autoencoder.downsample_factor ({self.autoencoder.downsample_factor}) leaves latents under 2x2 "
                f"at data.resolution {self.data.resolution}"
            )
        protocol = self.evaluate.active
        if protocol.reference == "eval" and (protocol.reference_images or 0) > self.data.eval_images:
            raise ValueError(
                f"evaluate.protocols.{self.evaluate.protocol}.reference_images ({protocol.reference_images}) exceeds "
                f"data.eval_images ({self.data.eval_images})"
            )
        reference = protocol.reference_images or self.data.eval_images
        if self.evaluate.kid_subset_size > min(protocol.num_samples, reference):
            raise ValueError(
                f"evaluate.kid_subset_size ({self.evaluate.kid_subset_size}) exceeds the samples or reference images "
                f"of evaluate.protocols.{self.evaluate.protocol}"
            )
        levels = self.pix2pix.model.g_levels
        if self.data.resolution % 2**levels:
            raise ValueError(f"pix2pix.model.g_levels ({levels}): data.resolution ({self.data.resolution}) must be divisible by 2**{levels}")
        if self.data.resolution // 2**levels < 2:  # InstanceNorm needs more than one value per channel
            raise ValueError(f"pix2pix.model.g_levels ({levels}): leaves a 1x1 bottleneck at data.resolution {self.data.resolution} (at most "
                             f"{self.data.resolution.bit_length() - 2})")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _dit_patches(self) -> "RunConfig":
        denoiser = self.ldm.denoiser
        size = self.data.resolution // (self.autoencoder.downsample_factor if self.ldm.space == "latent" else 1)
        if denoiser.backbone == "dit" and size % denoiser.dit.patch_size:
            raise ValueError(f"ldm.denoiser.dit.patch_size ({denoiser.dit.patch_size}) must divide the denoiser's input size ({size}x{size})")
        return self

    def family(self, family: Family) -> TrainingConfig:
        """The training section of the stage that produces a family's generator."""
        return getattr(self, family)

    def generator_dir(self, family: Family) -> str:
        """Where a family's exported generator is."""
        return getattr(self.outputs, family).out_dir

    def eval_file(self, family: Family) -> str:
        return f"{self.evaluate.out_dir}/{self.evaluate.protocol}/{family}.json"

    @property
    def reference_dir(self) -> str:
        """The reference statistics and floor of the evaluation protocol in use."""
        return f"{self.ref_stats.out_dir}/{self.evaluate.protocol}"


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    where = f"{source}: {loc}" if loc else source
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {msg}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'gan.total_steps=10' -> (['gan', 'total_steps'], 10). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as err:  # e.g. `[` unclosed, or a !!python/... tag (safe_load builds plain data only)
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"override {text!r}: value is not valid YAML ({problem})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict, source: str = "params") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def _read_yaml(path: Path, required: bool = False) -> dict:
    """A params (or overlay) file as a mapping. `required`: an empty file is refused, since running on
    the code's defaults instead of the file's settings would be silent and wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a params file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: unreadable ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', None) or type(err).__name__})") from None
    if raw is None:
        if required:
            raise ConfigError(f"{path}: empty; a params file must set the run (params.yaml is the full example)")
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def merge(base: dict, overlay: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `overlay` replaces."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path = "params.yaml", overrides: list[str] = (), overlays: list[str | Path] = ()) -> RunConfig:
    """params file, then each overlay file (e.g. a sweep's best_params.yaml) merged over it, then --set overrides."""
    raw = _read_yaml(Path(path), required=True)
    for overlay in overlays:
        raw = merge(raw, _read_yaml(Path(overlay)))
    source = " + ".join([str(path), *map(str, overlays)])
    return config_from_dict(apply_overrides(raw, list(overrides)), source)
