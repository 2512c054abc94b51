"""The registered model's requests (gen_core.image_requests): class ids and names, seeds, settings, each
problem one line before any sampling, and PNG answers that decode to the images."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from gen_core.image_requests import RequestError, answer, class_id, parse_request

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_labels_are_ids_or_names_and_settings_are_the_models_unless_given():
    request = parse_request([7, "sneaker", "Bag", "3", np.int64(1), 2.0], [0, 1, 2, 3, 4, 5], None, NAMES, 10, "gan")
    assert request.labels.tolist() == [7, 7, 8, 3, 1, 2] and request.seeds == [0, 1, 2, 3, 4, 5]
    assert request.options == {} and request.format == "array"
    ldm = parse_request([0], [9], {"sampler": "ddim", "num_steps": 10, "guidance_scale": 0.0, "format": "png"}, NAMES, 10, "ldm")
    assert ldm.options == {"sampler": "ddim", "num_steps": 10, "guidance_scale": 0.0} and ldm.format == "png"
    # the "not given" values MLflow's params schema fills in leave the model's own settings
    assert parse_request([0], [9], {"sampler": "", "num_steps": 0, "guidance_scale": -1.0}, NAMES, 10, "ldm").options == {}


@pytest.mark.parametrize(
    ("labels", "seeds", "params", "family", "message"),
    [
        (["dog"], [0], None, "gan", "label 'dog': not a class of this model (0 T-shirt/top, 1 Trouser,"),
        ([10], [0], None, "gan", "label 10: not a class of this model"),
        ([-1], [0], None, "gan", "label -1: not a class of this model"),
        ([True], [0], None, "gan", "label True: not a class of this model"),
        ([1.5], [0], None, "gan", "label 1.5: not a class of this model"),
        ([1, 2], [0], None, "gan", "2 labels but 1 seeds: one seed per image"),
        ([], [], None, "gan", "no rows: give one `label` (class id or name) and one `seed` per image"),
        ([1] * 5, list(range(5)), None, "gan", "5 images: at most 4 a request"),
        ([1], ["x"], None, "gan", "seed 'x': an integer"),
        ([1], [-3], None, "gan", "seed -3: between 0 and 2**63 - 1"),
        ([1], [0], {"format": "jpeg"}, "gan", "format 'jpeg': one of array, png"),
        ([1], [0], {"formt": "png"}, "gan", "unknown setting 'formt' (settings: format, sampler, num_steps, guidance_scale)"),
        ([1], [0], {"num_steps": 5}, "gan", "num_steps: settings of a diffusion model; this is a gan"),
        ([1], [0], {"sampler": "euler"}, "ldm", "sampler 'euler': one of ddpm, ddim, dpmsolver++, heun"),
    ],
)
def test_a_bad_request_is_one_line(labels, seeds, params, family, message):
    with pytest.raises(RequestError) as err:
        parse_request(labels, seeds, params, NAMES, 10, family, max_images=4)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_model_without_class_names_lists_its_ids():
    with pytest.raises(RequestError, match=r"label 'shoe': not a class of this model \(ids 0\.\.3\)"):
        class_id("shoe", [], 4)


def test_png_answers_decode_to_the_images():
    images = np.random.default_rng(0).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8)
    request = parse_request(["sneaker", 0], [5, 6], {"format": "png"}, NAMES, 10, "gan")
    records = answer(images, request, NAMES)
    assert records[["label", "class_name", "seed"]].values.tolist() == [[7, "Sneaker", 5], [0, "T-shirt/top", 6]]
    for image, encoded in zip(images, records["png"]):
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
        assert np.array_equal(decoded, image[0])
    assert answer(images, parse_request([0, 1], [5, 6], None, NAMES, 10, "gan"), NAMES) is images
