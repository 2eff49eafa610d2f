"""Triton attention for short sequences: padded (key-padding mask) and packed (cu_seqlens).

What the kernels do:
- Key padding comes from per-sequence lengths, computed once from the (B, L) mask (and cached
  while the same mask is reused by every layer); the kernels never load a mask tensor. The
  mask must be right padding (real tokens first): checked on CPU, documented on CUDA, where a
  check would cost a host synchronisation.
- Real head_dim 32, 64 and 128 (the tiles are exactly that wide: no padding of 32 up to 64);
  other head dims get a reason from `check`, so dispatch falls back.
- Forward: one program per (query tile, sequence, head). The key/value tile is as long as the
  sequence up to 128 (BLOCK_N = next power of two >= L), so for L <= 128 the whole K and V of a
  (sequence, head) is loaded once into shared memory and the softmax is a single pass; longer
  sequences loop flash-style over 128-wide tiles. Loops stop at the sequence's length, so tiles
  past it are skipped; query tiles wholly past it just write zeros. The log-sum-exp (base 2)
  is saved for the backward.
- Backward: one launch; program i computes dK, dV of key tile i (looping over query tiles)
  and dQ of query tile i (looping over key tiles), recomputing P from the saved LSE; no atomics
  (deterministic). Padded query rows produce zero output and zero gradients, padded keys zero
  dK, dV.
- Autotuned per (length bucket, head_dim, dtype), with few configs; set
  SMARTER_FAST_TRITON_AUTOTUNE=0 for a fixed heuristic config (fast start-up, used by tests).
- fp32 (IEEE unless torch's float32 matmul precision allows TF32), bf16, fp16, with fp32
  accumulation.
- Attention dropout (dropout_p > 0): inverted dropout on the probabilities, P' = P * keep /
  (1 - p), with a mask that is never stored: keep for query i and key j (positions in the
  sequence) comes from tl.philox(seed, counter = (16 (j // 64) + j % 16, i, head, sequence)),
  word (j // 16) % 4, kept when its top 24 bits are >= round(p * 2^24): the same stream as the
  cpp kernels (csrc/kernels/attention_impl.h) and ref.dropout_keep_mask, so the three agree
  on the mask for a seed. The backward regenerates it. The seed comes from torch's default
  generator (ref.draw_dropout_seed), only when dropout_p > 0. Philox runs per element here
  (4 words per call, one used): simple, and cheap beside the tile's loads on a GPU.

Registered as torch.library.triton_ops `smarter_fast_triton::attention_fwd` / `attention_bwd`
with register_autograd; under TRITON_INTERPRET=1 they run on CPU tensors in Triton's
interpreter.
"""

from __future__ import annotations

import math
import os
import weakref

import torch

from ..registry import triton_interpret
from .ref import draw_dropout_seed, dropout_threshold

from ..triton_support import (TRITON_ERROR, availability, skip_launch, tl, triton,  # noqa: F401
                              triton_op, wrap_triton)

