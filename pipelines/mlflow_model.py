"""MLflow "model from code" for a registered generator: nothing is pickled.

The registered artifact is this file, the gen_core package, and the generator directory
(GAN: generator.safetensors + generator.json; latent diffusion: unet/, vae/, scheduler/ in
diffusers format + generator.json). Loading builds the networks from their configs and the
safetensors weights.

    model = mlflow.pyfunc.load_model("models:/genforge-ldm@champion")
    images = model.predict(pd.DataFrame({"label": [0, 1, 2], "seed": [0, 1, 2]}))  # (N, C, H, W) uint8
    records = model.predict(pd.DataFrame({"label": ["sneaker"], "seed": [7]}), params={"format": "png", "num_steps": 10})

A text-to-image model (genforge-t2i) takes rows of `prompt` and `seed`, with the diffusion settings:
    model.predict(pd.DataFrame({"prompt": ["a dark sneaker", "a light dress, filling the frame"], "seed": [1, 2]}))

An image-to-image model (genforge-pix2pix) takes rows of `image` (base64 PNG, at the model's resolution) instead, with
params `format` and `input` (condition: the image is the model's input, e.g. an edge map; image: make the input from it):
    model.predict(pd.DataFrame({"image": [edge_map_png_b64]}), params={"format": "png"})

A request (gen_core.image_requests): rows of `label` (class id or name) and `seed`; params `format` (array | png: one
record per image with its label, class_name, seed and a base64 PNG), and for a diffusion model `sampler`,
`num_steps`, `guidance_scale` (unset: the model's own). A bad request raises an MlflowException with one line
(INVALID_PARAMETER_VALUE: HTTP 400 from a scoring server), before any sampling. GENFORGE_MAX_IMAGES caps the
images per request (default 256).
"""

import os

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class GeneratorModel(PythonModel):
    def load_context(self, context):
        from gen_core.generators import load_image_generator
        from gen_core.image_requests import MAX_IMAGES

        self.generator, self.meta = load_image_generator(context.artifacts["generator"])
        self.max_images = int(os.environ.get("GENFORGE_MAX_IMAGES") or MAX_IMAGES)

    # the hint is one MLflow infers no schema from (it validates nothing, as without one) and stops its "add type hints"
    # warning at every log and load; the rows' columns are checked below (the model has no input schema: see registry)
    def predict(self, context, model_input: pd.DataFrame, params=None):
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from gen_core.image_requests import RequestError, answer, parse_request
        from gen_core.sampling import to_uint8

        names = self.meta.get("class_names") or []
        columns = set(getattr(model_input, "columns", ()))
        if self.meta.get("family") == "pix2pix":
            return self._translate(model_input, columns, params)
        if self.meta.get("family") == "t2i":
            return self._from_prompts(model_input, columns, params)
        try:
            if columns != {"label", "seed"}:
                raise RequestError(f"columns {sorted(columns)}: expected exactly 'label' and 'seed' (one row per image)")
            request = parse_request(model_input["label"].tolist(), model_input["seed"].tolist(), params, names,
                                    self.generator.num_classes, self.meta.get("family", "gan"), self.max_images)  # fmt: skip
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        with torch.no_grad():
            images = self.generator.sample(request.labels, request.seeds, **request.options)
        return answer(to_uint8(images).numpy(), request, names)

    def _from_prompts(self, model_input, columns, params):
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from gen_core.image_requests import RequestError, parse_prompt_request, prompt_answer
        from gen_core.sampling import to_uint8

        try:
            if columns != {"prompt", "seed"}:
                raise RequestError(f"columns {sorted(columns)}: expected exactly 'prompt' and 'seed' (one row per image)")
            request = parse_prompt_request(model_input["prompt"].tolist(), model_input["seed"].tolist(), params, self.max_images)
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        with torch.no_grad():
            images = self.generator.sample(request.prompts, request.seeds, **request.options)
        return prompt_answer(to_uint8(images).numpy(), request)

    def _translate(self, model_input, columns, params):
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from gen_core.image_requests import RequestError, parse_translation_request, translation_answer
        from gen_core.sampling import to_uint8

        try:
            if columns != {"image"}:
                raise RequestError(f"columns {sorted(columns)}: expected exactly 'image' (one base64 PNG per translation)")
            request = parse_translation_request(model_input["image"].tolist(), params, self.meta["resolution"], self.max_images)
            if request.input == "image" and self.meta["condition"] == "pairs":
                raise RequestError("input 'image': this model was trained on user pairs, whose inputs cannot be made from images; send the inputs (input 'condition')")
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        with torch.no_grad():
            images = self.generator.translate(self.generator.inputs(request.images, request.input))
        return translation_answer(to_uint8(images).numpy(), request)


mlflow.models.set_model(GeneratorModel())
