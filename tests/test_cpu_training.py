"""The training processes' CPU settings: the forward's context (gen_core.training.training_compute: autocast, and on a
CPU the math attention kernel), and glibc's malloc kept from handing memory back (pipelines.worker.retain_freed_memory,
set by every training worker), which must not change a single value."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gen_core.training import training_compute
from pipelines.worker import Worker

REPO = Path(__file__).resolve().parent.parent


def attention_backward_node(context) -> tuple[str, torch.dtype]:
    q, k, v = (torch.randn(4, 2, 16, 32, requires_grad=True) for _ in range(3))
    with context:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return type(out.grad_fn).__name__, out.dtype


def test_a_training_forward_on_cpu_runs_attention_through_the_math_kernel_under_autocast():
    default, _ = attention_backward_node(contextlib.nullcontext())
    assert "Flash" in default  # what the CPU picks by itself, and what training_compute avoids
    node, dtype = attention_backward_node(training_compute(torch.device("cpu"), torch.bfloat16))
    assert "Flash" not in node and "Attention" not in node  # decomposed into matrix products and a softmax
    assert dtype == torch.bfloat16
    node, dtype = attention_backward_node(training_compute(torch.device("cpu"), None))
    assert "Flash" not in node and dtype == torch.float32


def test_every_training_loop_enters_it_through_the_worker():
    cpu_worker = SimpleNamespace(device=torch.device("cpu"))  # Worker.training_compute reads only the worker's device
    node, dtype = attention_backward_node(Worker.training_compute(cpu_worker, torch.bfloat16))
    assert "Flash" not in node and dtype == torch.bfloat16


def test_the_math_kernel_computes_the_same_attention_and_gradients_in_fp32():
    q, k, v = (torch.randn(8, 4, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(i)).float().requires_grad_() for i in range(3))
    flash = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    grads_flash = torch.autograd.grad(flash.square().sum(), (q, k, v))
    with training_compute(torch.device("cpu"), None):
        math = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    grads_math = torch.autograd.grad(math.square().sum(), (q, k, v))
    torch.testing.assert_close(math, flash)
    for a, b in zip(grads_math, grads_flash):
        torch.testing.assert_close(a, b)


# glibc's count of the bytes in mmap()ed blocks (mallinfo2, glibc >= 2.33): how a test sees where a block came from.
MALLINFO = """
import ctypes, sys
sys.path.insert(0, {repo!r})
import torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
def mmapped_mib(nbytes):  # 24 MiB: mmap()ed by default (and under glibc's adaptive threshold here), heap with the setting
    before = mallinfo2().hblkhd
    block = torch.empty(nbytes, dtype=torch.uint8)
    return (mallinfo2().hblkhd - before) >> 20
"""

STEP = MALLINFO + """
from pipelines.worker import retain_freed_memory
print("set", retain_freed_memory() if sys.argv[1] == "on" else False)
print("mmapped", mmapped_mib(24 << 20))
torch.set_num_threads(2)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 3, padding=1))
opt = torch.optim.Adam(net.parameters())
x = torch.randn(16, 3, 64, 64)  # 16 MiB activations: fresh mmap()s by default, reused heap pages with the setting
for _ in range(3):
    loss = net(x).square().mean()
    opt.zero_grad(); loss.backward(); opt.step()
print("digest", repr(float(loss)), repr(float(sum(p.double().sum() for p in net.parameters()))))
"""


def glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")) if name == "glibc" and version else ()


GLIBC = pytest.mark.skipif(platform.system() != "Linux" or glibc_version() < (2, 33), reason="mallopt and mallinfo2 (glibc >= 2.33)")


def run_lines(script: str, *args: str, **fields: str) -> dict[str, str]:
    """Run `script` (str.format'ed with the repo and `fields`) in a fresh Python -> its "key value" lines."""
    code = script.format(repo=str(REPO), **fields)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


@GLIBC
def test_retaining_freed_memory_takes_effect_and_changes_no_value():
    runs = {setting: run_lines(STEP, setting) for setting in ("off", "on")}
    assert runs["on"]["set"] == "True" and runs["off"]["set"] == "False"
    assert runs["off"]["mmapped"] == "24" and runs["on"]["mmapped"] == "0"  # the block came from the heap
    assert runs["on"]["digest"] == runs["off"]["digest"]


START_WORKER = MALLINFO + """
from gen_core.config import load_config
from pipelines.worker import start_worker
cfg = load_config({params!r}, [])
context = dict(stage="train_gan", section="gan", data_uri="unused", num_classes=10, signature="s", run_uri={run!r},
               data_hash="h", git_revision="r", tracking_uri="sqlite:///" + {run!r} + "/mlflow.db", mlflow_run_id="m",
               extra={{}}, in_process=True)
if sys.argv[1] == "start":
    start_worker({{"run": cfg.model_dump(mode="json"), "context": context}})
print("mmapped", mmapped_mib(24 << 20))
"""


@GLIBC
def test_every_training_worker_keeps_the_memory_it_frees(tmp_path):
    fields = {"params": str(REPO / "params.yaml"), "run": str(tmp_path)}
    assert run_lines(START_WORKER, "imported", **fields)["mmapped"] == "24"  # the same imports, no worker: mmap()ed
    assert run_lines(START_WORKER, "start", **fields)["mmapped"] == "0"  # start_worker, what every training loop calls first
