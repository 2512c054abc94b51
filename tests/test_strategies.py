"""Strategy equivalence: a few training steps on 2 workers (real processes, gloo) under ddp, fsdp and
DeepSpeed ZeRO-1/2/3 give the losses of a plain single-process reference, for the GAN (two models,
the loop's own gan_step) and for the diffusion denoiser. Also: the DeepSpeed pitfalls are caught,
checkpoints round-trip in each strategy's own form, and DeepSpeed config files are checked.

Tolerance: the ranks reduce gradients in another order than the reference sums them, so fp32
losses agree to ~1e-5 relative; the test allows 1e-4. An error in the update (ZeRO-1 with D not
frozen, gradient clipping at DeepSpeed's default) moves them by >1e-3 within 4 steps."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gen_core.checkpoint import CheckpointError
from gen_core.config import ConfigError, FsdpConfig
from gen_core.losses import GanObjective, discriminator_loss, generator_loss
from gen_core.models import (Discriminator, DiscriminatorSpec, Generator, GeneratorSpec, build_discriminator, build_generator,
                             requires_grad, update_ema)  # fmt: skip
from pipelines.strategy import cpp_compiler_found, deepspeed_config
from tests.conftest import REPO

STEPS, BATCH, Z_DIM, RTOL = 4, 8, 16, 1e-4
ZERO = {f"zero{n}": REPO / f"cluster_configs/deepspeed/zero{n}.json" for n in (1, 2, 3)}
CASES = {"ddp": ("ddp", None), "fsdp": ("fsdp", None), **{name: ("deepspeed", path) for name, path in ZERO.items()}}


HINGE = GanObjective("hinge")
# The modern recipe's parts in one objective: the relativistic pairing, R1 + R2 (a double backward through the
# strategy's D) on every other D step, DiffAugment; on the ResNet preset with minibatch stddev and no spectral
# norm (R3GAN's D has none; it also makes per-rank D forwards equal to the reference's per-share ones).
PENALISED = GanObjective("rpgan", r1_gamma=1.0, r2_gamma=0.5, interval=2, augment=("color", "translation", "cutout"))
# What fsdp and DeepSpeed run of it: the penalties' double backward breaks there (FSDP2 frees the gathered
# weights the second backward needs; ZeRO's gradient hooks fire during the first), so the config refuses them.
UNPENALISED = GanObjective("rpgan", augment=("color", "translation", "cutout"))


def gan_models(objective: GanObjective = HINGE):
    torch.manual_seed(0)
    if objective == HINGE:
        return Generator(GeneratorSpec(32, 1, 10, Z_DIM, 8)), Discriminator(DiscriminatorSpec(32, 1, 10, 8, True))
    return build_generator(GeneratorSpec(32, 1, 10, Z_DIM, 8, "resnet")), build_discriminator(DiscriminatorSpec(32, 1, 10, 8, False, "resnet", 2))


def gan_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(BATCH, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)]


def rank_noise(step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * step + rank)


def adam(lr):
    return lambda params: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99))


def damped_adam(lr):
    """For the U-Net G: its conv biases before InstanceNorm have a gradient of zero up to rounding, which Adam's first
    steps (eps 1e-8) turn into +-lr updates of either sign, so two processes' weights would differ by rounding alone.
    An eps of 1e-2 leaves such gradients near zero and real ones (1e-2 and up) Adam's. (DeepSpeed refuses plain SGD.)"""
    return lambda params: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99), eps=1e-2)


# --------------------------------------------------------------------------- workers

# Each case runs 2 fresh worker processes. They fork from one forkserver that has imported this module (torch,
# the strategies), DeepSpeed and the diffusion models once, instead of each importing them anew (spawn: about 5 CPU-s
# a process, 25 cases; gen_core.diffusion, i.e. diffusers, another 4.2 CPU-s in each of the 16 workers of the
# denoiser, Pix2Pix and text cases). The forkserver only imports: no thread, process group or model exists in it before a fork.
mp.set_forkserver_preload([__name__, "deepspeed", "gen_core.diffusion"])


