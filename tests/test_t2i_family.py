"""The text-to-image family through the product: the exported TextDiffusionGenerator (round trip, the text encoder's
identity checked), prompt requests (one-line errors), the captions as the training table, and the stages on a real
2-worker Ray run on the ldm family's autoencoder and latents, evaluated (text alignment included), registered in a real
MLflow server and generating from prompts by alias."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from gen_core.captions import AttributeScale
from gen_core.checkpoint import CheckpointError
from gen_core.config import AutoencoderConfig, ConfigError, NoiseScheduleConfig, SamplerConfig, load_config
from gen_core.diffusion import build_autoencoder, training_schedule
from gen_core.image_requests import RequestError, parse_prompt_request
from gen_core.text_diffusion import TextDiffusionGenerator, build_text_denoiser, grid_prompts
from gen_core.text_encoder import TextEncoder
from tests.conftest import REPO, run_cli, tiny_params, upstream_sections, write_params

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


def small_generator(encoder: TextEncoder) -> TextDiffusionGenerator:
    torch.manual_seed(0)
    unet = build_text_denoiser(4, 8, encoder.dim, block_out_channels=(32, 32)).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)  # zero-initialised output layers: make the prompts show
    vae = build_autoencoder(AutoencoderConfig(width=8), 1).eval()
    return TextDiffusionGenerator(unet, vae, dict(training_schedule(NoiseScheduleConfig()).config), SamplerConfig(num_steps=4, guidance_scale=3.0),
                                  (1, 32, 32), encoder, AttributeScale((0.4, 0.6), (0.2, 0.4)), NAMES)  # fmt: skip


def test_the_export_reloads_and_samples_the_same_images(tmp_path, encoder):
    model = small_generator(encoder)
    model.save_pretrained(tmp_path, {"step": 7})
    meta = json.loads((tmp_path / "generator.json").read_text())
    assert meta["family"] == "t2i" and meta["text_encoder"]["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["text_encoder"]["files_sha256"] == encoder.files_sha256 and meta["attribute_scale"] == {"brightness": [0.4, 0.6], "coverage": [0.2, 0.4]}
    again, _ = TextDiffusionGenerator.from_pretrained(tmp_path, encoder)
    prompts, seeds = ["a dark sneaker, small in the frame", "a light dress", ""], [3, 4, 5]
    images = model.sample(prompts, seeds)
    assert images.shape == (3, 1, 32, 32) and images.abs().max() <= 1
    assert torch.equal(again.sample(prompts, seeds), images)
    assert not torch.equal(model.sample(["a bag"] * 3, seeds), images)  # the prompt matters
    assert torch.allclose(model.sample(prompts[1:2], seeds[1:2]), images[1:2], atol=1e-5)  # image i: its prompt and seed only


def test_an_export_of_another_text_encoder_is_refused(tmp_path, encoder):
    small_generator(encoder).save_pretrained(tmp_path, {"step": 1})
    meta = json.loads((tmp_path / "generator.json").read_text())
    meta["text_encoder"]["files_sha256"]["model.safetensors"] = "0" * 64
    (tmp_path / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trained with text encoder sentence-transformers/all-MiniLM-L6-v2 of other files than the installed one"):
        TextDiffusionGenerator.from_pretrained(tmp_path, encoder)


def test_prompt_requests_are_checked_whole_with_one_line_errors():
    request = parse_prompt_request(["a sneaker", ""], [1, 2], {"guidance_scale": 2.0})
    assert request.prompts == ["a sneaker", ""] and request.seeds == [1, 2] and request.options == {"guidance_scale": 2.0}
    cases = [
        ([], [], None, "no rows: give one `prompt` and one `seed` per image"),
        (["a"], [1, 2], None, "1 prompts but 2 seeds: one seed per image"),
        ([3], [1], None, "prompt row 0: 3 is not text"),
        (["a" * 1001], [1], None, "prompt row 0: 1001 characters, at most 1000"),
        (["a"], [-1], None, "seed -1: between 0 and 2**63 - 1"),
        (["a"], [1], {"sampler": "euler"}, "sampler 'euler': one of ddpm, ddim, dpmsolver++, heun"),
        (["a"], [1], {"label": 3}, "unknown setting 'label' (settings: format, sampler, num_steps, guidance_scale)"),
    ]
    for prompts, seeds, params, message in cases:
        with pytest.raises(RequestError) as err:
            parse_prompt_request(prompts, seeds, params)
        assert str(err.value) == message


def test_the_caption_table_holds_each_distinct_caption_once():
    from pipelines.train_t2i import CaptionTable

    class Fake:  # stands in for the encoder: states that name their prompt
        def encode(self, prompts):
            from gen_core.text_encoder import Encoded

            hidden = torch.tensor([[[float(len(p))]] for p in prompts])
            return Encoded(hidden, torch.ones(len(prompts), 1, dtype=torch.long), hidden[:, 0])

    captions = ["a bag", "a dark coat", "a bag", "a sandal, small in the frame"]
    table = CaptionTable(captions, Fake())
    assert table.distinct == 3 and table.null_hidden.item() == 0.0
    hidden, _ = table.batch(torch.tensor([3, 0, 2]), "cpu")
    assert hidden[:, 0, 0].tolist() == [len(captions[3]), len(captions[0]), len(captions[2])]


def test_the_prompt_grid_asks_for_each_attribute_per_class():
    prompts = grid_prompts(NAMES)
    assert len(prompts) == 50 and prompts[:5] == ["a t-shirt", "a dark t-shirt", "a light t-shirt", "a t-shirt, small in the frame",
                                                  "a t-shirt, filling the frame"]  # fmt: skip
    assert prompts[-5] == "an ankle-boot"


def test_edm_is_refused_for_text_to_image_in_one_line():
    with pytest.raises(ConfigError, match="t2i: noise.prediction_type edm: not for the text-to-image family yet"):
        load_config(REPO / "params.yaml", ["t2i.noise.prediction_type=edm", "t2i.min_snr_gamma=null"])


def test_an_image_folders_own_captions_are_trained_on_and_evaluated_from(tmp_path, encoder):
    """A caption sidecar (metadata.jsonl) through the prepare stage: training reads each image's own caption (not one
    worded from its attributes), and the evaluation generates image i from reference image i's caption, with class
    accuracy against its class and no attribute agreement (the captions are not worded from attributes)."""
    from PIL import Image

    from gen_core.config import InceptionConfig, config_from_dict
    from gen_core.data import load_split
    from gen_core.metrics import load_inception
    from gen_core.models import Classifier
    from gen_core.classifier import classifier_outputs
    from gen_core.sampling import to_uint8
    from pipelines.encode_latents import run as encode_latents
    from pipelines.evaluation import paired_features_for_indices
    from pipelines.prepare import prepare
    from pipelines.train_t2i import training_data
    from tests.test_pix2pix_family import garments

    images, lines = garments(40), []
    for i, image in enumerate(images):
        (tmp_path / "folder" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(tmp_path / "folder" / f"class_{i % 2}" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"class_{i % 2}/{i}.png", "text": f"garment number {i}"}))
    (tmp_path / "folder" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    sections = {"data": {"source": "image_folder", "source_uri": str(tmp_path / "folder"), "eval_images": 10, "out_dir": str(tmp_path / "prepared")},
                "evaluate": {"kid_subset_size": 10, "protocols": {"quick": {"num_samples": 20}}},  # sized for 40 images
                "outputs": {"autoencoder": {"out_dir": str(tmp_path / "ae")}}, "latents": {"out_dir": str(tmp_path / "latents")}}  # fmt: skip
    cfg = config_from_dict(tiny_params(**sections), "test")
    prepare(cfg)
    torch.manual_seed(0)
    build_autoencoder(cfg.autoencoder, 1, scaling_factor=0.5).save_pretrained(tmp_path / "ae", safe_serialization=True)
    encode_latents(cfg)
    train = load_split(str(tmp_path / "prepared"), "train")
    latents, captions, _, class_names = training_data(str(tmp_path / "prepared"), str(tmp_path / "latents"), str(tmp_path / "ae"))
    assert len(latents) == 30 and captions == train.captions and all(text.startswith("garment number") for text in captions)
    assert class_names == ["class_0", "class_1"]

    evals = load_split(str(tmp_path / "prepared"), "eval")
    model, classifier = small_generator(encoder), Classifier(1, 2, width=8).eval()
    features = paired_features_for_indices(model, "t2i", evals, classifier, load_inception(InceptionConfig()), np.arange(4), 7, 2, "cpu")
    assert not {"brightness_agreement", "size_agreement"} & set(features) and list(features["labels"]) == list(evals.labels[:4])
    _, expected = classifier_outputs(classifier, to_uint8(model.sample(evals.captions[:4], [7, 8, 9, 10])))
    assert np.allclose(features["classifier"], expected, atol=1e-4)


@pytest.mark.slow
def test_t2i_trains_on_two_workers_is_evaluated_registered_and_generates_from_prompts_by_alias(tiny_upstream, mlflow_server):
    import mlflow
    from mlflow.exceptions import MlflowException

    root = tiny_upstream / "t2i"
    root.mkdir()
    params = tiny_params(**upstream_sections(tiny_upstream))
    params["tracking"]["tracking_uri"] = mlflow_server
    params["ray"] = {**params["ray"], "storage_path": str(root / "runs")}
    params["latents"] = {**params["latents"], "out_dir": str(root / "latents")}
    params["outputs"] = {"autoencoder": {"out_dir": str(root / "ae"), "losses_file": str(root / "ae.csv"), "metrics_file": str(root / "ae.json")},
                         "t2i": {"out_dir": str(root / "model"), "losses_file": str(root / "losses.csv")}}  # fmt: skip
    params["evaluate"] = {**params["evaluate"], "out_dir": str(root / "eval")}
    params["registry"] = {**params["registry"], "out_dir": str(root / "register"),
                          "t2i": {"model_name": "tiny-t2i", "fid_threshold": 1e6, "recall_floor": 0.0, "class_accuracy_floor": 0.0}}  # fmt: skip
    path = str(write_params(root, params))
    # the ldm family's first half, what t2i trains on: an autoencoder export (an untrained one: its training run is
    # test_diffusion's and the e2e pipeline's) and the encode_latents stage's latents of it
    torch.manual_seed(0)
    build_autoencoder(AutoencoderConfig(**params["autoencoder"]), 1, scaling_factor=0.5).save_pretrained(root / "ae", safe_serialization=True)
    encoded = run_cli(["python", "-m", "pipelines.encode_latents", "--params", path], REPO)
    assert encoded.returncode == 0, encoded.stderr[-3000:]

    trained = run_cli(["python", "-m", "pipelines.train_t2i", "--params", path], REPO)
    assert trained.returncode == 0 and "2 worker(s) on cpu" in trained.stdout and "distinct)" in trained.stdout, trained.stderr[-3000:]
    meta = json.loads((root / "model" / "generator.json").read_text())
    assert meta["family"] == "t2i" and meta["step"] == 20 and meta["text_encoder"]["files_sha256"]
    losses = pd.read_csv(root / "losses.csv")
    assert list(losses["step"]) == [5, 10, 15, 20] and np.isfinite(losses["loss"]).all()

    evaluated = run_cli(["python", "-m", "pipelines.evaluate", "--family", "t2i", "--params", path], REPO)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((root / "eval" / "quick" / "t2i.json").read_text())  # one sample per reference image's caption (100)
    assert metrics["family"] == "t2i" and metrics["num_samples"] == 100 and np.isfinite(metrics["fid"])
    assert 0 <= metrics["brightness_agreement"] <= 1 and 0 <= metrics["size_agreement"] <= 1 and metrics["sampler"] == "dpmsolver++"

    registered = run_cli(["python", "-m", "pipelines.register", "--family", "t2i", "--params", path, "--require-promotion"], REPO)
    assert registered.returncode == 0 and "gate: PROMOTED tiny-t2i v" in registered.stdout, registered.stdout + registered.stderr[-3000:]

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/tiny-t2i@champion")
    prompts, seeds = ["a dark seven", "a one, filling the frame"], [1, 2]
    images = model.predict(pd.DataFrame({"prompt": prompts, "seed": seeds}), params={"num_steps": 3})
    assert images.shape == (2, 1, 32, 32) and images.dtype == np.uint8
    export, _ = TextDiffusionGenerator.from_pretrained(root / "model")  # the registered model answers as the export does
    from gen_core.sampling import to_uint8

    assert np.array_equal(images, to_uint8(export.sample(prompts, seeds, num_steps=3)).numpy())
    records = model.predict(pd.DataFrame({"prompt": prompts, "seed": seeds}), params={"format": "png", "num_steps": 2})
    assert list(records.columns) == ["prompt", "seed", "png"] and records["prompt"].tolist() == prompts
    with pytest.raises(MlflowException, match=r"columns \['label', 'seed'\]: expected exactly 'prompt' and 'seed'"):
        model.predict(pd.DataFrame({"label": [0], "seed": [0]}))