HEAD_DIMS = (32, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634

# Tile sizes used under TRITON_INTERPRET=1 (no autotuning there); small so that tests on
# short odd lengths exercise multi-tile loops, partial tiles and skipped tiles.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK": 16}


def check(q, k, v, dropout_p=0.0, **_):
    reasons = []
    if q.shape[-1] not in HEAD_DIMS:
        reasons.append(f"head_dim {q.shape[-1]} not in {'/'.join(map(str, HEAD_DIMS))} (the tiles "
                       "are sized for BERT's head dims; larger ones spill registers on sm_80/sm_90)")
    if q.numel() >= 2**31:
        reasons.append("more than 2^31 elements (32-bit offsets)")
    return reasons


def autotune_enabled() -> bool:
    return os.environ.get("SMARTER_FAST_TRITON_AUTOTUNE", "1") not in ("", "0")


def _bucket(max_seqlen: int) -> int:
    return max(16, triton.next_power_of_2(max(1, int(max_seqlen))))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # Triton's default; only fp32 operands are affected


def fp32_mode() -> str:
    """How fp32 attention computes its products on the GPU now, for `info`."""
    if _dot_precision(torch.float32) == "ieee":
        return ("IEEE fp32 (torch.get_float32_matmul_precision() is 'highest'; 'high' allows TF32, "
                "with its own tiles)")
    return "TF32 (torch.get_float32_matmul_precision() allows it; 'highest' gives IEEE fp32)"


def _precision_class(dtype: torch.dtype) -> str:
    """"lowp" (bf16, fp16), "tf32" (fp32 where torch allows TF32) or "ieee" (fp32 otherwise)."""
    return _dot_precision(dtype) if dtype == torch.float32 else "lowp"


# Tiles per (precision class, head dim), chosen from the GPU compile check (docs/design.md, "GPU
# compile check") under Triton 3.6 and 3.9: the fixed configs spill no registers on sm_80 and
# sm_90 and the autotune candidates at most 512 bytes, all within both targets' shared memory.
# Forward: BLOCK_N keys per pass (the whole sequence up to that), then (BLOCK_M, num_warps);
# backward: (BLOCK, num_warps). A shorter length bucket shrinks the fixed tile to fit; where
# that shrunk tile spills, `fwd_at` / `bwd_at` give the bucket a tile of its own.
_TILES = {
    ("lowp", 32): dict(block_n=128, fwd=(16, 4), fwd_tune=((16, 4), (16, 8), (32, 8), (64, 8)),
                       bwd=(32, 8), bwd_tune=((32, 4), (32, 8), (64, 8)),
                       fwd_at={32: (32, 4)}),
    ("lowp", 64): dict(block_n=128, fwd=(16, 8), fwd_tune=((16, 8), (32, 8)),
                       bwd=(32, 8), bwd_tune=((16, 4), (32, 8)),
                       fwd_at={64: (32, 8)}, bwd_at={16: (16, 4)}),
    ("tf32", 32): dict(block_n=128, fwd=(16, 8), fwd_tune=((16, 8), (32, 8), (64, 8)),
                       bwd=(32, 8), bwd_tune=((16, 8), (32, 4), (32, 8), (64, 8))),
    ("tf32", 64): dict(block_n=128, fwd=(32, 8), fwd_tune=((16, 8), (32, 8), (64, 8)),
                       bwd=(32, 8), bwd_tune=((16, 8), (32, 4), (32, 8)),
                       fwd_at={32: (16, 8)}),
    ("ieee", 32): dict(block_n=128, fwd=(32, 8), fwd_tune=((16, 8), (32, 8)),
                       bwd=(16, 8), bwd_tune=((16, 8), (32, 4), (32, 8)),
                       fwd_at={32: (32, 4)}),
    ("ieee", 64): dict(block_n=128, fwd=(16, 8), fwd_tune=((16, 8),),
                       bwd=(16, 4), bwd_tune=((16, 4), (16, 8), (32, 8)),
                       fwd_at={16: (16, 4), 32: (16, 4)}),
}


def _tiles(dtype: torch.dtype, head_dim: int) -> dict:
    return _TILES[(_precision_class(dtype), head_dim)]


def _block_n(bucket: int, head_dim: int, dtype: torch.dtype) -> int:
    return min(bucket, _tiles(dtype, head_dim)["block_n"])


def _fit(block: int, bucket: int) -> int:
    """A tile no taller than the bucket (a shorter bucket has less to cover)."""
    return min(block, max(16, bucket))


def _fixed(kind: str, dtype: torch.dtype, head_dim: int, bucket: int) -> tuple[int, int]:
    """(rows per program, num_warps) of the launch path without autotuning; kind 'fwd' or 'bwd'."""
    tiles = _tiles(dtype, head_dim)
    block, warps = tiles.get(f"{kind}_at", {}).get(bucket, tiles[kind])
    return _fit(block, bucket), warps


if TRITON_ERROR is None:

    def _all_tune(key):
        return sorted({c for tiles in _TILES.values() for c in tiles[key]})

    def _fwd_configs():
        return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=2)
                for bm, w in _all_tune("fwd_tune")]

    def _bwd_configs():
        return [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1)
                for b, w in _all_tune("bwd_tune")]

    def _pruner(key, block):
        """Autotune candidates of this launch's precision class and head dim (from _TILES),
        no taller than its length bucket (the smallest one when all are)."""
        def prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            tiles = _tiles(args["Q"].dtype, args["HEAD_DIM"])
            mine = [c for c in configs if (c.kwargs[block], c.num_warps) in tiles[key]]
            fitting = [c for c in mine if c.kwargs[block] <= max(16, args["L_BUCKET"])]
            return fitting or [min(mine, key=lambda c: c.kwargs[block])]
        return {"early_config_prune": prune}

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
        # DOT_F32: Triton 3.9's interpreter miscomputes bf16 tl.dot, so there the (already
        # rounded) operands go in as fp32 - the same products, exactly, as the GPU's bf16 MMA.
        if DOT_F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _dropout_mult(seed, seq, head, rows, cols, thresh, scale):
        """keep / (1 - p) or 0 for query positions `rows` and key positions `cols` (int32,
        broadcast to one 2-D shape) of sequence `seq`, head `head`: the kernels' Philox mask."""
        zero = rows * 0 + cols * 0
        c0 = (cols // 64) * 16 + cols % 16 + zero
        w = (cols // 16) % 4 + zero
        r0, r1, r2, r3 = tl.philox(seed, c0, rows + zero, zero + head.to(tl.int32),
                                   zero + seq.to(tl.int32))
        r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
        keep = (r >> 8).to(tl.int32) >= thresh
        return tl.where(keep, scale, 0.0)

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, SEQ,
                         sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                         so_b, so_h, so_l, slse_b, slse_h,
                         n_heads, L_pad, qk_scale, L_BUCKET, seed, drop_thresh, drop_scale,
                         VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_F32: tl.constexpr, DROPOUT: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        if VARLEN:  # packed: rows start..start+len of (T, heads, D); nothing stored past len
            start = tl.load(SEQ + b).to(tl.int64)
            seqlen = tl.load(SEQ + b + 1).to(tl.int32) - start.to(tl.int32)
            limit = seqlen
        else:  # padded: rows 0..L_pad of sequence b; rows len..L_pad are written as zeros
            start = b * 0
            seqlen = tl.load(SEQ + b).to(tl.int32)
            limit = L_pad
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = start + offs_m
        o_ptrs = O + b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :]
        store_rows = offs_m < limit
        if pid_m * BLOCK_M >= seqlen:  # a tile wholly past the sequence: zeros, no work
            tl.store(o_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], dtype=O.dtype.element_ty),
                     mask=store_rows[:, None])
        else:
            row_ok = offs_m < seqlen
            q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            k_base = K + b * sk_b + h * sk_h
            v_base = V + b * sv_b + h * sv_h
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            for start_n in range(0, seqlen, BLOCK_N):  # one pass when BLOCK_N >= len
                offs_n = start_n + tl.arange(0, BLOCK_N)
                col_ok = offs_n < seqlen
                kt = tl.load(k_base + (start + offs_n)[None, :] * sk_l + offs_d[:, None],
                             mask=col_ok[None, :], other=0.0)  # (D, BLOCK_N)
                s = _dot(q, kt, PRECISION, DOT_F32) * qk_scale  # log2 domain
                s = tl.where(col_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                vt = tl.load(v_base + (start + offs_n)[:, None] * sv_l + offs_d[None, :],
                             mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
                if DROPOUT:  # l_i sums the undropped P; only P V sees the mask
                    p = p * _dropout_mult(seed, b, h, offs_m[:, None], offs_n[None, :],
                                          drop_thresh, drop_scale)
                acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PRECISION, DOT_F32)
                m_i = m_new
            acc = acc / l_i[:, None]
            acc = tl.where(row_ok[:, None], acc, 0.0)  # padded query rows come out zero
            tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=store_rows[:, None])
            tl.store(LSE + b * slse_b + h * slse_h + rows, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _attn_bwd_kernel(Q, K, V, O, DO, LSE, DQ, DK, DV, SEQ,
                         sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                         so_b, so_h, so_l, sdo_b, sdo_h, sdo_l,
                         sdq_b, sdq_h, sdq_l, sdk_b, sdk_h, sdk_l, sdv_b, sdv_h, sdv_l,
                         slse_b, slse_h,
                         n_heads, L_pad, sm_scale, qk_scale, L_BUCKET, seed, drop_thresh,
                         drop_scale,
                         VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                         PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                         DROPOUT: tl.constexpr):
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        if VARLEN:
            start = tl.load(SEQ + b).to(tl.int64)
            seqlen = tl.load(SEQ + b + 1).to(tl.int32) - start.to(tl.int32)
            limit = seqlen
        else:
            start = b * 0
            seqlen = tl.load(SEQ + b).to(tl.int32)
            limit = L_pad
        offs_d = tl.arange(0, HEAD_DIM)
        offs_t = pid * BLOCK + tl.arange(0, BLOCK)  # this program's key tile and query tile
        rows_t = start + offs_t
        store_t = offs_t < limit
        q_base = Q + b * sq_b + h * sq_h
        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        o_base = O + b * so_b + h * so_h
        do_base = DO + b * sdo_b + h * sdo_h
        lse_base = LSE + b * slse_b + h * slse_h
        dq_ptrs = DQ + b * sdq_b + h * sdq_h + rows_t[:, None] * sdq_l + offs_d[None, :]
        dk_ptrs = DK + b * sdk_b + h * sdk_h + rows_t[:, None] * sdk_l + offs_d[None, :]
        dv_ptrs = DV + b * sdv_b + h * sdv_h + rows_t[:, None] * sdv_l + offs_d[None, :]
        if pid * BLOCK >= seqlen:  # past the sequence: zero gradients, no work
            zero = tl.zeros([BLOCK, HEAD_DIM], dtype=DQ.dtype.element_ty)
            tl.store(dq_ptrs, zero, mask=store_t[:, None])
            tl.store(dk_ptrs, zero, mask=store_t[:, None])
            tl.store(dv_ptrs, zero, mask=store_t[:, None])
        else:
            ok_t = offs_t < seqlen
            # ---- dK, dV for key tile `pid`: loop over query tiles ----
            k = tl.load(k_base + rows_t[:, None] * sk_l + offs_d[None, :],
                        mask=ok_t[:, None], other=0.0)  # (N, D)
            v = tl.load(v_base + rows_t[:, None] * sv_l + offs_d[None, :],
                        mask=ok_t[:, None], other=0.0)
            dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
            dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
            for start_m in range(0, seqlen, BLOCK):
                offs_m = start_m + tl.arange(0, BLOCK)
                ok_m = offs_m < seqlen
                rows_m = start + offs_m
                qt = tl.load(q_base + rows_m[None, :] * sq_l + offs_d[:, None],
                             mask=ok_m[None, :], other=0.0)  # (D, M)
                do = tl.load(do_base + rows_m[:, None] * sdo_l + offs_d[None, :],
                             mask=ok_m[:, None], other=0.0)  # (M, D)
                o = tl.load(o_base + rows_m[:, None] * so_l + offs_d[None, :],
                            mask=ok_m[:, None], other=0.0)
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (M,)
                lse = tl.load(lse_base + rows_m, mask=ok_m, other=0.0)
                st = _dot(k, qt, PRECISION, DOT_F32) * qk_scale  # (N, M)
                pt = tl.exp2(st - lse[None, :])
                pt = tl.where(ok_t[:, None] & ok_m[None, :], pt, 0.0)
                dpt = _dot(v, tl.trans(do), PRECISION, DOT_F32)  # (N, M)
                if DROPOUT:  # dV = P'^T dO; dP = dP' * M (key tile rows, query columns)
                    mt = _dropout_mult(seed, b, h, offs_m[None, :], offs_t[:, None],
                                       drop_thresh, drop_scale)
                    dv += _dot((pt * mt).to(do.dtype), do, PRECISION, DOT_F32)
                    dpt = dpt * mt
                else:
                    dv += _dot(pt.to(do.dtype), do, PRECISION, DOT_F32)
                dst = pt * (dpt - delta[None, :])
                dk += _dot(dst.to(qt.dtype), tl.trans(qt), PRECISION, DOT_F32)
            tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_t[:, None])
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_t[:, None])

            # ---- dQ for query tile `pid`: loop over key tiles ----
            q = tl.load(q_base + rows_t[:, None] * sq_l + offs_d[None, :],
                        mask=ok_t[:, None], other=0.0)  # (M, D)
            do = tl.load(do_base + rows_t[:, None] * sdo_l + offs_d[None, :],
                         mask=ok_t[:, None], other=0.0)
            o = tl.load(o_base + rows_t[:, None] * so_l + offs_d[None, :],
                        mask=ok_t[:, None], other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            lse = tl.load(lse_base + rows_t, mask=ok_t, other=0.0)
            dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
            for start_n in range(0, seqlen, BLOCK):
                offs_n = start_n + tl.arange(0, BLOCK)
                ok_n = offs_n < seqlen
                rows_n = start + offs_n
                kt = tl.load(k_base + rows_n[None, :] * sk_l + offs_d[:, None],
                             mask=ok_n[None, :], other=0.0)  # (D, N)
                vt = tl.load(v_base + rows_n[None, :] * sv_l + offs_d[:, None],
                             mask=ok_n[None, :], other=0.0)
                s = _dot(q, kt, PRECISION, DOT_F32) * qk_scale  # (M, N)
                p = tl.exp2(s - lse[:, None])
                p = tl.where(ok_t[:, None] & ok_n[None, :], p, 0.0)
                dp = _dot(do, vt, PRECISION, DOT_F32)
                if DROPOUT:
                    dp = dp * _dropout_mult(seed, b, h, offs_t[:, None], offs_n[None, :],
                                            drop_thresh, drop_scale)
                ds = p * (dp - delta[:, None])
                dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, DOT_F32)
            tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=store_t[:, None])

    _attn_fwd_tuned = triton.autotune(configs=_fwd_configs(),
                                      key=["L_BUCKET", "HEAD_DIM", "VARLEN", "PRECISION"],
                                      prune_configs_by=_pruner("fwd_tune", "BLOCK_M"))(_attn_fwd_kernel)
    _attn_bwd_tuned = triton.autotune(configs=_bwd_configs(),
                                      key=["L_BUCKET", "HEAD_DIM", "VARLEN", "PRECISION"],
                                      prune_configs_by=_pruner("bwd_tune", "BLOCK"))(_attn_bwd_kernel)

    def _dropout_args(dropout_p, seed):
        """(seed, threshold, scale) kernel arguments: keys are kept when the top 24 bits of
        their Philox word are >= threshold, and then weigh scale = 1 / (1 - p)."""
        if not 0.0 <= dropout_p <= 1.0:
            raise ValueError(f"attention (triton): dropout_p must be in [0, 1], got {dropout_p}")
        scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
        return int(seed), dropout_threshold(dropout_p), scale

    def _strides3(t, varlen):
        """(batch, head, row) strides: padded (B, h, L, D); packed (T, h, D) has no batch."""
        if varlen:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def _last_dim_contiguous(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    def _empty_like_qkv(q, varlen):
        if varlen:
            return torch.empty(q.shape, device=q.device, dtype=q.dtype)
        B, H, L, D = q.shape  # (B, L, h, D) memory: the model's (B, L, H) layout, free reshape
        return torch.empty(B, L, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)

    def _geometry(q, seq, max_seqlen, varlen):
        if varlen:
            n_seq, heads, dim = seq.numel() - 1, q.shape[1], q.shape[2]
            l_pad = 0
        else:
            n_seq, heads, l_pad, dim = q.shape
        return n_seq, heads, dim, l_pad

    @triton_op("smarter_fast_triton::attention_fwd", mutates_args=())
    def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor,
                          max_seqlen: int, varlen: bool, dropout_p: float = 0.0,
                          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        n_seq, heads, dim, l_pad = _geometry(q, seq, max_seqlen, varlen)
        out = _empty_like_qkv(q, varlen)
        if varlen:
            lse = torch.empty(heads, q.shape[0], device=q.device, dtype=torch.float32)
            slse_b, slse_h = 0, lse.stride(0)
        else:
            lse = torch.empty(n_seq, heads, l_pad, device=q.device, dtype=torch.float32)
            slse_b, slse_h = lse.stride(0), lse.stride(1)
        rows = max_seqlen if varlen else l_pad
        if skip_launch(q):
            return out, lse
        if q.numel() == 0 or n_seq == 0 or rows == 0:
            return out.zero_(), lse
        bucket = _bucket(rows)
        qk_scale = _LOG2E / math.sqrt(dim)
        args = (q, k, v, out, lse, seq, *_strides3(q, varlen), *_strides3(k, varlen),
                *_strides3(v, varlen), *_strides3(out, varlen), slse_b, slse_h,
                heads, l_pad, qk_scale, bucket, *_dropout_args(dropout_p, seed))
        meta = dict(VARLEN=bool(varlen), HEAD_DIM=dim, PRECISION=_dot_precision(q.dtype),
                    DOT_F32=triton_interpret(), DROPOUT=dropout_p > 0.0)
        if triton_interpret():
            bm, bn = INTERPRET_CONFIG["BLOCK_M"], INTERPRET_CONFIG["BLOCK_N"]
            wrap_triton((_attn_fwd_kernel))[(triton.cdiv(rows, bm), n_seq * heads)](
                *args, **meta, BLOCK_M=bm, BLOCK_N=bn)
        elif autotune_enabled():
            grid = lambda META: (triton.cdiv(rows, META["BLOCK_M"]), n_seq * heads)  # noqa: E731
            wrap_triton(_attn_fwd_tuned)[grid](*args, **meta,
                                               BLOCK_N=_block_n(bucket, dim, q.dtype))
        else:  # the fixed config of this precision class and head dim
            bm, warps = _fixed("fwd", q.dtype, dim, bucket)
            wrap_triton(_attn_fwd_kernel)[(triton.cdiv(rows, bm), n_seq * heads)](
                *args, **meta, BLOCK_M=bm, BLOCK_N=_block_n(bucket, dim, q.dtype),
                num_warps=warps, num_stages=2)
        return out, lse

    @triton_op("smarter_fast_triton::attention_bwd", mutates_args=())
    def _attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          seq: torch.Tensor, max_seqlen: int, varlen: bool,
                          dropout_p: float = 0.0,
                          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        out, do = _last_dim_contiguous(out), _last_dim_contiguous(grad_out)
        n_seq, heads, dim, l_pad = _geometry(q, seq, max_seqlen, varlen)
        dq, dk, dv = (_empty_like_qkv(q, varlen) for _ in range(3))
        rows = max_seqlen if varlen else l_pad
        if skip_launch(q):
            return dq, dk, dv
        if q.numel() == 0 or n_seq == 0 or rows == 0:
            return dq.zero_(), dk.zero_(), dv.zero_()
        if varlen:
            slse_b, slse_h = 0, lse.stride(0)
        else:
            slse_b, slse_h = lse.stride(0), lse.stride(1)
        bucket = _bucket(rows)
        sm_scale = 1.0 / math.sqrt(dim)
        args = (q, k, v, out, do, lse, dq, dk, dv, seq,
                *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen),
                *_strides3(out, varlen), *_strides3(do, varlen), *_strides3(dq, varlen),
                *_strides3(dk, varlen), *_strides3(dv, varlen), slse_b, slse_h,
                heads, l_pad, sm_scale, sm_scale * _LOG2E, bucket,
                *_dropout_args(dropout_p, seed))
        meta = dict(VARLEN=bool(varlen), HEAD_DIM=dim, PRECISION=_dot_precision(q.dtype),
                    DOT_F32=triton_interpret(), DROPOUT=dropout_p > 0.0)
        if triton_interpret():
            blk = INTERPRET_CONFIG["BLOCK"]
            wrap_triton((_attn_bwd_kernel))[(triton.cdiv(rows, blk), n_seq * heads)](
                *args, **meta, BLOCK=blk)
        elif autotune_enabled():
            grid = lambda META: (triton.cdiv(rows, META["BLOCK"]), n_seq * heads)  # noqa: E731
            wrap_triton(_attn_bwd_tuned)[grid](*args, **meta)
        else:  # the fixed config of this precision class and head dim
            blk, warps = _fixed("bwd", q.dtype, dim, bucket)
            wrap_triton(_attn_bwd_kernel)[(triton.cdiv(rows, blk), n_seq * heads)](
                *args, **meta, BLOCK=blk, num_warps=warps, num_stages=1)
        return dq, dk, dv

    def _setup_context(ctx, inputs, output):
        inputs = tuple(inputs)
        q, k, v, seq, max_seqlen, varlen, dropout_p, seed = inputs + (0.0, 0)[len(inputs) - 6:]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, seq)
        ctx.max_seqlen, ctx.varlen = max_seqlen, varlen
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, seq = ctx.saved_tensors
        dq, dk, dv = torch.ops.smarter_fast_triton.attention_bwd(
            grad_out, q, k, v, out, lse, seq, ctx.max_seqlen, ctx.varlen, ctx.dropout_p,
            ctx.seed)
        return dq, dk, dv, None, None, None, None, None

    _attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- lengths from the mask, once per mask -------------------------------------------------