def _worker(rank: int, world: int, port: int, family: str, strategy_name: str, ds_path, options: dict, out: str) -> None:
    import torch.distributed as dist

    from pipelines.strategy import build_strategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ds = deepspeed_config(ds_path, BATCH, world) if ds_path else None
    if ds is not None and "gradient_clipping" in options:
        ds["gradient_clipping"] = options["gradient_clipping"]
    strategy = build_strategy(strategy_name, torch.device("cpu"), FsdpConfig(**options.get("fsdp", {})), ds, str(ds_path))
    worker = {"gan": lambda: _gan_worker(strategy, rank, world, options), "pix2pix": lambda: _pix2pix_worker(strategy, rank, world),
              "text": lambda: _text_denoiser_worker(strategy, rank, world)}.get(family, lambda: _denoiser_worker(family, strategy, rank, world, options))  # fmt: skip
    losses, parts, summary = worker()
    # checkpoint round trip in the strategy's own form: save, perturb, load, compare
    directory = Path(out) / "checkpoint"
    directory.mkdir(exist_ok=True)
    strategy.save_parts(parts, directory)
    dist.barrier()
    before = summary()
    if options.get("tamper") and rank == 0:  # one part's optimizer files become a pickle the safe loader refuses
        for path in directory.glob(f"deepspeed/{options['tamper']}/*optim_states.pt"):
            torch.save({"optimizer_state_dict": argparse.Namespace(code="not data")}, path)
    dist.barrier()
    for part in parts:
        with torch.no_grad():
            for p in part.module.parameters():
                p.add_(1.0)
    perturbed, load_error = _param_sums(parts), None
    try:
        strategy.load_parts(parts, directory)
    except CheckpointError as err:
        load_error = str(err)
    after, after_params = summary(), _param_sums(parts)
    if rank == 0:
        files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
        (Path(out) / "result.json").write_text(json.dumps({"losses": losses, "before": before, "after": after, "files": files,
                                                           "load_error": load_error, "perturbed": perturbed, "after_params": after_params}))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip C++ static destructors: DeepSpeed's comm op can abort ("terminate called...") at interpreter exit


def _param_sums(parts) -> list[float]:
    return [float(sum(p.detach().double().sum() for p in part.module.parameters())) for part in parts]


def _mean(values: list[torch.Tensor]) -> list[float]:
    import torch.distributed as dist

    stacked = torch.stack([v.detach().float() for v in values])
    dist.all_reduce(stacked)
    return (stacked / dist.get_world_size()).tolist()


def _gan_worker(strategy, rank, world, options):
    from pipelines.gan_step import gan_step

    objective = options.get("objective", HINGE)
    G, D = gan_models(objective)
    G = strategy.wrap("G", G, adam(2e-4), ema=True)
    D = strategy.wrap("D", D, adam(4e-4))
    if options.get("unfrozen_d"):  # the pitfall: D's parameters take part in the G step
        D.frozen = lambda: _NoFreeze(D.module)
    losses = []
    for step, (real, y) in enumerate(gan_batches()):
        mine = slice(rank, None, world)
        out = gan_step(G, D, real[mine], y[mine], rank_noise(step, rank), Z_DIM, objective, 1, contextlib.nullcontext, step)
        strategy.update_ema(G, 0.9)
        losses.append(_mean([out["d_loss"], out["g_loss"]] + ([out["r1"], out["r2"]] if "r1" in out else [])))

    def summary():
        ema = strategy.gather(G, "ema")
        return float(sum(p.detach().double().sum() for p in ema.parameters())) if ema is not None else None

    return losses, [G, D], summary


class _NoFreeze:
    def __init__(self, module):
        self.module = module

    def __enter__(self):
        return self.module

    def __exit__(self, *exc):
        return False


def tiny_denoiser(backbone: str):
    """A tiny U-Net or DiT; the DiT's zero-initialised modulation and output layers get random values, or its first
    steps would train only them. "aligned": the U-Net inside ldm.alignment's AlignedDenoiser (a hook on its first level)."""
    from gen_core.alignment import AlignedDenoiser
    from gen_core.config import DenoiserConfig
    from gen_core.diffusion import build_denoiser

    if backbone == "aligned":
        return AlignedDenoiser(tiny_denoiser("unet"), target_channels=16, projector_width=16)
    torch.manual_seed(0)
    config = DenoiserConfig(backbone=backbone, block_out_channels=[32, 32], attention_head_dim=8, dit={"hidden_size": 32, "num_layers": 2, "num_heads": 2})
    net = build_denoiser(config, 4, 8, 10)
    if backbone == "dit":
        with torch.no_grad():
            for parameter in net.parameters():
                if not parameter.any():
                    parameter.normal_(0, 0.02)
    return net


