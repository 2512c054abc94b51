"""The training processes' CPU settings (gen_core.training): the forward's context (autocast, and on a CPU the math
attention kernel), and glibc's malloc kept from handing memory back, which must not change a single value."""

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


def test_every_training_loop_enters_it_through_the_workers_autocast():
    cpu_worker = SimpleNamespace(device=torch.device("cpu"))  # Worker.autocast reads only the worker's device
    node, dtype = attention_backward_node(Worker.autocast(cpu_worker, torch.bfloat16))
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


STEP = """
import sys, torch
sys.path.insert(0, {repo!r})
from gen_core.training import retain_freed_memory
print("set", retain_freed_memory() if sys.argv[1] == "on" else False)
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


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retaining_freed_memory_takes_effect_and_changes_no_value():
    runs = {}
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", STEP.format(repo=str(REPO)), setting], capture_output=True, text=True, check=True).stdout
        runs[setting] = dict(line.split(" ", 1) for line in out.splitlines())
    assert runs["on"]["set"] == "True" and runs["off"]["set"] == "False"
    assert runs["on"]["digest"] == runs["off"]["digest"]