_lengths_cache: dict = {}


def lengths_from_mask(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """(B,) int32 lengths of right-padded sequences. Cached per mask tensor (and version), so
    the layers of one forward pass compute it once."""
    compiling = hasattr(torch, "compiler") and torch.compiler.is_compiling()
    if attention_mask is None:
        key = ("full", batch, length, str(device))
        hit = None if compiling else _lengths_cache.get(key)
        if hit is None:
            hit = torch.full((batch,), length, dtype=torch.int32, device=device)
            if not compiling:
                if len(_lengths_cache) > 64:
                    _lengths_cache.clear()
                _lengths_cache[key] = hit
        return hit
    if not compiling:
        hit = _lengths_cache.get("mask")
        if hit is not None:
            ref, version, lens = hit
            if ref() is attention_mask and attention_mask._version == version:
                return lens
    lens = attention_mask.ne(0).sum(dim=1, dtype=torch.int32)
    if attention_mask.device.type == "cpu":  # free of a device sync here; on CUDA: documented
        right = torch.arange(length, device=attention_mask.device)[None, :] < lens[:, None]
        if not torch.equal(right, attention_mask.ne(0)):
            raise ValueError("attention (triton): attention_mask must be right padding (real "
                             "tokens first, then padding); use backend='ref' otherwise")
    if not compiling:
        _lengths_cache["mask"] = (weakref.ref(attention_mask), attention_mask._version, lens)
    return lens


# ---- entry points the registry calls ------------------------------------------------------

def _dropout(dropout_p):
    """Extra op arguments: none without dropout, else (p, a seed from torch's generator)."""
    return (float(dropout_p), draw_dropout_seed()) if dropout_p > 0.0 else ()


def attention(q, k, v, attention_mask=None, dropout_p=0.0):
    """q, k, v: (B, heads, L, D); attention_mask (B, L), right padding, nonzero = real."""
    B, _, L, _ = q.shape
    lens = lengths_from_mask(attention_mask, B, L, q.device)
    out, _ = torch.ops.smarter_fast_triton.attention_fwd(q, k, v, lens, L, False,
                                                         *_dropout(dropout_p))
    return out


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    """q, k, v: (T, heads, D) packed; cu_seqlens (B + 1,) offsets; max_seqlen the longest."""
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    out, _ = torch.ops.smarter_fast_triton.attention_fwd(q, k, v, cu, int(max_seqlen), True,
                                                         *_dropout(dropout_p))
    return out
