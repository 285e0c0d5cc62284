"""CPU-kernel choices behind the block math of ``llama.py``: how the same products are laid out
and called so that the kernels PyTorch dispatches to run them fast. None of them changes the math;
results differ at most by float rounding (the order of sums over the input dimension).

- **Input-major projection weights** (``prefers_input_major``, ``input_major``). A decoding step
  multiplies one vector by every weight of the span once, so it streams the weights from memory.
  On CPU, float32 MKL streams a weight stored input-major (the same ``(out, in)`` matrix with
  strides ``(1, out)``: its matrix-vector product runs as rows of axpy) faster than the row-major
  layout, and batched products (prefill, forward, backward) run as fast either way, with
  bit-identical outputs. bfloat16 and float16 matrix-vector products are slower input-major and
  CUDA gains nothing, so those keep the checkpoint's row-major layout. ``load_span`` stores the
  weights this way; ``nn.Linear`` is unchanged and keeps no second copy.
- **Split decoding products** (``project``). MKL runs a matrix-vector product on one thread
  whatever torch's thread count, so a decoding step would read every weight with one core.
  ``project`` runs a product of a few rows over an input-major weight as one ``bmm`` over row
  blocks of the weight (one per thread, views, no copy) and a sum of the parts.
- **oneDNN products for several rows** (``project``). For products of 2 rows or more (batched
  decoding of several sessions, prefill chunks, stateless forwards) on CPU float32, oneDNN's
  inner product (``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own compiler emits for
  CPU linears; it takes the dense weight as it is, input-major or not, and keeps no packed copy)
  runs about twice as fast as MKL's ``sgemm`` on this AMD EPYC: the 246M Llama's gate/up
  projection, 8 rows, 1.5 ms against 3.2 ms split, 256 rows 15 against 28 ms. A single row stays
  with the split product, which streams the weight faster. Not used where autograd needs the
  product (training), for other dtypes or devices, or where the op is missing.
- **Grouped decoding attention** (``attend``). With one query per sequence, the query heads that
  share a key/value head attend as that many queries of it, so the cache is read once per
  key/value head; SDPA's ``enable_gqa`` path reads it as if expanded to every query head.

Shapes as in ``llama.py``: B batch, T new tokens, S keys, nh query heads, nkv key/value heads, hd
head dim. The measured effect of each choice is in docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def prefers_input_major(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether projection weights are kept input-major (column-major ``(out, in)``) on this device:
    CPU float32 only, where MKL's matrix-vector product streams that layout faster."""
    return torch.device(device).type == "cpu" and dtype == torch.float32


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """The same ``(out, in)`` matrix stored input-major (strides ``(1, out)``); a no-op if it is."""
    return weight if weight.stride() == (1, weight.shape[0]) else weight.t().contiguous().t()


SPLIT_ROWS = 32
"""Products with at most this many rows (sequences × new tokens: decoding, batched decoding of up
to 32 sessions) may be split (``project``). On the 246M Llama's span of 5 blocks, 2 threads,
batched steps of 12–32 rows ran 5–30% faster split than as one MKL product over the input-major
weight (docs/benchmarks.md, batched decoding)."""
MAX_SPLITS = 16
"""The most row blocks a product is split into, whatever the thread count."""


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; for a few rows on CPU with several torch threads, a split product.

    An input-major weight is a contiguous (in, out) matrix, so its row blocks are views:
    x · W = Σ_c x[:, c-th in-slice] · W[c-th row block], one ``bmm`` over the blocks (one per
    thread) and a sum. Anything else (many rows, one thread, another device or layout, a
    ``QuantLinear``) runs as ``linear(x)``.
    """
    if type(linear) is not nn.Linear:
        return linear(x)
    weight = linear.weight
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if rows >= ONEDNN_MIN_ROWS and _onednn_fits(weight, x):
        out = _ONEDNN_LINEAR(x.reshape(rows, in_features), weight, linear.bias, "none", [], "")
        return out.view(*x.shape[:-1], out_features)
    splits = _splits(in_features, torch.get_num_threads())
    if (splits == 1 or rows > SPLIT_ROWS or rows == 0 or weight.device.type != "cpu"
            or weight.stride() != (1, out_features)):
        return linear(x)
    blocks = weight.t().view(splits, in_features // splits, out_features)  # (splits, in/splits, out): views
    parts = torch.bmm(x.reshape(rows, splits, in_features // splits).transpose(0, 1), blocks)  # (splits, rows, out)
    out = parts.sum(0).view(*x.shape[:-1], out_features)
    return out if linear.bias is None else out + linear.bias


ONEDNN_MIN_ROWS = 2
"""Products of at least this many rows run as oneDNN inner products (``project``) where they can."""


def _find_onednn_linear():
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        pass
    return None


_ONEDNN_LINEAR = _find_onednn_linear()


def _onednn_fits(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``project`` may run this product through oneDNN: CPU float32, no autograd."""
    return (_ONEDNN_LINEAR is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
            and x.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def onednn_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x`` (rows, in) times ``weight`` (out, in) transposed through oneDNN, where ``project``
    would use it (at least ``ONEDNN_MIN_ROWS`` rows, CPU float32, no autograd); None elsewhere."""
    if x.shape[0] < ONEDNN_MIN_ROWS or not _onednn_fits(weight, x):
        return None
    return _ONEDNN_LINEAR(x, weight, None, "none", [], "")


@functools.cache
def _splits(in_features: int, threads: int) -> int:
    """The most row blocks, at most one per thread (and ``MAX_SPLITS``), that divide ``in_features``."""
    return max(c for c in range(1, min(threads, MAX_SPLITS) + 1) if in_features % c == 0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ/√hd + mask)·v, each key/value head shared by nh / nkv query heads.

    q: (B, nh, T, hd); k, v: (B, nkv, S, hd); mask: boolean (B, 1, T, S), True where a query may
    attend, or None for plain causal attention (``build_attention_mask`` returns None for several
    new tokens only when there is no prefix). Returns (B, nh, T, hd).
    """
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    groups = nh // nkv
    if T == 1 and groups > 1:  # decoding; a mask here is (B, 1, 1, S) and broadcasts over the groups
        grouped = q.reshape(B, nkv, groups, hd)  # a group's query heads as `groups` queries of its key/value head
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).reshape(B, nh, 1, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                          enable_gqa=True)