def unet_batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(BATCH, 4, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)]


def _denoiser_worker(backbone, strategy, rank, world, options):
    from gen_core.config import NoiseScheduleConfig
    from gen_core.diffusion import training_schedule

    schedule = training_schedule(NoiseScheduleConfig())

    def loss(unet, step, x0, y):
        return denoiser_loss(backbone, unet, schedule, step, rank, x0, y)

    return _ema_denoiser_steps(strategy, tiny_denoiser(backbone), unet_batches(), loss, rank, world, options.get("compile", False))


def denoiser_loss(backbone, unet, schedule, step, rank, x0, y):
    """train_ldm's loss on this rank's share; "aligned" adds REPA's term at weight 0.5, against a target made from x0."""
    from gen_core.diffusion import diffusion_loss

    if backbone != "aligned":
        return diffusion_loss(unet, schedule, x0, y, 10, 0.1, rank_noise(step, rank)).mean()
    loss, alignment = diffusion_loss(unet, schedule, x0, y, 10, 0.1, rank_noise(step, rank), alignment_target=x0.repeat(1, 4, 1, 1))
    return loss.mean() + 0.5 * alignment.mean()


def _ema_denoiser_steps(strategy, network, batches, loss, rank, world, compile: bool = False):
    """A denoiser with its EMA under the strategy: per batch, `loss(forward, step, *this rank's share of the batch)`,
    one step, one EMA update. -> (the all-reduced losses, the parts, the EMA's parameter sum on rank 0)."""
    unet = strategy.wrap("unet", network, adam(1e-3), ema=True, compile=compile)
    losses = []
    for step, batch in enumerate(batches):
        value = loss(unet.forward, step, *(tensor[rank::world] for tensor in batch))
        unet.backward(value)
        unet.step()
        strategy.update_ema(unet, 0.9)
        losses.append(_mean([value]))
    if compile:  # the steps ran torch.compile's graphs, not the eager module
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])

    def summary():
        ema = strategy.gather(unet, "ema")
        return float(sum(p.detach().double().sum() for p in ema.parameters())) if ema is not None else None

    return losses, [unet], summary


def pix2pix_models():
    from gen_core.pix2pix import UNetGenerator, build_patch_discriminator

    torch.manual_seed(0)
    return UNetGenerator(1, 1, width=8, levels=2), build_patch_discriminator(1, 1, 16, 8)


def pix2pix_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(BATCH, 1, 16, 16, generator=g) * 2 - 1, torch.rand(BATCH, 1, 16, 16, generator=g) * 2 - 1) for _ in range(STEPS)]


def _pix2pix_worker(strategy, rank, world):
    """The stage's own step (train_pix2pix.pix2pix_step) on this rank's share of each batch of pairs."""
    from pipelines.train_pix2pix import pix2pix_step

    G, D = pix2pix_models()
    G, D = strategy.wrap("G", G, damped_adam(2e-3)), strategy.wrap("D", D, damped_adam(2e-3))
    losses = []
    for a, b in pix2pix_batches():
        out = pix2pix_step(G, D, a[rank::world], b[rank::world], 100.0, contextlib.nullcontext)
        losses.append(_mean([out["d_loss"], out["g_loss"]]))

    def summary():
        whole = strategy.gather(G, "model")
        return float(sum(p.detach().double().sum() for p in whole.parameters())) if whole is not None else None

    return losses, [G, D], summary


TEXT_DIM, TOKENS = 16, 5


def tiny_text_denoiser():
    from gen_core.text_diffusion import build_text_denoiser

    torch.manual_seed(0)
    return build_text_denoiser(4, 8, TEXT_DIM, block_out_channels=(32, 32))


def text_batches():
    """Latents, per-token states and masks of the batch's captions (random states: the encoder is frozen and not in a step)."""
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[::3, 3:] = 0  # shorter captions: padding the attention must ignore
    return [(torch.randn(BATCH, 4, 8, 8, generator=g), torch.randn(BATCH, TOKENS, TEXT_DIM, generator=g), mask) for _ in range(STEPS)]


