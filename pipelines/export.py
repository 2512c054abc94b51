"""Stage `export`: a registered GAN version as ONNX, for ONNX Runtime.

    python -m pipelines.export [--family gan] [--model models:/genforge-gan@champion | models:/genforge-gan/3]

--model defaults to the registry's champion (registry.gan.model_name @ registry.alias). The version's weights
are read from the registry as safetensors + JSON (nothing unpickled) and written to
<serving.onnx_dir>/gan/generator.onnx with onnx.json beside it (the file's sha256, the version, opset, inputs).
The file is also logged to the version's run (artifact path onnx/v<version>/) and the version is tagged
`onnx_sha256` and `onnx_artifact`, so a served file can be checked against the registry. Rerunning it is safe:
an export whose sha256 the version already carries is not logged again.

Sampling through it: gen_core.onnx_gan.OnnxGanGenerator (the same seeded latents as the torch path).
The LDM (denoiser + decoder over ONNX Runtime) is not exported yet: --family ldm is refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

from gen_core.config import RunConfig
from gen_core.io import atomic_directory, atomic_write_json
from gen_core.onnx_gan import OPSET, export_gan_onnx
from pipelines.common import StageError, family_parser, log, run_stage
from pipelines.registry import load_registered_generator
from pipelines.tracking import connect, server_calls, tracking_uri

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def registered_version(client, model_uri: str):
    """models:/<name>@<alias> or models:/<name>/<version> -> the MLflow ModelVersion (one-line errors)."""
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.match(model_uri)
    if match is None:
        raise StageError(f"--model {model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    name = match["name"]
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(name, match["alias"])
        return client.get_model_version(name, match["version"])
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise StageError(f"--model {model_uri}: {str(err).splitlines()[0]}") from None
        raise


def export(cfg: RunConfig, family: str, model_uri: str | None = None) -> dict:
    """The version's generator -> <serving.onnx_dir>/<family>/ + its MLflow record -> the onnx.json record."""
    if family != "gan":
        raise StageError(f"export --family {family}: only the GAN generator is exported to ONNX so far")
    logger = log("export")
    gate = getattr(cfg.registry, family)
    model_uri = model_uri or f"models:/{gate.model_name}@{cfg.registry.alias}"
    mlflow = connect(cfg)
    with server_calls(tracking_uri(cfg), f"exporting {model_uri}"):
        client = mlflow.MlflowClient()
        version = registered_version(client, model_uri)
        source = f"models:/{version.name}/{version.version}"
        generator, meta = load_registered_generator(source)
        out = Path(cfg.serving.onnx_dir) / family
        with atomic_directory(out) as staging:
            sha256 = export_gan_onnx(generator.generator, staging / "generator.onnx")
            spec = generator.generator.spec
            record = {"family": family, "model_uri": model_uri, "model_name": version.name, "version": int(version.version),
                      "run_id": version.run_id, "sha256": sha256, "opset": OPSET, "step": meta.get("step"),
                      "inputs": {"z": ["n", spec.z_dim], "labels": ["n"]}, "outputs": {"images": ["n", spec.channels, spec.resolution, spec.resolution]},
                      "class_names": meta.get("class_names")}  # fmt: skip
            atomic_write_json(staging / "onnx.json", record)
        artifact, logged = f"onnx/v{version.version}", version.tags.get("onnx_sha256") == sha256
        if not logged:
            client.log_artifact(version.run_id, str(out / "generator.onnx"), artifact)
            client.set_model_version_tag(version.name, version.version, "onnx_artifact", f"runs:/{version.run_id}/{artifact}/generator.onnx")
            client.set_model_version_tag(version.name, version.version, "onnx_sha256", sha256)
    logger.info("%s (v%s, step %s) -> %s/generator.onnx, sha256 %s..., %s run %s as %s/", model_uri, version.version, meta.get("step"),
                out, sha256[:12], "already logged to" if logged else "logged to", version.run_id, artifact)  # fmt: skip
    return record


def main() -> None:
    parser = family_parser("genforge export stage: a registered version in ONNX for ONNX Runtime", "export")
    parser.add_argument("--model", help="the registered version (default: the family's champion), e.g. models:/genforge-gan/3")
    run_stage("export", lambda cfg, args: export(cfg, args.family, args.model) and 0, parser)


if __name__ == "__main__":
    main()
