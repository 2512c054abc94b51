"""Fine-tune an exported autoencoder's decoder with its encoder frozen (what Stable Diffusion did for its ft-MSE/ft-EMA
decoders): the latents, and so any denoiser trained on them, stay valid. Measures whether the decoder alone still has
reconstruction quality to give, before such a phase is built into train_autoencoder.

    python benchmarks/ae_decoder_finetune.py --project P --autoencoder models/autoencoder-quality --steps 600 \
        [--adversarial 0.5] [--eval-every 200] --out /tmp/decoder-ft

The loop is train_autoencoder's on the decoder: batch 64 of the project's train split in the order of --seed, L1 +
LPIPS-VGG16 on every image (weight 1), bf16 under the training forward's context, Adam at --lr from fresh state, the
posterior sampled (noise seed 0); with --adversarial w, the PatchGAN term with the adaptive weight times w, and its D (the
stage's defaults) from step 0. Judged by the reconstruction FID of the 1,000 eval images through the posterior mean
against the quick protocol's reference (the same 1,000 images; bf16 Inception; ref_stats in P), and PSNR; the first
line is the autoencoder before. One JSON line at the end; the fine-tuned autoencoder goes to --out (diffusers format).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gen_core.config import load_config  # noqa: E402
from gen_core.data import load_split  # noqa: E402
from gen_core.diffusion import PatchDiscriminator, adaptive_weight, patch_hinge_loss, psnr  # noqa: E402
from gen_core.latents import load_autoencoder, reconstruct  # noqa: E402
from gen_core.lpips import load_lpips  # noqa: E402
from gen_core.metrics import fid_from_stats, inception_stats, load_inception, load_inception_reference  # noqa: E402
from gen_core.sampling import to_uint8, to_unit  # noqa: E402
from gen_core.training import autocast_dtype, batch_indices, training_compute  # noqa: E402
from pipelines.worker import retain_freed_memory  # noqa: E402

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--autoencoder", required=True, help="an exported autoencoder, relative to the project")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adversarial", type=float, default=0.0, help="the PatchGAN term's weight (0: off)")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1, help="the data order's")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    retain_freed_memory()
    os.chdir(args.project)
    cfg = load_config("params.yaml", ["evaluate.protocol=quick"])
    cpu = torch.device("cpu")
    amp = autocast_dtype("auto", cpu)
    train = torch.from_numpy(load_split(cfg.data.out_dir, "train").images)
    evals = torch.from_numpy(load_split(cfg.data.out_dir, "eval").images)
    reference, _ = load_inception_reference(cfg.reference_dir, cfg.ref_stats.inception)
    net = load_inception(cfg.ref_stats.inception, precision=cfg.evaluate.active.inception_precision)

    def judge(vae) -> dict:
        vae.eval()
        with torch.no_grad():
            recon = reconstruct(vae, evals)
        stats, _ = inception_stats(net, to_uint8(recon), cfg.ref_stats.inception.batch_size, None)
        vae.train()
        return {"rfid_quick": fid_from_stats(stats.mu, stats.sigma, reference["mu"], reference["sigma"]),
                "psnr_db": float(psnr(to_unit(evals), recon).mean())}  # fmt: skip

    vae = load_autoencoder(args.autoencoder)
    print(json.dumps({"step": 0, **judge(vae)}), flush=True)
    vae.train()
    for frozen in (vae.encoder, vae.quant_conv):
        frozen.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=args.lr)
    lpips = load_lpips(cpu)
    adv = cfg.autoencoder.adversarial
    disc = PatchDiscriminator(cfg.data.channels, adv.d_width, adv.d_layers) if args.adversarial else None
    d_optimizer = torch.optim.Adam(disc.parameters(), lr=adv.lr_d, betas=(0.5, 0.9)) if disc else None
    noise = torch.Generator().manual_seed(0)
    started = time.monotonic()
    for step in range(args.steps):
        x = to_unit(train[batch_indices(step, BATCH, len(train), args.seed, 0, 1)])
        with training_compute(cpu, amp):
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample(noise)
            recon = vae.decode(z).sample
            loss = ((recon.float() - x).abs().flatten(1).mean(1) + lpips(recon, x).float()).mean()
            total = loss
            if disc is not None:
                disc.requires_grad_(False)
                g_loss = -disc(recon).float().mean()
                disc.requires_grad_(True)
                total = loss + args.adversarial * adaptive_weight(loss, g_loss, vae.decoder.conv_out.weight) * g_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if disc is not None:
            with training_compute(cpu, amp):
                d_loss = patch_hinge_loss(disc(x), disc(recon.detach()))
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optimizer.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} {time.monotonic() - started:.0f} s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(json.dumps({"step": step + 1, **judge(vae)}), flush=True)
    train_s = time.monotonic() - started
    result = {"step": args.steps, **judge(vae), "train_s": round(train_s, 1), "lr": args.lr, "adversarial": args.adversarial,
              "autoencoder": args.autoencoder}  # fmt: skip
    vae.eval()
    vae.save_pretrained(args.out, safe_serialization=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
