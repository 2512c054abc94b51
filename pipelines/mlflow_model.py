"""MLflow "model from code" for a registered generator: nothing is pickled.

The registered artifact is this file, the gen_core package, and the generator directory
(GAN: generator.safetensors + generator.json; latent diffusion: unet/, vae/, scheduler/ in
diffusers format + generator.json). Loading builds the networks from their configs and the
safetensors weights.

    model = mlflow.pyfunc.load_model("models:/genforge-ldm@champion")
    images = model.predict(pd.DataFrame({"label": [0, 1, 2], "seed": [0, 1, 2]}))  # (N, C, H, W) uint8
"""

import mlflow
from mlflow.pyfunc import PythonModel


class GeneratorModel(PythonModel):
    def load_context(self, context):
        from gen_core.generators import load_image_generator

        self.generator, _ = load_image_generator(context.artifacts["generator"])

    def predict(self, context, model_input, params=None):
        import torch

        from gen_core.sampling import to_uint8

        labels = torch.tensor(model_input["label"].tolist(), dtype=torch.long)
        return to_uint8(self.generator.sample(labels, model_input["seed"].tolist())).numpy()


mlflow.models.set_model(GeneratorModel())
