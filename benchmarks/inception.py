"""Inception feature extraction, every variant side by side in one run: img/s end to end (resize +
network, batch 50), the features' error against the previous fp32 path, and the FID of real images
(Fashion-MNIST train vs test, or MNIST digits) under each variant.

Variants (the same checksummed TorchScript graph throughout):
  before fp32   clean-fid's per-image PIL resize + TorchScript, NCHW, fp32      (the path before 2026-11-30)
  before bf16   the same under bf16 autocast                                    (only where bf16 is native)
  torch fp32    batched two-pass resize + TorchScript with channels_last weights
  torch bf16    the same under bf16 autocast                                     (only where bf16 is native;
                --force-bf16 runs it anyway: emulated bf16 is ~75x slower per matmul on CPUs without it)
  onnxruntime   batched resize + the graph exported to ONNX, ONNX Runtime CPU, fp32 (`backend: auto` on CPU)

    python benchmarks/inception.py [--images 200] [--threads 2] [--out benchmarks/inception.json] [--ceiling]

--ceiling also times the parts alone, to say how fast end to end could be on this CPU: the batched resize,
each shipped network on already-resized images, and torchvision's InceptionV3 as an nn.Module (random
weights, the same layout and FLOPs as the FID graph; not usable for FID) in fp32 and bf16, channels_last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.suite_profile import cpu_model  # noqa: E402

from gen_core.config import DataConfig, InceptionConfig  # noqa: E402
from gen_core.data import read_source  # noqa: E402
from gen_core.metrics import FeatureStats, clean_resize, fid_from_stats, load_inception  # noqa: E402
from gen_core.training import bf16_supported  # noqa: E402


def pil_resize(images_uint8: torch.Tensor) -> torch.Tensor:
    """The previous path: clean-fid's resizer, one image (and for grayscale, three channels) at a time."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    out = []
    for image in images_uint8.numpy():
        hwc = np.repeat(image, 3, axis=0).transpose(1, 2, 0) if image.shape[0] == 1 else image.transpose(1, 2, 0)
        out.append(resize(hwc).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


class Before(torch.nn.Module):
    """The previous InceptionFeatures: NCHW weights and input."""

    def __init__(self, bf16: bool):
        super().__init__()
        from gen_core.metrics import inception_path

        path, _ = inception_path(InceptionConfig())
        self.net, self.bf16 = torch.jit.load(str(path)).eval(), bf16

    @torch.no_grad()
    def forward(self, images):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(images / 128.0 - 1.0).float()


def variants(force_bf16: bool) -> dict:
    native = bf16_supported(torch.device("cpu"))
    out = {"before fp32": (pil_resize, lambda: Before(False))}
    if native or force_bf16:
        out["before bf16"] = (pil_resize, lambda: Before(True))
    out["torch fp32"] = (clean_resize, lambda: load_inception(InceptionConfig(backend="torch"), precision="fp32"))
    if native or force_bf16:
        out["torch bf16"] = (clean_resize, lambda: _forced_bf16(load_inception(InceptionConfig(backend="torch"), precision="fp32")))
    out["onnxruntime fp32"] = (clean_resize, lambda: load_inception(InceptionConfig(backend="onnxruntime"), precision="fp32"))
    return out


def _forced_bf16(net):
    net.precision = "bf16"  # what load_inception(precision="bf16") does where bf16 is native
    return net


def features(resize, net, images: torch.Tensor, batch: int) -> tuple[np.ndarray, float]:
    net(resize(images[:2]))  # warm-up (oneDNN/ORT kernel selection)
    started = time.perf_counter()
    out = [net(resize(images[i : i + batch])).numpy().astype(np.float64) for i in range(0, len(images), batch)]
    return np.concatenate(out), len(images) / (time.perf_counter() - started)


def timed(step, batches: list[torch.Tensor]) -> float:
    """img/s of `step` over `batches`, after one warm-up batch."""
    step(batches[0])
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def parts(images: torch.Tensor, batch: int) -> dict:
    """The resize alone, and each network alone on resized images: the end-to-end ceiling is 1 / (1/resize + 1/network)."""
    import torchvision

    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    resized = [clean_resize(b) for b in batches]
    rates = {"resize (batched, clean)": timed(clean_resize, batches)}
    shipped_fp32 = load_inception(InceptionConfig(backend="torch"), precision="fp32")
    rates["network: TorchScript fp32 channels_last"] = timed(shipped_fp32, resized)
    rates["network: TorchScript bf16 channels_last"] = timed(_forced_bf16(shipped_fp32), resized)
    rates["network: ONNX Runtime fp32"] = timed(load_inception(InceptionConfig(backend="onnxruntime"), precision="fp32"), resized)
    module = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    module.fc = torch.nn.Identity()
    module = module.eval().to(memory_format=torch.channels_last)
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):

        def step(x, dtype=dtype):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                return module((x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last))

        rates[f"network: torchvision nn.Module {name} channels_last (random weights)"] = timed(step, resized)
    for name, rate in rates.items():
        print(f"{name:70s} {rate:7.2f} img/s")
    best = max(rate for name, rate in rates.items() if name.startswith("network"))
    print(f"ceiling with the fastest network and this resize: {1 / (1 / rates['resize (batched, clean)'] + 1 / best):.2f} img/s end to end")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="real images per set (two sets: train and test)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force-bf16", action="store_true")
    parser.add_argument("--out", default="benchmarks/inception.json")
    parser.add_argument("--ceiling", action="store_true", help="also time the resize and the networks alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = "fashion_mnist" if os.path.isdir("/usr/share/datasets/fashion-mnist") else "mnist5k"
    raw = read_source(DataConfig(source=source))
    test = raw.eval if raw.eval is not None else raw.train
    sets = [torch.from_numpy(np.ascontiguousarray(split.images[: args.images].transpose(0, 3, 1, 2))) for split in (raw.train, test)]
    rows, base = {}, None
    for name, (resize, make) in variants(args.force_bf16).items():
        net = make()
        (a, rate_a), (b, rate_b) = (features(resize, net, images, args.batch) for images in sets)
        stats = [FeatureStats(2048) for _ in sets]
        stats[0].update(a), stats[1].update(b)
        fid = fid_from_stats(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma)
        if base is None:
            base = (a, fid)
        err = np.abs(a - base[0])
        rows[name] = {
            "img_per_s": (rate_a + rate_b) / 2, "max_rel_error": float(err.max() / np.abs(base[0]).max()),
            "mean_rel_error": float((err / (np.abs(base[0]) + 1e-6)).mean()), "fid": fid, "fid_diff": fid - base[1],
            # per image: |features - fp32 features| / |fp32 features| (L2), averaged over the images
            "rel_l2_error": float((np.linalg.norm(a - base[0], axis=1) / np.linalg.norm(base[0], axis=1)).mean()),
        }  # fmt: skip
        print(f"{name:18s} {rows[name]['img_per_s']:6.2f} img/s  max rel err {rows[name]['max_rel_error']:.2e}  "
              f"rel L2 err {rows[name]['rel_l2_error']:.2e}  "
              f"fid {fid:.4f} ({fid - base[1]:+.2e})", flush=True)  # fmt: skip
    first = rows["before fp32"]["img_per_s"]
    print(f"\n{date.today()}, {cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"{args.images} vs {args.images} real {source} images, bf16 native: {bf16_supported(torch.device('cpu'))}")  # fmt: skip
    print("| variant | img/s | vs before fp32 | max rel. feature error | mean rel. L2 error per image | FID | FID diff |\n|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['img_per_s']:.2f} | {r['img_per_s'] / first:.2f}x | {r['max_rel_error']:.1e} | {r['rel_l2_error']:.1e} | {r['fid']:.4f} | {r['fid_diff']:+.1e} |")
    record = {"date": str(date.today()), "machine": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
              "images": args.images, "source": source, "bf16_native": bf16_supported(torch.device("cpu")), "rows": rows}  # fmt: skip
    if args.ceiling:
        record["parts_img_per_s"] = parts(sets[0], args.batch)
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
