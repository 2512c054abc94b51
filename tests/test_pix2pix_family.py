"""The pix2pix family through the product: the exported Translator (round trip, refusals), a translation request
(one-line errors naming the row), seeded determinism of the training step, and the stages on a real 2-worker Ray run,
evaluated, registered in a real MLflow server and answering an image request by alias."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest
import torch

from gen_core.checkpoint import CheckpointError, export_generator
from gen_core.config import ConfigError, load_config
from gen_core.image_requests import RequestError, parse_translation_request
from gen_core.pix2pix import Translator, UNetGenerator, build_patch_discriminator, condition_images
from gen_core.sampling import png_bytes
from tests.conftest import REPO, run_cli, tiny_params, upstream_sections, write_params

SPEC = {"in_channels": 1, "out_channels": 1, "width": 8, "levels": 3}


def garments(n: int = 4) -> np.ndarray:
    """Real Fashion-MNIST images as prepare stores them: (N, 1, 32, 32) uint8 (28 padded to 32)."""
    from gen_core.data import DEFAULT_SOURCE_URIS, FASHION_MNIST_CLASSES, read_idx_dataset

    raw = read_idx_dataset(DEFAULT_SOURCE_URIS["fashion_mnist"], FASHION_MNIST_CLASSES)
    return np.pad(raw.eval.images[:n].transpose(0, 3, 1, 2), ((0, 0), (0, 0), (2, 2), (2, 2)))


def exported(tmp_path, family: str = "pix2pix") -> tuple[UNetGenerator, object]:
    torch.manual_seed(0)
    G = UNetGenerator(**SPEC)
    meta = {"family": family, "generator_spec": SPEC, "condition": "edges", "edge_threshold": 0.2, "resolution": 32, "channels": 1,
            "class_names": [str(i) for i in range(10)], "step": 1}  # fmt: skip
    export_generator(tmp_path, G.state_dict(), meta)
    return G.eval(), tmp_path


def test_the_exported_translator_reloads_and_translates_as_trained(tmp_path):
    G, directory = exported(tmp_path)
    translator = Translator.load(directory)
    images = garments()
    a = condition_images(images)
    assert a.shape == (4, 1, 32, 32) and set(a.unique().tolist()) == {-1.0, 1.0}  # binary edge maps
    with torch.no_grad():
        assert torch.equal(translator.translate(a), G(a))
    assert torch.equal(translator.from_images(images), translator.translate(a))
    # a request's edge map as a PNG (0 / 255) is the same input as the one made from the image
    assert torch.equal(translator.inputs(((a + 1) * 127.5).round().to(torch.uint8).numpy(), "condition"), a)
    with pytest.raises(ValueError, match=r"pix2pix input of shape \(4, 3, 32, 32\): expected \(N, 1, 32, 32\)"):
        translator.translate(torch.zeros(4, 3, 32, 32))


def test_a_gan_export_is_not_loaded_as_a_translator(tmp_path):
    _, directory = exported(tmp_path, family="gan")
    with pytest.raises(CheckpointError, match="generator.json: a gan model, not pix2pix"):
        Translator.load(directory)


def test_translation_requests_are_checked_whole_with_one_line_errors():
    png = base64.b64encode(png_bytes(np.zeros((32, 32, 1), np.uint8))).decode()
    request = parse_translation_request([png, np.zeros((3, 32, 32), np.uint8)], {"input": "image"}, 32)
    assert request.images.shape == (2, 3, 32, 32) and request.input == "image" and request.format == "array"
    cases = [
        ([png], {"inputs": "image"}, "unknown setting 'inputs' (settings: format, input)"),
        ([png], {"input": "photo"}, "input 'photo': one of condition, image"),
        ([], None, "no rows: give one `image` (a base64 PNG) per translation"),
        ([png, "bm90IGFuIGltYWdl"], None, "image row 1: not a base64 PNG or JPEG"),
        ([np.zeros((28, 28), np.uint8)], None, "image row 0: 1x28x28; expected 32x32, grey or RGB"),
        ([np.zeros((32, 32), np.float32)], None, "image row 0: an array must be uint8 (got float32)"),
    ]
    for images, params, message in cases:
        with pytest.raises(RequestError) as err:
            parse_translation_request(images, params, 32)
        assert str(err.value) == message
    with pytest.raises(RequestError, match="3 images: at most 2 a request"):
        parse_translation_request([png] * 3, None, 32, max_images=2)


def test_the_generator_depth_must_divide_the_resolution():
    with pytest.raises(ConfigError, match=r"pix2pix.model.g_levels \(6\): data.resolution \(32\) must be divisible by 2\*\*6"):
        load_config(REPO / "params.yaml", ["pix2pix.model.g_levels=6"])


def test_the_training_step_is_seeded_and_lowers_l1():
    """The stage's step (train_pix2pix.pix2pix_step) in one process (the DDP strategy at world size 1): the same seed gives the same
    weights, bit for bit, and a few steps on real edge -> garment pairs lower the L1 to the targets."""
    from contextlib import nullcontext

    from gen_core.sampling import to_unit
    from pipelines.strategy import Strategy
    from pipelines.train_pix2pix import pix2pix_step

    images = garments(16)
    a, b = condition_images(images), to_unit(torch.from_numpy(images))

    def run() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        strategy = Strategy(torch.device("cpu"))
        G = strategy.wrap("G", UNetGenerator(**SPEC), lambda p: torch.optim.Adam(p, 2e-3, betas=(0.5, 0.999)))
        D = strategy.wrap("D", build_patch_discriminator(1, 1, 32, 8), lambda p: torch.optim.Adam(p, 2e-4, betas=(0.5, 0.999)))
        l1 = [float(pix2pix_step(G, D, a, b, 100.0, nullcontext)["l1"]) for _ in range(15)]
        return l1, torch.cat([p.detach().flatten() for p in G.module.parameters()])

    (l1, weights), (l1_again, weights_again) = run(), run()
    assert torch.equal(weights, weights_again) and l1 == l1_again
    assert all(np.isfinite(l1)) and l1[-1] < 0.7 * l1[0], l1


def test_user_pairs_are_prepared_trained_on_and_evaluated_by_their_inputs(tmp_path):
    """pix2pix.condition pairs: a side-by-side image folder through the prepare stage, the stage's step trains G on the
    user's inputs (L1 falls), and the evaluation translates each reference image's own input (its L1 is that of the
    export's translation of it). Without pairs in the data the stage refuses in one line before Ray; a pairs model's
    inputs are the request's images, fitted to its channels, and are never made from images."""
    from contextlib import nullcontext

    from PIL import Image

    from gen_core.config import InceptionConfig, config_from_dict
    from gen_core.data import load_split
    from gen_core.metrics import load_inception
    from gen_core.models import Classifier
    from gen_core.pix2pix import generator_spec, pair_inputs
    from gen_core.sampling import to_uint8, to_unit
    from pipelines.common import StageError
    from pipelines.evaluation import paired_features_for_indices
    from pipelines.prepare import prepare
    from pipelines.strategy import Strategy
    from pipelines.train_pix2pix import check_pairs, pix2pix_step

    images = garments(40)  # (40, 1, 32, 32): inputs A are the inverted garments, side by side with them
    for i, image in enumerate(images):
        (tmp_path / "side" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([255 - image[0], image[0]], axis=1)).save(tmp_path / "side" / f"class_{i % 2}" / f"{i}.png")
    sections = {"data": {"source": "image_folder", "source_uri": str(tmp_path / "side"), "pairs": "side_by_side", "eval_images": 10,
                         "out_dir": str(tmp_path / "prepared")}, "pix2pix": {"condition": "pairs"},
                "evaluate": {"kid_subset_size": 10, "protocols": {"quick": {"num_samples": 20}}}}  # sized for 40 images  # fmt: skip
    cfg = config_from_dict(tiny_params(**sections), "test")
    prepare(cfg)
    check_pairs(cfg)  # the data has pairs: no refusal
    train, evals = load_split(str(tmp_path / "prepared"), "train"), load_split(str(tmp_path / "prepared"), "eval")
    a, b = pair_inputs(train, "pairs", None), to_unit(torch.from_numpy(train.images))
    assert torch.allclose(a, -b, atol=1e-6)  # each target with its own input

    spec = generator_spec(cfg.pix2pix.model.model_copy(update={"g_width": 8}), 1, "pairs")
    torch.manual_seed(0)
    strategy = Strategy(torch.device("cpu"))
    G = strategy.wrap("G", UNetGenerator(**spec), lambda p: torch.optim.Adam(p, 2e-3, betas=(0.5, 0.999)))
    D = strategy.wrap("D", build_patch_discriminator(1, 1, 32, 8), lambda p: torch.optim.Adam(p, 2e-4, betas=(0.5, 0.999)))
    l1 = [float(pix2pix_step(G, D, a, b, 100.0, nullcontext)["l1"]) for _ in range(15)]
    assert l1[-1] < 0.7 * l1[0], l1

    meta = {"family": "pix2pix", "generator_spec": spec, "condition": "pairs", "edge_threshold": None, "resolution": 32, "channels": 1,
            "class_names": train.class_names, "step": 15}  # fmt: skip
    export_generator(tmp_path / "model", G.module.state_dict(), meta)
    translator = Translator.load(tmp_path / "model")
    features = paired_features_for_indices(translator, "pix2pix", evals, Classifier(1, 2, width=8), load_inception(InceptionConfig()),
                                           np.arange(10), 0, 5, "cpu")  # fmt: skip
    made = translator.translate(pair_inputs(evals, "pairs", None)).clamp(-1, 1)
    expected = ((made + 1) * 127.5).round() / 127.5 - 1  # as saved: uint8
    assert np.allclose(features["l1"], (expected - to_unit(torch.from_numpy(evals.images))).abs().flatten(1).mean(1).numpy(), atol=1e-6)
    assert torch.equal(translator.inputs(evals.inputs), pair_inputs(evals, "pairs", None))
    with pytest.raises(ValueError, match="a model trained on user pairs cannot make its inputs from images"):
        translator.inputs(evals.images, "image")
    # the registered model's code (MLflow's own context class, the export as its artifact): the inputs answer as the
    # export does; `input: image` is a request error (HTTP 400 when served), not a failure inside the model
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModelContext

    from pipelines.mlflow_model import GeneratorModel

    served = GeneratorModel()
    served.load_context(PythonModelContext(artifacts={"generator": str(tmp_path / "model")}, model_config=None))
    rows = pd.DataFrame({"image": [base64.b64encode(png_bytes(image.transpose(1, 2, 0))).decode() for image in evals.inputs[:2]]})
    assert np.array_equal(served.predict(None, rows), to_uint8(translator.translate(pair_inputs(evals, "pairs", None)[:2])).numpy())
    with pytest.raises(MlflowException, match=r"^input 'image': this model was trained on user pairs, whose inputs cannot be made from images"):
        served.predict(None, rows, params={"input": "image"})

    plain = config_from_dict(tiny_params(data={"out_dir": str(tmp_path / "plain")}, pix2pix={"condition": "pairs"}), "test")
    prepare(plain)
    with pytest.raises(StageError, match=rf"^pix2pix.condition pairs: {tmp_path}/plain has no pairs \(prepare an image_folder with data.pairs"):
        check_pairs(plain)


@pytest.mark.slow
def test_pix2pix_trains_on_two_workers_is_evaluated_registered_and_translates_by_alias(tiny_upstream, mlflow_server):
    import mlflow
    from mlflow.exceptions import MlflowException

    root = tiny_upstream / "pix2pix"
    root.mkdir()
    params = tiny_params(**upstream_sections(tiny_upstream))
    params["tracking"]["tracking_uri"] = mlflow_server
    params["ray"] = {**params["ray"], "storage_path": str(root / "runs")}
    params["outputs"] = {"pix2pix": {"out_dir": str(root / "model"), "losses_file": str(root / "losses.csv")}}
    params["evaluate"] = {**params["evaluate"], "out_dir": str(root / "eval")}
    # the gate's thresholds are the test's: the tiny model must pass them to be loadable by alias
    params["registry"] = {**params["registry"], "out_dir": str(root / "register"),
                          "pix2pix": {"model_name": "tiny-pix2pix", "fid_threshold": 1e6, "recall_floor": 0.0, "class_accuracy_floor": 0.0}}  # fmt: skip
    path = str(write_params(root, params))

    trained = run_cli(["python", "-m", "pipelines.train_pix2pix", "--params", path], REPO)
    assert trained.returncode == 0 and "2 worker(s) on cpu" in trained.stdout and "edges pairs" in trained.stdout, trained.stderr[-3000:]
    meta = json.loads((root / "model" / "generator.json").read_text())
    assert meta["family"] == "pix2pix" and meta["step"] == 20 and meta["condition"] == "edges"
    losses = pd.read_csv(root / "losses.csv")
    assert list(losses["step"]) == [5, 10, 15, 20] and np.isfinite(losses[["d_loss", "g_loss", "l1"]].to_numpy()).all()

    evaluated = run_cli(["python", "-m", "pipelines.evaluate", "--family", "pix2pix", "--params", path], REPO)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((root / "eval" / "quick" / "pix2pix.json").read_text())  # every reference image translated (100)
    assert metrics["family"] == "pix2pix" and metrics["num_samples"] == 100 and 0 < metrics["l1"] < 2 and metrics["psnr"] > 0
    assert np.isfinite(metrics["fid"]) and "floor" in metrics

    registered = run_cli(["python", "-m", "pipelines.register", "--family", "pix2pix", "--params", path, "--require-promotion"], REPO)
    assert registered.returncode == 0 and "gate: PROMOTED tiny-pix2pix v" in registered.stdout, registered.stdout + registered.stderr[-3000:]

    mlflow.set_tracking_uri(mlflow_server)
    version = mlflow.MlflowClient().get_model_version_by_alias("tiny-pix2pix", "champion")
    assert {"l1", "psnr", "fid", "protocol_id"} <= set(version.tags) and version.tags["model_family"] == "pix2pix"
    model = mlflow.pyfunc.load_model("models:/tiny-pix2pix@champion")
    images = garments(3)
    edge_maps = [base64.b64encode(png_bytes(((a[0].numpy() + 1) * 127.5).astype(np.uint8)[..., None])).decode() for a in condition_images(images)]
    out = model.predict(pd.DataFrame({"image": edge_maps}))
    assert out.shape == (3, 1, 32, 32) and out.dtype == np.uint8
    from_images = model.predict(pd.DataFrame({"image": [base64.b64encode(png_bytes(im.transpose(1, 2, 0))).decode() for im in images]}),
                                params={"input": "image", "format": "png"})  # fmt: skip
    assert list(from_images.columns) == ["row", "png"] and len(from_images) == 3
    translator = Translator.load(root / "model")  # the registered model answers as the export does
    assert np.array_equal(out, ((translator.from_images(images).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
    with pytest.raises(MlflowException, match=r"columns \['label', 'seed'\]: expected exactly 'image'"):
        model.predict(pd.DataFrame({"label": [0], "seed": [0]}))


def test_the_conditional_families_are_a_pipeline_of_their_own(project_copy):
    """`dvc repro conditional/dvc.yaml` resolves its own stages on the root params.yaml, and the default stages they need
    (not the GAN's); the default `dvc repro` reads dvc.yaml only (DVC's default target), so its 15 minutes are unchanged."""
    status = run_cli(["dvc", "status", "--json", "--with-deps", "conditional/dvc.yaml"], project_copy)
    assert status.returncode == 0, status.stderr[-2000:]
    stale = set(json.loads(status.stdout))
    ours = {f"conditional/dvc.yaml:{stage}_{family}" for stage in ("train", "evaluate", "register") for family in ("pix2pix", "t2i")}
    assert ours <= stale and {"prepare", "classifier", "ref_stats", "train_autoencoder", "encode_latents"} <= stale, stale
    assert not stale & {"train_gan", "train_ldm", "evaluate@gan", "register@ldm"}, stale