def text_loss(unet, step: int, rank: int, x0, hidden, mask) -> torch.Tensor:
    from gen_core.config import NoiseScheduleConfig
    from gen_core.diffusion import training_schedule
    from gen_core.text_diffusion import text_diffusion_loss

    null_hidden, null_mask = torch.zeros(1, TOKENS, TEXT_DIM), torch.ones(1, TOKENS, dtype=torch.long)
    return text_diffusion_loss(unet, training_schedule(NoiseScheduleConfig()), x0, hidden, mask, null_hidden, null_mask, 0.25,
                               rank_noise(step, rank)).mean()  # fmt: skip


def _text_denoiser_worker(strategy, rank, world):
    """train_t2i's step: the text-conditioned U-Net (cross-attention) with its EMA, on this rank's share."""

    def loss(unet, step, x0, hidden, mask):
        return text_loss(unet, step, rank, x0, hidden, mask)

    return _ema_denoiser_steps(strategy, tiny_text_denoiser(), text_batches(), loss, rank, world)


def run_two_workers(tmp_path: Path, family: str, case: str, **options) -> dict:
    strategy_name, ds_path = CASES[case]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, family, strategy_name, ds_path and str(ds_path), options, str(tmp_path)), nprocs=2,
                       start_method="forkserver")  # fmt: skip
    return json.loads((tmp_path / "result.json").read_text())


# --------------------------------------------------------------------------- single-process references


