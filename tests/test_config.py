import pytest

from gen_core.config import ConfigError, RunConfig, config_from_dict, load_config
from tests.conftest import REPO


def test_repo_params_parse_and_match_defaults_where_unset():
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.ray.num_workers == 1 and cfg.ray.cpus_per_worker == 2 and cfg.data.source == "fashion_mnist"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"gan": {"lr_gg": 1}}, "params: gan.lr_gg: unknown key"),
        ({"trian": {}}, "params: trian: unknown key"),
        ({"gan": {"lr_g": -0.1}}, "params: gan.lr_g: Input should be greater than 0 (got -0.1)"),
        ({"data": {"resolution": 30}}, "params: data: resolution must be a power of two (got 30)"),
        ({"data": {"source": "cifar"}}, "params: data.source: Input should be"),
        ({"gan": {"global_batch_size": 63}, "ray": {"num_workers": 2}}, "divisible by ray.num_workers"),
        ({"gan": {"loss": "wasserstein"}}, "params: gan.loss:"),
        # the GAN recipes' bad combinations
        ({"gan": {"regularization": {"gp_lambda": 10}}}, "gp_lambda is WGAN-GP's penalty and needs loss: wgan (got hinge)"),
        ({"gan": {"loss": "wgan", "model": {"spectral_norm": False}}}, "loss wgan needs a Lipschitz constraint on D"),
        ({"gan": {"augment": ["color", "color"]}}, "augment lists a transform twice"),
        ({"gan": {"augment": ["flip"]}}, "params: gan.augment.0: Input should be 'color', 'translation' or 'cutout'"),
        ({"gan": {"model": {"arch": "stylegan"}}}, "params: gan.model.arch: Input should be 'dcgan' or 'resnet'"),
        ({"gan": {"regularization": {"interval": 0}}}, "params: gan.regularization.interval: Input should be greater than or equal to 1"),
        ({"gan": {"regularization": {"r1_gamma": 1}}, "ray": {"strategy": "fsdp"}}, "gan.regularization (r1/r2/gp) needs ray.strategy ddp"),
        ({"gan": {"regularization": {"r2_gamma": 1}}, "ray": {"strategy": "deepspeed"}}, "its double backward through D fails under deepspeed"),
        ({"gan": {"model": {"mbstd_group": 5}}}, "gan.model.mbstd_group (5) must divide the per-worker batch"),
        ({"gan": {"schedule": {"ramp_kimg": 0}}}, "params: gan.schedule.ramp_kimg: Input should be greater than 0"),
        ({"evaluate": {"guidance": {"scales": [1, -2]}}}, "params: evaluate.guidance.scales: guidance scales must be >= 0, got -2.0"),
        ({"evaluate": {"guidance": {"scales": []}}}, "params: evaluate.guidance.scales: List should have at least 1 item"),
        ({"evaluate": {"guidance": {"class_accuracy_floor": 1.5}}}, "params: evaluate.guidance.class_accuracy_floor: Input should be less than or equal to 1"),
        ({"ldm": {"min_snr_gamma": 0}}, "params: ldm.min_snr_gamma: Input should be greater than 0"),
        ({"ldm": {"evaluation": {"guidance_scale": -1}}}, "params: ldm.evaluation.guidance_scale: Input should be greater than or equal to 0"),
        ({"gan": {"evaluation": {"guidance_scale": 2}}}, "params: gan.evaluation.guidance_scale: unknown key"),  # a diffusion model's knob
        # the run's name moved from ray to each family section; an old params file is told where
        ({"ray": {"run_name": "mine"}}, "ray.run_name is now per family: set gan.run_name, autoencoder.run_name or ldm.run_name"),
        ({"gan": {"run_name": "my run/1"}}, "params: gan.run_name: String should match pattern"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_and_yaml_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("gan:\n  total_steps: 10\n  checkpoint_every_steps: 5\n")
    cfg = load_config(path, ["gan.total_steps=20", "ray.use_gpu=true"])
    assert cfg.gan.total_steps == 20 and cfg.ray.use_gpu is True
    with pytest.raises(ConfigError, match="gan.total_stepz: unknown key"):
        load_config(path, ["gan.total_stepz=3"])
    path.write_text("gan: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.gan.total_steps = 5


def test_log_and_checkpoint_steps_include_the_last_step():
    gan = load_config(REPO / "params.yaml", ["gan.total_steps=130", "gan.log_every_steps=50", "gan.checkpoint_every_steps=60"]).gan
    assert [s for s in range(1, 131) if gan.is_log_step(s)] == [50, 100, 130]
    assert [s for s in range(1, 131) if gan.is_checkpoint_step(s)] == [60, 120, 130]
    # a run shorter than the intervals (`dvc exp run -S gan.total_steps=50` with the default 250 and 50) is valid:
    # it logs and checkpoints at its last step
    short = load_config(REPO / "params.yaml", ["gan.total_steps=30", "gan.evaluation.every_steps=null"]).gan
    assert short.checkpoint_every_steps > 30 and short.log_every_steps > 30
    assert [s for s in range(1, 31) if short.is_checkpoint_step(s)] == [30] == [s for s in range(1, 31) if short.is_log_step(s)]


def test_evaluation_steps_are_checkpoint_steps():
    """The best evaluated step is exported from its checkpoint, so every evaluation step checkpoints,
    whatever checkpoint_every_steps says; evaluation off changes nothing."""
    from gen_core.config import GanConfig

    section = GanConfig(total_steps=100, checkpoint_every_steps=40, evaluation={"every_steps": 30})
    assert [s for s in range(1, 101) if section.is_eval_step(s)] == [30, 60, 90, 100]
    assert [s for s in range(1, 101) if section.is_checkpoint_step(s)] == [30, 40, 60, 80, 90, 100]
    off = GanConfig(total_steps=100, checkpoint_every_steps=40, evaluation={"every_steps": None})
    assert [s for s in range(1, 101) if off.is_checkpoint_step(s)] == [40, 80, 100] and not any(map(off.is_eval_step, range(101)))


@pytest.mark.parametrize("profile", sorted(p.name for p in (REPO / "profiles").glob("*.yaml")))
def test_every_profile_overlays_the_params(profile):
    """A profile is an overlay over params.yaml (`--overlay profiles/<name>`): it parses, and it changes something."""
    base = load_config(REPO / "params.yaml")
    assert load_config(REPO / "params.yaml", overlays=[REPO / "profiles" / profile]) != base
