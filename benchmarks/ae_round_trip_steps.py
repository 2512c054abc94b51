"""The in-process autoencoder round-trip test's loop (tests/test_diffusion.py::test_autoencoder_round_trip_on_real_digits:
batch 64 of real MNIST digits, bf16 autocast where native, one thread as under xdist) at other widths and learning rates,
with the held-out PSNR (dB) at 80, 100, 120, 150 and 200 steps: what clears the test's 18-dB bound at the least CPU?
(The test now trains width 8 at 3e-3; it trained width 16 at 2e-3.)

    python benchmarks/ae_round_trip_steps.py 2e-3 3e-3 --width 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gen_core.config import AutoencoderConfig  # noqa: E402
from gen_core.data import read_mnist5k  # noqa: E402
from gen_core.diffusion import AutoencoderRoundTrip, autoencoder_loss, build_autoencoder, psnr  # noqa: E402
from gen_core.sampling import to_unit  # noqa: E402
from gen_core.training import autocast_dtype, training_compute  # noqa: E402

REPORT_AT = (80, 100, 120, 150, 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lrs", type=float, nargs="+")
    parser.add_argument("--width", type=int, default=16, help="the autoencoder's width (the test's: 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = read_mnist5k().train.images[..., 0]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(torch.from_numpy(images[:, None])[order], (2, 2, 2, 2))
    train, held_out = to_unit(padded[:4000]), to_unit(padded[4800:])
    amp = autocast_dtype("auto", torch.device("cpu"))
    for lr in args.lrs:
        torch.manual_seed(0)
        vae = build_autoencoder(AutoencoderConfig(width=args.width), channels=1)
        round_trip, optimizer = AutoencoderRoundTrip(vae), torch.optim.Adam(vae.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(0)
        for step in range(1, max(REPORT_AT) + 1):
            batch = train[torch.randint(0, len(train), (64,), generator=generator)]
            with training_compute(torch.device("cpu"), amp):  # the training loops' forward context
                loss, _ = autoencoder_loss(round_trip, batch, "l1", 1e-6, generator)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
            if step in REPORT_AT:
                vae.eval()
                with torch.no_grad():
                    reconstruction = vae.decode(vae.encode(held_out).latent_dist.mode()).sample
                print(f"width {args.width} lr {lr:g} step {step}: held-out PSNR {float(psnr(held_out, reconstruction).mean()):.2f} dB", flush=True)
                vae.train()


if __name__ == "__main__":
    main()