def gan_reference() -> tuple[list, float]:
    """Plain torch, one process, the same math: D sees both ranks' shares in one forward (it has no batch
    statistics, and one forward = one spectral-norm power iteration, as on each rank); G runs per share
    (its BatchNorm normalises per rank); the mean over both shares is the all-reduced loss."""
    G, D = gan_models()
    ema = copy.deepcopy(G)
    opt_G, opt_D = adam(2e-4)(G.parameters()), adam(4e-4)(D.parameters())
    out = []
    for step, (real, y) in enumerate(gan_batches()):
        shares = [slice(r, None, 2) for r in range(2)]
        noise = [rank_noise(step, r) for r in range(2)]
        z = [[torch.randn(BATCH // 2, Z_DIM, generator=noise[r]) for _ in range(2)] for r in range(2)]
        ys, reals = torch.cat([y[s] for s in shares]), torch.cat([real[s] for s in shares])
        with torch.no_grad():
            fake = torch.cat([G(z[r][0], y[s]) for r, s in enumerate(shares)])
        opt_D.zero_grad()
        d_loss = discriminator_loss(HINGE, D, reals, fake, ys)[0].mean()
        d_loss.backward()
        opt_D.step()
        requires_grad(D, False)
        opt_G.zero_grad()
        g_loss = generator_loss(HINGE, D, torch.cat([G(z[r][1], y[s]) for r, s in enumerate(shares)]), ys).mean()
        g_loss.backward()
        opt_G.step()
        requires_grad(D, True)
        update_ema(ema, G, 0.9)
        out.append([d_loss.item(), g_loss.item()])
    return out, float(sum(p.detach().double().sum() for p in ema.parameters()))


def modern_gan_reference(objective: GanObjective) -> tuple[list, float]:
    """The penalised objective in one process: each rank's share with that rank's noise (z, augmentation) and
    its own D forward (no spectral norm, minibatch-stddev groups inside a share), so the mean of the shares'
    losses is what the ranks' averaged gradients descend; penalties by plain double backward."""
    G, D = gan_models(objective)
    ema = copy.deepcopy(G)
    opt_G, opt_D = adam(2e-4)(G.parameters()), adam(4e-4)(D.parameters())
    out = []
    for step, (real, y) in enumerate(gan_batches()):
        noise = [rank_noise(step, r) for r in range(2)]
        shares = [(real[r::2], y[r::2]) for r in range(2)]
        with torch.no_grad():
            fakes = [G(torch.randn(BATCH // 2, Z_DIM, generator=noise[r]), ys) for r, (_, ys) in enumerate(shares)]
        d_terms = [discriminator_loss(objective, D, xs, fakes[r], ys, noise[r], objective.regularizes_at(step)) for r, (xs, ys) in enumerate(shares)]
        d_loss = sum(loss.mean() for loss, _ in d_terms) / 2
        opt_D.zero_grad()
        d_loss.backward()
        opt_D.step()
        requires_grad(D, False)
        g_terms = [generator_loss(objective, D, G(torch.randn(BATCH // 2, Z_DIM, generator=noise[r]), ys), ys, xs, noise[r]).mean()
                   for r, (xs, ys) in enumerate(shares)]  # fmt: skip
        g_loss = sum(g_terms) / 2
        opt_G.zero_grad()
        g_loss.backward()
        opt_G.step()
        requires_grad(D, True)
        update_ema(ema, G, 0.9)
        penalties = [float(sum(p[k] for _, p in d_terms) / 2) for k in ("r1", "r2")] if d_terms[0][1] else []
        out.append([d_loss.item(), g_loss.item()] + penalties)
    return out, float(sum(p.detach().double().sum() for p in ema.parameters()))


def denoiser_reference(backbone: str) -> tuple[list, float]:
    from gen_core.config import NoiseScheduleConfig
    from gen_core.diffusion import training_schedule

    schedule = training_schedule(NoiseScheduleConfig())

    def loss(unet, step, rank, x0, y):
        return denoiser_loss(backbone, unet, schedule, step, rank, x0, y)

    return _ema_denoiser_reference(tiny_denoiser(backbone), unet_batches(), loss)


def _ema_denoiser_reference(unet, batches, loss) -> tuple[list, float]:
    """One process: per batch the mean of the two ranks' shares' losses (GroupNorm and LayerNorm are per sample, so this
    is what the ranks' averaged gradients descend), one Adam step, one EMA update -> (losses, the EMA's parameter sum)."""
    ema = copy.deepcopy(unet)
    opt = adam(1e-3)(unet.parameters())
    out = []
    for step, batch in enumerate(batches):
        value = sum(loss(unet, step, r, *(tensor[r::2] for tensor in batch)) for r in range(2)) / 2
        opt.zero_grad()
        value.backward()
        opt.step()
        update_ema(ema, unet, 0.9)
        out.append([value.item()])
    return out, float(sum(p.detach().double().sum() for p in ema.parameters()))


def pix2pix_reference() -> tuple[list, float]:
    """One process: each share through D on its own (D's BatchNorm normalises per rank) and through G; the means of the
    shares' losses are what the ranks' averaged gradients descend. G's step sees D frozen, in train mode, as on the ranks."""
    from gen_core.pix2pix import pix2pix_d_loss, pix2pix_g_loss

    G, D = pix2pix_models()
    opt_G, opt_D = damped_adam(2e-3)(G.parameters()), damped_adam(2e-3)(D.parameters())
    out = []
    for a, b in pix2pix_batches():
        d_loss = sum(pix2pix_d_loss(G, D, a[r::2], b[r::2]) for r in range(2)) / 2
        opt_D.zero_grad()
        d_loss.backward()
        opt_D.step()
        requires_grad(D, False)
        g_loss = sum(pix2pix_g_loss(G, D, a[r::2], b[r::2], 100.0)[0] for r in range(2)) / 2
        opt_G.zero_grad()
        g_loss.backward()
        opt_G.step()
        requires_grad(D, True)
        out.append([d_loss.item(), g_loss.item()])
    return out, float(sum(p.detach().double().sum() for p in G.parameters()))


def text_denoiser_reference() -> tuple[list, float]:
    return _ema_denoiser_reference(tiny_text_denoiser(), text_batches(), text_loss)


REFERENCES = {}


def reference(family: str):
    if family not in REFERENCES:
        REFERENCES[family] = {"gan": gan_reference, "penalised": lambda: modern_gan_reference(PENALISED),
                              "unpenalised": lambda: modern_gan_reference(UNPENALISED), "unet": lambda: denoiser_reference("unet"),
                              "dit": lambda: denoiser_reference("dit"), "aligned": lambda: denoiser_reference("aligned"), "pix2pix": pix2pix_reference, "text": text_denoiser_reference}[family]()  # fmt: skip
    return REFERENCES[family]


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_gan_two_workers_match_single_process(tmp_path, case):
    losses, ema_sum = reference("gan")
    result = run_two_workers(tmp_path, "gan", case)
    assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=RTOL, atol=1e-6), (result["losses"], losses)
    assert result["before"] == pytest.approx(ema_sum, rel=RTOL)
    assert result["after"] == result["before"]  # the checkpoint restored the EMA (and, below, the form)
    expected = {"ddp": "state.pt", "fsdp": "fsdp/__1_0.distcp", "zero1": "deepspeed/G/zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert expected.get(case, "deepspeed/D/zero_pp_rank_1_mp_rank_00_optim_states.pt") in result["files"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_modern_gan_two_workers_match_single_process(tmp_path, case):
    """RpGAN + DiffAugment on the ResNet with minibatch stddev; under ddp also lazy R1/R2 (a double backward
    through the wrapped D), which the other strategies refuse (test_config)."""
    name = "penalised" if case == "ddp" else "unpenalised"
    losses, ema_sum = reference(name)
    result = run_two_workers(tmp_path, "gan", case, objective=PENALISED if case == "ddp" else UNPENALISED)
    got = result["losses"]
    assert [len(row) for row in got] == [len(row) for row in losses] == ([4, 2, 4, 2] if case == "ddp" else [2] * 4)  # R1/R2 on steps 0, 2
    for mine, theirs in zip(got, losses):
        assert torch.allclose(torch.tensor(mine), torch.tensor(theirs), rtol=RTOL, atol=1e-6), (got, losses)
    assert result["before"] == pytest.approx(ema_sum, rel=RTOL) and result["after"] == result["before"]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [{"granularity": "model"}, {"reshard_after_forward": False}], ids=["whole_model", "kept_gathered"])
def test_gan_fsdp_knobs_match_single_process(tmp_path, fsdp):
    """The other FSDP settings: one unit for the whole network; weights kept gathered from forward to backward
    (which must still reshard after the G forward under no_grad and the frozen D forward)."""
    losses, ema_sum = reference("gan")
    result = run_two_workers(tmp_path, "gan", "fsdp", fsdp=fsdp)
    assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=RTOL, atol=1e-6), (result["losses"], losses)
    assert result["before"] == pytest.approx(ema_sum, rel=RTOL) and result["after"] == result["before"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone, case", [("unet", "fsdp"), ("unet", "zero3"), ("dit", "fsdp"), ("dit", "zero3"), ("aligned", "zero3"), ("aligned", "fsdp")])
def test_denoiser_two_workers_match_single_process(tmp_path, backbone, case):
    """The sharded strategies (ddp and ZeRO-1/2 are covered by the GAN cases), for both backbones: FSDP2 units are the
    U-Net's blocks or the DiT's transformer blocks. And the U-Net with REPA's projector (ldm.alignment) under both, whose
    parameter-gathering hooks (ZeRO-3) and block units (FSDP2) run beside the alignment's hook on the tapped block."""
    losses, ema_sum = reference(backbone)
    result = run_two_workers(tmp_path, backbone, case)
    assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=RTOL, atol=1e-6), (result["losses"], losses)
    assert result["before"] == pytest.approx(ema_sum, rel=RTOL) and result["after"] == result["before"]


# One xdist group: the three cases run one after another in one test process, so each finds the kernels and graphs the one
# before compiled in inductor's on-disk cache. On a fresh machine (CI's: the cache is empty) the three took 13-25% fewer
# busy CPU-s in sequence than when pytest-xdist started them side by side, each compiling from scratch
# (benchmarks/compile_cache.sh); README "Tests".
@pytest.mark.slow
@pytest.mark.xdist_group("compile")
@pytest.mark.skipif(not cpp_compiler_found(), reason="torch.compile needs a C++ compiler on CPU (scripts/setup.sh installs g++)")
@pytest.mark.parametrize("case", ["ddp", "fsdp", "zero2"])
def test_compiled_denoiser_two_workers_match_single_process(tmp_path, case):
    """ldm.compile / autoencoder.compile: the strategy's training forward through torch.compile (inductor's C++ kernels)
    takes the eager single process's steps, and its checkpoint keeps the plain keys (it loads back into the same parts)."""
    losses, ema_sum = reference("unet")
    result = run_two_workers(tmp_path, "unet", case, compile=True)
    assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=RTOL, atol=1e-6), (result["losses"], losses)
    assert result["before"] == pytest.approx(ema_sum, rel=RTOL) and result["after"] == result["before"]
    assert result["after_params"] != result["perturbed"] and result["load_error"] is None


@pytest.mark.slow
@pytest.mark.parametrize("family, case", [("pix2pix", "zero3"), ("pix2pix", "fsdp"), ("text", "fsdp")])
def test_the_conditional_families_steps_on_two_workers_match_single_process(tmp_path, family, case):
    """Pix2Pix's two-engine pair (its U-Net G, the PatchGAN D with BatchNorm) under ZeRO-3 and FSDP2, and the text-to-image
    denoiser (cross-attention on token states with padding) under FSDP2: the stages' own steps, equal to one process."""
    losses, weight_sum = reference(family)
    result = run_two_workers(tmp_path, family, case)
    assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=RTOL, atol=1e-6), (result["losses"], losses)
    assert result["before"] == pytest.approx(weight_sum, rel=RTOL) and result["after"] == result["before"]


@pytest.mark.slow
def test_zero1_without_frozen_d_updates_wrongly_and_the_test_sees_it(tmp_path):
    """The pitfall the GAN step guards against (docs/stack.md): no error, just wrong updates."""
    losses, _ = reference("gan")
    result = run_two_workers(tmp_path, "gan", "zero1", unfrozen_d=True)
    assert not torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-3)


@pytest.mark.slow
def test_deepspeed_default_clipping_would_change_the_update(tmp_path):
    """DeepSpeed clips at 1.0 unless told otherwise; the configs say 0.0, and 1.0 is visibly different."""
    losses, _ = reference("gan")
    clipped = run_two_workers(tmp_path, "gan", "zero2", gradient_clipping=1e-3)
    assert not torch.allclose(torch.tensor(clipped["losses"]), torch.tensor(losses), rtol=1e-3)


@pytest.mark.slow
def test_a_deepspeed_checkpoint_with_one_refused_file_loads_no_part(tmp_path):
    """D's optimizer files are refused by the safe loader: G (loaded first) must not be loaded either."""
    result = run_two_workers(tmp_path, "gan", "zero2", tamper="D")
    assert result["load_error"] is not None and "D/zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load" in result["load_error"]
    assert result["after_params"] == result["perturbed"]  # neither G nor D took the checkpoint's weights


def test_deepspeed_config_files(tmp_path):
    for path in ZERO.values():
        config = deepspeed_config(path, 64, 2)
        assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 32 and config["gradient_clipping"] == 0.0
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(bare, 64, 2)["gradient_clipping"] == 0.0  # not DeepSpeed's silent 1.0
    refused = {
        "optimizer": ({"optimizer": {"type": "Adam"}}, "'optimizer' is set by the training loop"),
        "batch": ({"train_batch_size": 128}, "train_batch_size is 128, but the loop runs 64"),
        "stage": ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0..3"),
    }
    for name, (content, message) in refused.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(path, 64, 2)
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(tmp_path / "missing.json", 64, 2)


def test_compile_without_a_cpp_compiler_is_refused_in_one_line(monkeypatch):
    """Inductor would fail at the first step, many lines deep; the worker checks before training starts."""
    import torch._inductor.config as inductor_config

    from pipelines.strategy import prepare_compiler

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("genforge-no-such-compiler",))
    with pytest.raises(ConfigError, match=r"^ldm.compile: torch.compile needs a C\+\+ compiler") as err:
        prepare_compiler(torch.device("cpu"), "ldm.compile")
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    if cpp_compiler_found():
        prepare_compiler(torch.device("cpu"), "ldm.compile")


def test_fsdp_bf16_params_with_batchnorm_on_cpu_is_refused_in_one_line():
    from pipelines.strategy import FsdpStrategy

    G, _ = gan_models()
    strategy = FsdpStrategy(torch.device("cpu"), FsdpConfig(param_dtype="bf16"))
    with pytest.raises(ConfigError, match="ray.fsdp.param_dtype=bf16: G has BatchNorm") as err:
        strategy.wrap("G", G, adam(1e-3))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_denoiser_fsdp_bf16_params_and_reduction_train_close_to_fp32(tmp_path):
    """param_dtype/reduce_dtype bf16: the same steps in bf16 arithmetic, so close to the fp32 reference
    (bf16 keeps ~3 significant digits), not equal to it."""
    losses, _ = reference("unet")
    result = run_two_workers(tmp_path, "unet", "fsdp", fsdp={"param_dtype": "bf16", "reduce_dtype": "bf16"})
    assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=2e-2), (result["losses"], losses)
    assert result["losses"] != losses  # the policy took effect: bf16 arithmetic is not bit-equal to fp32
