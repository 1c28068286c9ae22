"""What a training step keeps for backward: the lean RMSNorm, SwiGLU and short-document attention
compute what transformers and SDPA compute (fp64, forward and every gradient), keep fewer bytes,
and the loss never holds a [tokens, vocab] tensor."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from loratool import lora
from loratool.training import attention as A
from loratool.training import recompute as R
from loratool.training.loss import HeadLoss, block_rows


def _model(path: Path, dtype: torch.dtype = torch.float64) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _saved_bytes(fn: Any) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_rms_norm_equals_llama_and_saves_the_input_only(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    norm = model.model.layers[0].input_layernorm
    nn.init.normal_(norm.weight)
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    outs = []
    for fn in (norm.forward, lambda t: R.RMSNorm.apply(t, norm.weight, norm.variance_epsilon)):
        norm.weight.grad = None
        x.grad = None
        y = fn(x)
        (y * torch.arange(64)).sum().backward()
        outs.append((y.detach(), x.grad.clone(), norm.weight.grad.clone()))
    # Llama's norm computes in fp32 whatever the input (`.to(torch.float32)`), and so does this
    # one: the two backward formulas agree to fp32 rounding, not fp64.
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    for got, want in zip(outs[1][1:], outs[0][1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    xb = torch.randn(64, 576, dtype=torch.bfloat16, requires_grad=True)
    w = nn.Parameter(torch.ones(576, dtype=torch.bfloat16), requires_grad=False)
    assert _saved_bytes(lambda: R.RMSNorm.apply(xb, w, 1e-6)) == 64 * 576 * 2 + 64 * 4


def test_swiglu_equals_autograd_and_keeps_two_tensors() -> None:
    torch.manual_seed(0)
    g = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 7, dtype=torch.float64)
    got = R.SwiGLU.apply(g, u)
    (got * weights).sum().backward()
    lean = (got.detach(), g.grad.clone(), u.grad.clone())
    g.grad = u.grad = None
    want = F.silu(g) * u
    (want * weights).sum().backward()
    for a, b in zip(lean, (want.detach(), g.grad, u.grad), strict=True):
        torch.testing.assert_close(a, b)
    gb, ub = (torch.randn(32, 96, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    assert _saved_bytes(lambda: R.SwiGLU.apply(gb, ub)) == 2 * 32 * 96 * 2
    assert _saved_bytes(lambda: F.silu(gb) * ub) == 3 * 32 * 96 * 2


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_short_attention_equals_sdpa_per_document(heads: int, kv_heads: int) -> None:
    torch.manual_seed(0)
    t, d = 13, 8
    spans = (((0, 5), (5, 11)), ((0, 13),))  # row 0 ends in two padding positions
    q = torch.randn(2, heads, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, t, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, t, d, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, t, heads, d, dtype=torch.float64)
    out = A.ShortAttention.apply(q, k, v, spans, 0.3)
    (out * weights).sum().backward()
    lean = [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    for x in (q, k, v):
        x.grad = None
    ref = torch.zeros(2, t, heads, d, dtype=torch.float64)
    for i, row in enumerate(spans):
        for s, e in row:
            o = F.scaled_dot_product_attention(
                q[i : i + 1, :, s:e],
                k[i : i + 1, :, s:e],
                v[i : i + 1, :, s:e],
                is_causal=True,
                scale=0.3,
                enable_gqa=heads != kv_heads,
            )
            ref[i, s:e] = o[0].transpose(0, 1)
    (ref * weights).sum().backward()
    for a, b in zip(lean, (ref.detach(), q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(a, b)
    assert out[0, 11:].abs().max() == 0  # padding positions: zero output


def test_packed_attention_mixes_short_and_long_documents() -> None:
    """Short documents through ShortAttention, long ones through SDPA: the same as all SDPA."""
    torch.manual_seed(1)
    n_long = A.SHORT_DOCUMENT + 8
    t = n_long + 20
    spans = (((0, 20), (20, t)),)
    q, k, v = (torch.randn(1, 4, t, 16, requires_grad=True) for _ in range(3))
    weights = torch.randn(1, t, 4, 16)
    results = []
    for lean in (True, False):
        for x in (q, k, v):
            x.grad = None
        with A.packed_segments(spans):
            if lean:
                out, _ = A.packed_attention(nn.Module(), q, k, v, None, scaling=0.25)
            else:
                with torch.no_grad():  # the old path: no ShortAttention without gradients
                    out, _ = A.packed_attention(nn.Module(), q, k, v, None, scaling=0.25)
                results.append(out)
                continue
        (out * weights).sum().backward()
        results.append(out.detach())
        grads = [x.grad.clone() for x in (q, k, v)]
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads)


def test_lean_model_trains_like_the_original_and_keeps_less(tiny_llama_dir: Path) -> None:
    """On a LoRA'd Llama: the same loss and LoRA gradients (fp64), fewer saved bytes (bf16)."""
    torch.manual_seed(0)
    base = _model(tiny_llama_dir)
    lora.inject(base, targets="q_proj,k_proj,v_proj,o_proj,gate_proj", rank=4, dropout=0.0)
    for p in lora.lora_parameters(base).values():
        nn.init.normal_(p, std=0.1)
    lean = copy.deepcopy(base)
    counts = R.lean(lean)
    assert counts == {"rms_norm": 5, "swiglu": 2}  # 2 layers × 2 norms + the final norm
    assert all(p.grad is None for p in lean.parameters())  # the probes left no gradients
    ids = torch.randint(0, 200, (2, 12))
    grads = []
    for m in (base, lean):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append([p.grad for p in lora.lora_parameters(m).values()])
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b)

    base, lean = base.to(torch.bfloat16), lean.to(torch.bfloat16)
    kept = [_saved_bytes(lambda m=m: m.model(input_ids=ids)[0]) for m in (base, lean)]
    # Per token: each norm whose input needs a gradient (all but the first, which reads the
    # frozen embedding) keeps 2 bytes × hidden instead of an fp32 copy, and each MLP no silu(g).
    tokens, hidden, inter = 24, 64, 128
    assert kept[0] - kept[1] == tokens * (4 * hidden * 2 + 2 * inter * 2)


