"""MLflow "model from code" for a registered generator: nothing is pickled.

The registered artifact is this file, the gen_core package, and the generator directory
(generator.safetensors + generator.json). Loading builds the network from the spec and the
safetensors weights.

    model = mlflow.pyfunc.load_model("models:/genforge-gan@champion")
    images = model.predict(pd.DataFrame({"label": [0, 1, 2], "seed": [0, 1, 2]}))  # (N, C, H, W) uint8
"""

import mlflow
from mlflow.pyfunc import PythonModel


class GeneratorModel(PythonModel):
    def load_context(self, context):
        from gen_core.checkpoint import load_generator

        self.generator, _ = load_generator(context.artifacts["generator"])

    def predict(self, context, model_input, params=None):
        import torch

        from gen_core.sampling import sample_gan, to_uint8

        labels = torch.tensor(model_input["label"].tolist(), dtype=torch.long)
        num_classes = self.generator.spec.num_classes
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"label out of range 0..{num_classes - 1}")
        return to_uint8(sample_gan(self.generator, labels, model_input["seed"].tolist())).numpy()


mlflow.models.set_model(GeneratorModel())
