"""Distributed strategies for the training loops: DDP, FSDP2 and DeepSpeed ZeRO, behind one interface.

A loop wraps each (model, optimizer) pair once and then only talks to the returned `Part`:

    part = strategy.wrap("G", G, lambda params: torch.optim.Adam(params, ...), ema=True)
    loss = loss_fn(part.forward, batch)     # the wrapped forward (DDP / FSDP module / DeepSpeed engine)
    part.backward(loss); part.step()        # zero_grad, backward and step in each strategy's own way
    with part.frozen(): ...                 # part.module with requires_grad off (the GAN's G step)
    strategy.update_ema(part, decay)        # EMA in the same layout as the weights (sharded under FSDP)
    plain = strategy.gather(part, "ema")    # collective: a plain full copy on rank 0, None elsewhere

Checkpoints are collective too: `save_parts` writes each strategy's natural form into a directory
(DDP: one state.pt from rank 0; FSDP: a torch.distributed.checkpoint directory, one shard file per
rank, loadable into another world size; DeepSpeed: its own per-rank ZeRO files) and `load_parts`
reads it back. Every file is read without unpickling code (weights_only=True, with DeepSpeed's few
plain record types allow-listed).

No Ray here: the strategies need only an initialised torch.distributed process group (or none,
for one process), so the equivalence tests run them in plain processes.

The GAN rules DeepSpeed needs (docs/stack.md): D runs as engine.module inside the G step (`part.module`),
D is frozen there (`part.frozen()`; without it ZeRO-1 silently computes wrong updates and ZeRO-2/3
assert), and gradient_clipping defaults to 0.0 here instead of DeepSpeed's silent 1.0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from gen_core.checkpoint import CheckpointError, load_state
from gen_core.config import ConfigError, FsdpConfig
from gen_core.models import requires_grad, update_ema

def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------
# DeepSpeed config files (cluster_configs/deepspeed/*.json)
# ---------------------------------------------------------------------------


def deepspeed_config(path: str | Path, global_batch_size: int, world_size: int) -> dict:
    """A DeepSpeed config file, completed for one loop: the batch keys come from the loop (a file may
    leave them out or say "auto"; a different number is refused), gradient clipping is 0.0 unless the
    file sets it (DeepSpeed's default of 1.0 changes every update without a word), and optimizer and
    scheduler stay with the loop (client torch optimizers: no CPU FusedAdam build)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"ray.deepspeed.config: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"ray.deepspeed.config: {path} is not valid JSON ({err})") from None
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"{path}: '{key}' is set by the training loop (params.yaml), remove it from the DeepSpeed config")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0..3, got {stage}")
    wanted = {"train_batch_size": global_batch_size, "train_micro_batch_size_per_gpu": global_batch_size // world_size,
              "gradient_accumulation_steps": 1}  # fmt: skip
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: {key} is {config[key]}, but the loop runs {value} (set it to \"auto\" or leave it out)")
    return {**config, **wanted, "gradient_clipping": config.get("gradient_clipping", 0.0)}


# ---------------------------------------------------------------------------
# Parts: one (model, optimizer[, EMA]) under a strategy
# ---------------------------------------------------------------------------