def test_a_norm_that_differs_is_left_alone() -> None:
    class GemmaLikeRMSNorm(nn.Module):  # (1 + w) scaling: not Llama's formula
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (1.0 + self.weight) * (x.float() * r).to(x.dtype)

    m = nn.Sequential(GemmaLikeRMSNorm())
    assert R.lean(m) == {"rms_norm": 0, "swiglu": 0}
    assert "forward" not in vars(m[0])


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_the_loss_never_holds_tokens_by_vocab() -> None:
    vocab, hidden, n = 5000, 32, 3000
    head = nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    h = torch.randn(n, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    largest = _Largest()
    with largest:
        loss = HeadLoss(head, object(), torch.float32)(h, targets)
        loss.backward()
    assert largest.numel <= block_rows(vocab) * vocab < n * vocab
    want = F.cross_entropy(h.detach() @ head.weight.t(), targets, reduction="sum")
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-3)


def test_dropout_keeps_no_mask_and_the_input_is_shared() -> None:
    """q/k/v over one input with dropout: the input once, per layer h and the factors; the mask
    is drawn again in backward from its seed, the same one (so the gradients are dropout's)."""
    from loratool.lora.layer import dropout_mask

    cpu = torch.device("cpu")
    for n in (1, 7, 577, 100_000):
        a = dropout_mask(torch.Size([3, n]), 0.25, cpu, seed=11)
        assert torch.equal(a, dropout_mask(torch.Size([3, n]), 0.25, cpu, seed=11))
    big = dropout_mask(torch.Size([1000, 1000]), 0.05, cpu, seed=3)
    assert abs(big.float().mean().item() - 0.05) < 0.002  # ~0.0002 is one standard deviation
    assert not torch.equal(big, dropout_mask(torch.Size([1000, 1000]), 0.05, cpu, seed=4))
    torch.manual_seed(0)
    t, d, r = 64, 96, 4
    layers = [
        lora.LoraLayer(nn.Linear(d, d).requires_grad_(False), rank=r, alpha=8, dropout=0.1)
        for _ in range(3)
    ]
    x = torch.randn(t, d, requires_grad=True)
    kept = _saved_bytes(lambda: [layer(x) for layer in layers])
    # x (4 bytes, fp32 here) once; per layer: h = drop(x)·Aᵀ [t, r], s·B and A/(1-p) (r×in)
    per_layer = t * r * 4 + d * r * 4 + d * r * 4
    assert kept == t * d * 4 + 3 * per_layer
