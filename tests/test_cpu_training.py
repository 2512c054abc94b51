"""The training forward's context (gen_core.training.training_compute): autocast, and on a CPU the math attention kernel."""

from __future__ import annotations

import torch

from gen_core.training import training_compute


def attention_backward_node(device: torch.device, dtype) -> tuple[str, torch.dtype]:
    q, k, v = (torch.randn(4, 2, 16, 32, requires_grad=True) for _ in range(3))
    with training_compute(device, dtype):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return type(out.grad_fn).__name__, out.dtype


def test_a_training_forward_on_cpu_runs_attention_through_the_math_kernel_under_autocast():
    default = type(torch.nn.functional.scaled_dot_product_attention(*(torch.randn(4, 2, 16, 32, requires_grad=True) for _ in range(3))).grad_fn).__name__
    assert "Flash" in default  # what the CPU picks by itself, and what training_compute avoids
    node, dtype = attention_backward_node(torch.device("cpu"), torch.bfloat16)
    assert "Flash" not in node and "Attention" not in node  # decomposed into matrix products and a softmax
    assert dtype == torch.bfloat16
    node, dtype = attention_backward_node(torch.device("cpu"), None)
    assert "Flash" not in node and dtype == torch.float32


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