@dataclass
class Part:
    """A model with its optimizer (and EMA) as one strategy trains it."""

    name: str
    module: nn.Module  # call this where the strategy must not sync (frozen D in the G step); EMA source
    forward: Callable  # the training forward: DDP wrapper, FSDP module, DeepSpeed engine
    optimizer: torch.optim.Optimizer
    ema: nn.Module | None = None
    template: nn.Module | None = None  # rank 0, sharded strategies: plain module that gathered weights go into
    engine: object | None = None  # DeepSpeed only

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()

    def step(self) -> None:
        if self.engine is not None:
            self.engine.step()  # also zeroes the gradients
        else:
            self.optimizer.step()

    @contextlib.contextmanager
    def frozen(self):
        requires_grad(self.module, False)
        try:
            yield self.module
        finally:
            requires_grad(self.module, True)

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class Strategy:
    """Data parallel (DDP over gloo/nccl; a single process is the same code with world size 1)."""

    name = "ddp"

    def __init__(self, device: torch.device):
        self.device = device
        self.rank, self.world_size = world()

    def describe(self) -> str:
        return "ddp"

    def wrap(self, name: str, module: nn.Module, make_optimizer: Callable, *, ema: bool = False, compile: bool = False) -> Part:
        """compile: the training forward through torch.compile (compiled at its first call). Under DDP the wrapper is
        compiled, as torch recommends (its graph breaks at the gradient buckets keep communication overlapped)."""
        ema_module = _ema_copy(module) if ema else None
        forward = module
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
            if compile:
                forward = torch.compile(forward, dynamic=False)
        elif compile:
            compile_in_place(module)
        return Part(name, module, forward, make_optimizer(module.parameters()), ema=ema_module)

    def update_ema(self, part: Part, decay: float) -> None:
        update_ema(part.ema, part.module, decay)

    def gather(self, part: Part, which: str = "ema") -> nn.Module | None:
        """Collective. A plain full module with the weights on rank 0 (no copy where they are already whole)."""
        module = part.ema if which == "ema" else part.module
        return module if self.rank == 0 else None

    # --- checkpoints
    def save_parts(self, parts: list[Part], directory: Path) -> None:
        if self.rank != 0:
            return
        state = {}
        for part in parts:
            state[part.name] = part.module.state_dict()
            state[f"opt_{part.name}"] = part.optimizer.state_dict()
            if part.ema is not None:
                state[f"{part.name}_ema"] = part.ema.state_dict()
        torch.save(state, directory / "state.pt")

    def load_parts(self, parts: list[Part], directory: Path) -> None:
        """All or nothing: every part's weights, optimizer and EMA state is checked (present, same keys
        and shapes as the live module) before any is applied."""
        state = load_state(directory / "state.pt")
        for part in parts:
            for key, live in ((part.name, part.module), (f"{part.name}_ema", part.ema)):
                if live is not None:
                    _check_matches(state, key, live.state_dict(), directory / "state.pt")
            if not isinstance(state.get(f"opt_{part.name}"), dict):
                raise CheckpointError(f"{directory / 'state.pt'}: no optimizer state for {part.name}")
        for part in parts:
            part.module.load_state_dict(state[part.name])
            part.optimizer.load_state_dict(state[f"opt_{part.name}"])
            if part.ema is not None:
                part.ema.load_state_dict(state[f"{part.name}_ema"])


