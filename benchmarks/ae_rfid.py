"""Reconstruction FID of exported autoencoders at an evaluation protocol: every image of the protocol's reference set
(standard: the whole 10,000-image test split) through each autoencoder and back (posterior mean), against that
reference set's statistics from ref_stats, with the protocol's Inception precision and backend; PSNR on the same images;
improved precision and recall against the reference features (evaluate.pr_neighbors), as evaluate measures the LDM's
samples. The reconstructions are of the reference images themselves, each near its original, so their recall is a
ceiling on what decoding can give, not a sample's recall: it says whether the autoencoder or the denoiser loses it.

What the train_autoencoder stage reports is the same measurement on 500 eval images, which small samples bias upwards;
this is the number comparable with the LDM's FID at the same protocol: the autoencoder's reconstructions are the best
images its latent denoiser can decode to.

    python benchmarks/ae_rfid.py --project P [--protocol standard] models/autoencoder-quality models/autoencoder

P is a project after `make repro` (and `python -m pipelines.ref_stats --overlay profiles/ldm-quality.yaml` for the
standard reference); autoencoder paths are relative to it. One JSON line per autoencoder, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gen_core.config import load_config  # noqa: E402
from gen_core.data import reference_split  # noqa: E402
from gen_core.diffusion import psnr  # noqa: E402
from gen_core.latents import load_autoencoder, reconstruct  # noqa: E402
from gen_core.metrics import fid_from_stats, inception_stats, load_inception, load_inception_reference, precision_recall  # noqa: E402
from gen_core.sampling import to_uint8, to_unit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--protocol", default="standard")
    parser.add_argument("autoencoders", nargs="+")
    args = parser.parse_args()
    os.chdir(args.project)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config("params.yaml", [f"evaluate.protocol={args.protocol}"])
    protocol = cfg.evaluate.active
    images = torch.from_numpy(reference_split(cfg).images)  # what ref_stats measured
    reference, _ = load_inception_reference(cfg.reference_dir, cfg.ref_stats.inception)
    floor = json.loads(Path(cfg.reference_dir, "floor.json").read_text())
    net = load_inception(cfg.ref_stats.inception, precision=protocol.inception_precision)
    rows = []
    for directory in args.autoencoders:
        started = time.monotonic()
        recon = reconstruct(load_autoencoder(directory), images)
        stats, features = inception_stats(net, to_uint8(recon), cfg.ref_stats.inception.batch_size,
                                   lambda done, total, rate: print(f"  {directory}: inception {done}/{total}, {rate:.1f} img/s", flush=True))  # fmt: skip
        precision, recall = precision_recall(reference["features"], features.astype(np.float64), cfg.evaluate.pr_neighbors)
        row = {"autoencoder": directory, "protocol": args.protocol, "images": len(images),
               "rfid": fid_from_stats(stats.mu, stats.sigma, reference["mu"], reference["sigma"]),
               "psnr_db": float(psnr(to_unit(images), recon).mean()), "precision": precision, "recall": recall,
               "fid_floor": floor["fid"], "precision_floor": floor.get("precision"), "recall_floor": floor.get("recall"), "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, protocol {args.protocol} ({len(images)} images, "
          f"Inception {protocol.inception_precision}); real-vs-real floor FID {floor['fid']:.2f}")
    print("| autoencoder | reconstruction FID | PSNR (dB) | precision | recall |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['autoencoder']} | {row['rfid']:.2f} | {row['psnr_db']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} |")


if __name__ == "__main__":
    main()
