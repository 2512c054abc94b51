"""Does `autoencoder.compile` change what the autoencoder's training step computes, or only how fast?

    python benchmarks/ae_compile_parity.py --project P models/autoencoder-quality-eager

One exported autoencoder (diffusers format, relative to project P after `make repro`), one training batch of P's
train split, the loop's posterior noise (gen_core.training.step_generator), the quality profile's loss
(profiles/ldm-quality.yaml: L1 + KL + LPIPS-VGG16): the round trip and LPIPS eager, then the same two modules through
torch.compile as the loop compiles them (pipelines.strategy.compile_in_place), in fp32 and under bf16 autocast (what the
loop runs). Prints, per precision and step: the loss eager and compiled, and the relative difference of the weight
gradients (with their cosine). Then, eager only, each term's gradient in bf16 against fp32 (what bf16 itself changes).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a project after make repro (its data/prepared)")
    parser.add_argument("autoencoder", help="an exported autoencoder directory, relative to the project")
    parser.add_argument("--steps", type=int, default=2, help="training steps' noise draws to compare (default 2)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.chdir(args.project)
    from diffusers import AutoencoderKL

    from gen_core.config import load_config
    from gen_core.data import load_split
    from gen_core.diffusion import AutoencoderRoundTrip, autoencoder_loss
    from gen_core.lpips import load_lpips
    from gen_core.sampling import to_unit
    from gen_core.training import step_generator
    from pipelines.strategy import compile_in_place

    torch.set_num_threads(os.cpu_count() or 1)
    a = load_config(REPO / "params.yaml", overlays=[REPO / "profiles/ldm-quality.yaml"]).autoencoder
    images = to_unit(torch.from_numpy(load_split("data/prepared", "train").images[: a.global_batch_size]))
    eager = (AutoencoderRoundTrip(AutoencoderKL.from_pretrained(args.autoencoder).train()), load_lpips("cpu"))
    compiled = tuple(copy.deepcopy(module) for module in eager)
    for module in compiled:
        compile_in_place(module)  # as the loop compiles them

    def term_loss(term: str, round_trip, lpips, noise) -> torch.Tensor:
        if term == "all":  # the loop's loss, as train_autoencoder computes it
            losses, _ = autoencoder_loss(round_trip.forward, images, a.reconstruction_loss, a.kl_weight, noise, lpips,
                                         a.perceptual_weight, a.perceptual_images)  # fmt: skip
            return losses.mean()
        reconstruction, mean, logvar = round_trip(images, noise)
        if term == "l1":
            return (reconstruction.float() - images).abs().flatten(1).mean(1).mean()
        if term == "kl":
            kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)
            return a.kl_weight * kl.mean()
        return a.perceptual_weight * lpips(reconstruction, images).float().mean()

    def step(modules, bf16: bool, index: int, term: str = "all") -> tuple[float, torch.Tensor]:
        round_trip, lpips = modules
        round_trip.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = term_loss(term, round_trip, lpips, step_generator(a.seed, index, 0))
        loss.backward()
        return loss.item(), torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in round_trip.parameters()])

    def compare(g: torch.Tensor, h: torch.Tensor) -> str:
        cosine = torch.nn.functional.cosine_similarity(g, h, dim=0).item()
        return f"gradient rel diff {(g - h).norm() / g.norm():.3g}, cosine {cosine:.6f}, |g| {g.norm():.4g} vs {h.norm():.4g}"

    print(f"loss: {a.reconstruction_loss} + {a.kl_weight:g} KL + {a.perceptual_weight:g} LPIPS-VGG16; batch {len(images)}; {args.autoencoder}")
    for bf16 in (False, True):
        for index in range(args.steps):
            (le, ge), (lc, gc) = step(eager, bf16, index), step(compiled, bf16, index)
            precision = "bf16" if bf16 else "fp32"
            print(f"{precision} step {index}: loss eager {le:.7g} compiled {lc:.7g}; compiled vs eager {compare(ge, gc)}", flush=True)
    for term in ("l1", "kl", "lpips"):
        (l32, g32), (l16, g16) = step(eager, False, 0, term), step(eager, True, 0, term)
        print(f"eager {term}: loss fp32 {l32:.6g} bf16 {l16:.6g}; bf16 vs fp32 {compare(g32, g16)}", flush=True)


if __name__ == "__main__":
    main()