class FsdpStrategy(Strategy):
    """torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the ranks."""

    name = "fsdp"

    def __init__(self, device: torch.device, config: FsdpConfig):
        super().__init__(device)
        self.config = config

    def describe(self) -> str:
        c = self.config
        return f"fsdp (shard {c.granularity}, reshard_after_forward {c.reshard_after_forward}, params {c.param_dtype}, reduce {c.reduce_dtype})"

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        policy = MixedPrecisionPolicy(param_dtype=dtypes[self.config.param_dtype], reduce_dtype=dtypes[self.config.reduce_dtype])
        options = {"reshard_after_forward": self.config.reshard_after_forward, "mp_policy": policy}
        if self.config.granularity == "block":
            for block in shard_units(module):
                fully_shard(block, **options)
        fully_shard(module, **options)
        if not self.config.reshard_after_forward:
            # Kept-gathered weights are resharded by the post-backward of their own gradients. A forward that
            # makes none (under no_grad: the GAN's fakes for the D step; or frozen: D in the G step) would leave
            # weights gathered without autograd for the next training forward, which then has no graph.
            # Those forwards reshard at once (a backward through a frozen unit gathers it again).
            module.register_forward_hook(_reshard_after_gradient_free_forward)

    def wrap(self, name: str, module: nn.Module, make_optimizer: Callable, *, ema: bool = False, compile: bool = False) -> Part:
        """compile: the sharded module compiled in place after fully_shard, as torch's FSDP2 documentation orders it."""
        if self.config.param_dtype == "bf16" and self.device.type == "cpu" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            raise ConfigError(
                f"ray.fsdp.param_dtype=bf16: {name} has BatchNorm, and torch's CPU batch_norm refuses bf16 weights with its "
                f"fp32 running statistics; use param_dtype fp32 (bf16 compute comes from the family's precision: auto|bf16)"
            )
        template = copy.deepcopy(module).eval() if self.rank == 0 else None
        ema_module = _ema_copy(module) if ema else None
        self._shard(module)
        if ema_module is not None:
            self._shard(ema_module)  # same placements as the weights: the EMA update stays shard-local
        if compile:
            compile_in_place(module)
        return Part(name, module, module, make_optimizer(module.parameters()), ema=ema_module, template=template)

    def gather(self, part: Part, which: str = "ema") -> nn.Module | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        module = part.ema if which == "ema" else part.module
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        part.template.load_state_dict(full)
        return part.template.to(self.device)

    def save_parts(self, parts: list[Part], directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(parts), checkpoint_id=str(directory / "fsdp"))

    def load_parts(self, parts: list[Part], directory: Path) -> None:
        """DCP reshards on load: a checkpoint from another world size loads as well."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state(parts)
        dcp.load(state, checkpoint_id=str(directory / "fsdp"))
        for part in parts:
            set_model_state_dict(part.module, state[part.name])
            set_optimizer_state_dict(part.module, part.optimizer, state[f"opt_{part.name}"])
            if part.ema is not None:
                set_model_state_dict(part.ema, state[f"{part.name}_ema"])

    @staticmethod
    def _state(parts: list[Part]) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {}
        for part in parts:
            state[part.name] = get_model_state_dict(part.module)
            state[f"opt_{part.name}"] = get_optimizer_state_dict(part.module, part.optimizer)
            if part.ema is not None:
                state[f"{part.name}_ema"] = get_model_state_dict(part.ema)
        return state


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO stage 0-3, one engine per part (the GAN has two)."""

    name = "deepspeed"

    def __init__(self, device: torch.device, config: dict, config_path: str):
        super().__init__(device)
        self.config, self.config_path = config, config_path
        self.stage = config.get("zero_optimization", {}).get("stage", 0)

    def describe(self) -> str:
        return f"deepspeed ZeRO-{self.stage} ({self.config_path}, gradient_clipping {self.config['gradient_clipping']})"

    def wrap(self, name: str, module: nn.Module, make_optimizer: Callable, *, ema: bool = False, compile: bool = False) -> Part:
        """compile: DeepSpeed's own engine.compile() (torch.compile of the engine's module, with its ZeRO hooks)."""
        import deepspeed

        # On CPU, DeepSpeed's first communication backend compiles a C++ shared-memory all-reduce
        # (deepspeed_shm_comm: about 45 CPU-s of g++, again whenever the venv's path changes), which only its
        # inference_all_reduce uses; training reduces through torch.distributed (gloo) either way. Marking the
        # op incompatible makes DeepSpeed skip the build (its build_shm_op returns None); GPUs never build it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ema_module = _ema_copy(module) if ema else None  # whole on every rank, also under ZeRO-3
        template = copy.deepcopy(module).eval() if self.stage == 3 and self.rank == 0 else None
        engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=make_optimizer(module.parameters()),
                                                       config=copy.deepcopy(self.config), dist_init_required=False)  # fmt: skip
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
        if compile:
            engine.compile(compile_kwargs={"dynamic": False})
        return Part(name, engine.module, engine, optimizer, ema=ema_module, template=template, engine=engine)

    @contextlib.contextmanager
    def _whole(self, part: Part):
        """ZeRO-3 partitions the parameters: gather them (read-only) for the duration."""
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(part.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def update_ema(self, part: Part, decay: float) -> None:
        with self._whole(part):
            update_ema(part.ema, part.module, decay)

    def gather(self, part: Part, which: str = "ema") -> nn.Module | None:
        if which == "ema":
            return part.ema if self.rank == 0 else None
        if self.stage != 3:
            return part.module if self.rank == 0 else None
        with self._whole(part):
            if self.rank == 0:
                part.template.load_state_dict({k: v.detach().clone() for k, v in part.module.state_dict().items()})
        return part.template.to(self.device) if self.rank == 0 else None

    def save_parts(self, parts: list[Part], directory: Path) -> None:
        for part in parts:
            client = {"ema": part.ema.state_dict()} if part.ema is not None else {}
            part.engine.save_checkpoint(str(directory / "deepspeed"), tag=part.name, client_state=client)

    def load_parts(self, parts: list[Part], directory: Path) -> None:
        """ZeRO partitions belong to a world size: another one is refused in one line (by the caller's check).
        All or nothing: every file DeepSpeed will read on this rank (each part's model states and this
        rank's optimizer partition) is first loaded with the same safe loader, so a refused file leaves
        no part loaded."""
        for part in parts:
            files = [path for path in sorted((directory / "deepspeed" / part.name).glob("*.pt"))
                     if path.name.startswith("mp_rank_") or f"zero_pp_rank_{self.rank}_" in path.name]  # fmt: skip
            if not files:
                raise CheckpointError(f"{directory}: no DeepSpeed checkpoint for {part.name}")
            for path in files:
                part.engine.checkpoint_engine.load(str(path), map_location="cpu")
        for part in parts:
            loaded, client = part.engine.load_checkpoint(str(directory / "deepspeed"), tag=part.name, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)  # fmt: skip
            if loaded is None:
                raise CheckpointError(f"{directory}: no DeepSpeed checkpoint for {part.name}")
            if part.ema is not None:
                part.ema.load_state_dict(client["ema"])


def build_strategy(name: str, device: torch.device, fsdp: FsdpConfig | None = None, deepspeed: dict | None = None,
                   deepspeed_path: str = "") -> Strategy:  # fmt: skip
    if name == "fsdp":
        return FsdpStrategy(device, fsdp or FsdpConfig())
    if name == "deepspeed":
        if deepspeed is None:
            raise ConfigError("ray.strategy deepspeed needs a resolved DeepSpeed config")
        return DeepSpeedStrategy(device, deepspeed, deepspeed_path)
    return Strategy(device)


def check_resumable(meta: dict, strategy: str, world_size: int, where: str, section: str) -> None:
    """A checkpoint's form belongs to its strategy; ZeRO partitions also to its world size. The driver
    calls this before Ray starts, the workers again before loading."""
    saved, workers = meta.get("strategy", "ddp"), meta.get("world_size")
    if saved != strategy:
        raise CheckpointError(f"{where}: checkpoint at step {meta['step']} was written with ray.strategy={saved}; "
                              f"resume with it, or set {section}.run_name to train afresh")  # fmt: skip
    if saved == "deepspeed" and workers != world_size:
        raise CheckpointError(f"{where}: DeepSpeed ZeRO checkpoint at step {meta['step']} was written by {workers} workers; "
                              f"resume with ray.num_workers={workers} (ddp and fsdp checkpoints load into any worker count)")  # fmt: skip


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def shard_units(module: nn.Module) -> list[nn.Module]:
    """FSDP `block` granularity, innermost first: every module held in an nn.ModuleList/nn.Sequential that owns
    parameters (UNet down/up blocks, the GAN's conv stages). ModuleLists themselves have no forward,
    so they cannot be units."""
    units, seen = [], set()
    for container in module.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            for child in container.children():
                if id(child) not in seen and any(True for _ in child.parameters()):
                    seen.add(id(child))
                    units.append(child)
    return units[::-1]  # innermost first: FSDP2 units are applied bottom-up


def prepare_compiler(device: torch.device, setting: str) -> None:
    """Before a worker compiles. torch.compile's inductor backend writes C++ for the CPU: without a compiler it fails at
    the first step, deep in a traceback, so it is refused here in one line (GPUs compile Triton kernels, which come with
    torch's CUDA wheels). And what compiling says that a user can do nothing about is kept out of the stage's output:
    dynamo tracing through diffusers' lru_cache-wrapped version check, and on a CPU-only machine that no CUDA runtime exists."""
    if device.type == "cpu":
        if not cpp_compiler_found():
            raise ConfigError(f"{setting}: torch.compile needs a C++ compiler on CPU (g++ on PATH, or $CXX); "
                              f"install one (scripts/setup.sh does) or set {setting} false")  # fmt: skip
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped function", category=UserWarning)


def cpp_compiler_found() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (its own search: $CXX, then g++/clang++)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler, several lines long
        return False
    return True


def compile_in_place(module: nn.Module) -> None:
    """nn.Module.compile: the module's calls go through torch.compile while its state_dict keys stay the same, so
    checkpoints are interchangeable with an uncompiled run's. Static shapes: the loops' batches never change size."""
    module.compile(dynamic=False)


def _reshard_after_gradient_free_forward(module: nn.Module, inputs, output) -> None:
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in module.parameters()):
        from torch.distributed.fsdp import FSDPModule

        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()


def _ema_copy(module: nn.Module) -> nn.Module:
    ema = copy.deepcopy(module).eval()
    requires_grad(ema, False)
    return ema


class SafeCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, but loading with weights_only=True: DeepSpeed's own load
    unpickles anything. The few plain record types its files hold are allow-listed by name."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:  # an unexpected type is refused, never unpickled
                raise CheckpointError(f"{path}: refused to load ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def _check_matches(state: dict, key: str, live: dict, where: Path) -> None:
    saved = state.get(key)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: no {key} weights")
    if saved.keys() != live.keys() or any(getattr(saved[k], "shape", None) != getattr(live[k], "shape", None) for k in live):
        raise CheckpointError(f"{where}: {key} weights do not fit this model (other keys or shapes)")


def deepspeed_safe_globals() -> list:
    """Data-only types found in DeepSpeed 0.19 ZeRO checkpoints (no code runs when they load)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
