"""The Gradio demo: each family's champion from the MLflow registry, in a browser.

    python -m pipelines.demo                      (make demo)  -> http://127.0.0.1:7860
    python -m pipelines.demo --model-uri models:/genforge-gan/3 --port 0

Loads `models:/<registry.<family>.model_name>@<registry.alias>` for each family (or the versions given with
--model-uri, whose family the version itself says) from safetensors + JSON, never a pickle, and serves them
through ONNX Runtime when `python -m pipelines.export` wrote that very version (sha256-checked), else torch.
The page: family, class, number of images, seed and, for the diffusion model, sampler, steps and guidance; a
Generate button; the grid; under it the version, its aliases, its gated metrics with their floors and
protocol, the backend and the training run. A family without a champion is said in one line on the page.
Binds serving.demo_host (127.0.0.1) on serving.demo_port; the champions are read at start (restart to pick up
a new one).
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from gen_core.config import SamplerConfig
from gen_core.image_requests import SAMPLERS
from pipelines.common import StageError, log, run_stage, stage_parser
from pipelines.registry import champion_uri
from pipelines.serving import ServedModel, open_registered

FAMILIES = ("gan", "ldm")
LABELS = {"gan": "GAN", "ldm": "latent diffusion"}
COLUMNS, SCALE = 8, 4  # the grid: up to 8 images a row, each shown at 4x (nearest neighbour)


def grid_image(images_uint8: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """(N, C, H, W) uint8 -> an RGB grid of as few rows as hold COLUMNS images each, filled evenly (10 images: 2 rows
    of 5), each pixel shown `scale` x `scale`."""
    import torch

    from gen_core.sampling import image_grid

    n = len(images_uint8)
    grid = image_grid(torch.from_numpy(images_uint8), rows=math.ceil(n / COLUMNS))
    grid = np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid
    return np.kron(grid, np.ones((scale, scale, 1), dtype=np.uint8))


def generate(model: ServedModel, class_name: str, count: int, seed: int, cap: int, sampler: str | None = None,
             steps: int | None = None, guidance: float | None = None) -> np.ndarray:  # fmt: skip
    """`count` images of one class, seeds seed..seed+count-1 -> the grid. ValueError (one line) for bad input."""
    import torch

    from gen_core.sampling import to_uint8

    names = model.class_names
    if class_name not in names:
        raise ValueError(f"class {class_name!r}: not a class of {model.name} v{model.version} ({', '.join(names)})")
    if not 1 <= int(count) <= cap:
        raise ValueError(f"{int(count)} images: between 1 and {cap} (serving.max_images) a request")
    options = {}
    if model.family == "ldm":
        options = {"sampler": sampler, "num_steps": int(steps) if steps else None, "guidance_scale": guidance}
        if sampler not in (None, *SAMPLERS):
            raise ValueError(f"sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
        if options["num_steps"] is not None and options["num_steps"] < 1:
            raise ValueError(f"steps {steps}: at least 1")
        if guidance is not None and guidance < 0:
            raise ValueError(f"guidance {guidance}: at least 0")
    labels = torch.full((int(count),), names.index(class_name), dtype=torch.long)
    seeds = [int(seed) + i for i in range(int(count))]
    with torch.no_grad():
        images = model.generator.sample(labels, seeds, "cpu", **{k: v for k, v in options.items() if v is not None})
    return grid_image(to_uint8(images.float().cpu()).numpy())


def load_models(cfg, model_uris: list[str]) -> tuple[dict[str, ServedModel], dict[str, str]]:
    """-> (family -> model, family -> why it has none). A --model-uri that does not open is an error; a family
    without a champion is not (the page says so)."""
    logger = log("demo")
    models, missing = {}, {}
    for uri in model_uris:
        model = open_registered(cfg, None, uri)
        if model.family in models:
            raise StageError(f"--model-uri {uri}: a second {model.family} model (one per family)")
        models[model.family] = model
    for family in FAMILIES:
        if family in models:
            continue
        try:
            models[family] = open_registered(cfg, family)
        except StageError as err:
            why = str(err).split(": ", 2)[-1].rstrip(".")
            missing[family] = f"{champion_uri(cfg, family)}: none to show ({why}); run `dvc repro`, or promote a version"
    for family, model in models.items():
        logger.info("%s: %s v%s via %s (%s)", family, model.name, model.version, model.backend, model.backend_note)
    for line in missing.values():
        logger.info("%s", line)
    return models, missing


def build_app(models: dict[str, ServedModel], missing: dict[str, str], cap: int):
    import gradio as gr

    families = [f for f in FAMILIES if f in models]
    first = families[0] if families else None
    notes = "\n\n".join(f"**{LABELS[f]}**: {line}" for f, line in missing.items())

    def controls(family: str | None):
        model = models.get(family)
        ldm = model is not None and model.family == "ldm"
        sampler = model.generator.sampler if ldm else SamplerConfig()
        return (
            gr.update(choices=model.class_names if model else [], value=model.class_names[0] if model else None),
            gr.update(visible=ldm), gr.update(value=sampler.name), gr.update(value=sampler.num_steps), gr.update(value=sampler.guidance_scale),
            model.summary() if model else "",
        )  # fmt: skip

    def run(family, class_name, count, seed, sampler, steps, guidance):
        model = models.get(family)
        if model is None:
            raise gr.Error(missing.get(family, f"no {family} model loaded"))
        try:
            return generate(model, class_name, count, seed, cap, sampler, steps, guidance), model.summary()
        except ValueError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="genforge") as app:
        gr.Markdown("## genforge: the registry's champions")
        gr.Markdown(notes, elem_id="missing")
        with gr.Row():
            with gr.Column(scale=1):
                family = gr.Radio([(LABELS[f], f) for f in families], value=first, label="model family", elem_id="family")
                class_name = gr.Dropdown(choices=models[first].class_names if first else [], label="class", elem_id="class",
                                         value=models[first].class_names[0] if first else None)  # fmt: skip
                count = gr.Slider(1, cap, value=min(8, cap), step=1, label="images", elem_id="count")
                seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
                with gr.Group(visible=first == "ldm") as diffusion:
                    sampler = gr.Dropdown(list(SAMPLERS), value=SamplerConfig().name, label="sampler", elem_id="sampler")
                    steps = gr.Slider(1, 100, value=SamplerConfig().num_steps, step=1, label="steps", elem_id="steps")
                    guidance = gr.Slider(0, 10, value=SamplerConfig().guidance_scale, step=0.25, label="guidance", elem_id="guidance")
                button = gr.Button("Generate", variant="primary", elem_id="generate", interactive=bool(families))
            with gr.Column(scale=2):
                grid = gr.Image(label="samples", type="numpy", format="png", elem_id="grid", interactive=False)
                summary = gr.Markdown(models[first].summary() if first else "", elem_id="summary")
        family.change(controls, family, [class_name, diffusion, sampler, steps, guidance, summary])
        button.click(run, [family, class_name, count, seed, sampler, steps, guidance], [grid, summary])
        app.load(controls, family, [class_name, diffusion, sampler, steps, guidance, summary])
    return app


def serve(cfg, args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline and private: no usage reports
    import logging

    import gradio as gr

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests to itself

    models, missing = load_models(cfg, args.model_uri)
    app = build_app(models, missing, cfg.serving.max_images)
    host, port = args.host or cfg.serving.demo_host, cfg.serving.demo_port if args.port is None else args.port
    # system fonts: the default theme's web fonts would be fetched from a CDN
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        app.launch(server_name=host, server_port=port or None, share=False, theme=theme, show_error=True, quiet=False)
    except OSError as err:
        raise StageError(f"demo at {host}:{port}: {err}") from None
    return 0


def main() -> None:
    parser = stage_parser("genforge demo: the registry's champions in a Gradio app", stage="demo")
    parser.add_argument("--model-uri", action="append", default=[], help="a registered version to show instead of its family's champion, "
                        "e.g. models:/genforge-gan/3 (once per family)")  # fmt: skip
    parser.add_argument("--host", help="address to bind (default serving.demo_host: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default serving.demo_port; 0: any free one)")
    run_stage("demo", serve, parser, report_time=False)


if __name__ == "__main__":
    main()
