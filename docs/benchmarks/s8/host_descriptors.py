"""Host-side tensor descriptors as source variants of commit 0ca5479's kernels (the eighth
session's second call, docs/benchmarks/h200-source-variants-s8.txt): h4 = [B, H, T, D]
descriptors with a [1, 1, BLOCK, D] block, h2 = the flattened [B*H*T, D] rows, for K/V in the
forward (and with b4/b2, in dQ, and Q/dO in dK/dV); fma as in source_variants.py. The
descriptors are built per launch by wrapping AttentionOp.kernel. Same environment and
command line as source_variants.py."""
import os, re, sys
sys.path.insert(0, os.path.dirname(__file__))
import source_variants as FX
from source_variants import split_fn, fma_fwd, KLOAD, VLOAD
from attngen.op import AttentionOp
from triton.tools.tensor_descriptor import TensorDescriptor

SIG_END = "    GUARD_UNSEEN: tl.constexpr,\n):"
SIG_NEW = "    GUARD_UNSEEN: tl.constexpr,\n    DESC_A=None, DESC_B=None,\n):"


def desc_kv(body, rank):
    body = body.replace("\n):", "\n    DESC_A=None, DESC_B=None,\n):", 1)
    if rank == 4:
        kl, vl = ("k = DESC_A.load([off_b, off_hkv, tile * BLOCK_KV, 0]).reshape(BLOCK_KV, BLOCK_DQK)",
                  "v = DESC_B.load([off_b, off_hkv, tile * BLOCK_KV, 0]).reshape(BLOCK_KV, BLOCK_DV)")
    else:
        kl, vl = ("k = DESC_A.load([(off_b * (H // GROUP) + off_hkv) * T_KV + tile * BLOCK_KV, 0])",
                  "v = DESC_B.load([(off_b * (H // GROUP) + off_hkv) * T_KV + tile * BLOCK_KV, 0])")
    body, n1 = KLOAD.subn(kl, body)
    body, n2 = VLOAD.subn(vl, body)
    assert n1 and n2
    return body


QTLOAD = re.compile(r"qT = tl\.load\(q_base \+ offs_q\[None, :\]\.to\(tl\.int64\) \* stride_qt \+ offs_dqk\[:, None\] \* stride_qd,\n\s+mask=[^\n]*\)")
DOLOAD = re.compile(r"do = tl\.load\(do_base \+ offs_q\[:, None\]\.to\(tl\.int64\) \* stride_dot \+ offs_dv\[None, :\] \* stride_dod,\n\s+mask=[^\n]*\)")


def desc_qdo(body, rank):
    body = body.replace("\n):", "\n    DESC_A=None, DESC_B=None,\n):", 1)
    if rank == 4:
        ql, dl = ("qT = tl.trans(DESC_A.load([off_b, off_h, tile * BLOCK_Q, 0]).reshape(BLOCK_Q, BLOCK_DQK))",
                  "do = DESC_B.load([off_b, off_h, tile * BLOCK_Q, 0]).reshape(BLOCK_Q, BLOCK_DV)")
    else:
        ql, dl = ("qT = tl.trans(DESC_A.load([(off_b * H + off_h) * T_Q + tile * BLOCK_Q, 0]))",
                  "do = DESC_B.load([(off_b * H + off_h) * T_Q + tile * BLOCK_Q, 0])")
    body, n1 = QTLOAD.subn(ql, body)
    body, n2 = DOLOAD.subn(dl, body)
    assert n1 and n2, (n1, n2)
    return body


def patch(src, kind):
    parts = set(kind.split("+")) - {"base"}
    pre, fwd, rest = split_fn(src, "attn_fwd", "attn_bwd_preprocess")
    if "fma" in parts:
        fwd = fma_fwd(fwd)
    for r in (2, 4):
        if f"h{r}" in parts:
            fwd = desc_kv(fwd, r)
    src = pre + fwd + rest
    for r in (2, 4):
        if f"b{r}" in parts:
            pre, dkdv, rest = split_fn(src, "attn_bwd_dkdv", "attn_bwd_dq")
            src = pre + desc_qdo(dkdv, r) + rest
            pre, dq, rest = split_fn(src, "attn_bwd_dq", None)
            src = pre + desc_kv(dq, r) + rest
    return src


FX.patch = patch


def descs(name, args, kw):
    kind = FX.VARIANT["v"].split("@")[0]
    parts = set(kind.split("+"))
    if name == "attn_fwd" or name == "attn_bwd_dq":
        r = 4 if ("h4" in parts if name == "attn_fwd" else "b4" in parts) else 2 if ("h2" in parts if name == "attn_fwd" else "b2" in parts) else 0
        a, b = args[1], args[2]
        ba, bb = (kw["BLOCK_KV"], kw["BLOCK_DQK"]), (kw["BLOCK_KV"], kw["BLOCK_DV"])
    elif name == "attn_bwd_dkdv":
        r = 4 if "b4" in parts else 2 if "b2" in parts else 0
        a, b = args[0], args[3]
        ba, bb = (kw["BLOCK_Q"], kw["BLOCK_DQK"]), (kw["BLOCK_Q"], kw["BLOCK_DV"])
    else:
        return kw
    if r == 4:
        kw = dict(kw, DESC_A=TensorDescriptor(a, list(a.shape), list(a.stride()), [1, 1, *ba]),
                  DESC_B=TensorDescriptor(b, list(b.shape), list(b.stride()), [1, 1, *bb]))
    elif r == 2:
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        assert a2.data_ptr() == a.data_ptr() and b2.data_ptr() == b.data_ptr()
        kw = dict(kw, DESC_A=TensorDescriptor(a2, list(a2.shape), list(a2.stride()), list(ba)),
                  DESC_B=TensorDescriptor(b2, list(b2.shape), list(b2.stride()), list(bb)))
    return kw


orig_kernel = AttentionOp.kernel


class Wrap:
    def __init__(self, fn, name):
        self.fn, self.name = fn, name

    def __getitem__(self, grid):
        launch = self.fn[grid]
        return lambda *a, **kw: launch(*a, **descs(self.name, a, kw))


def kernel(self, name, device):
    return Wrap(orig_kernel(self, name, device), name)


AttentionOp.kernel = kernel

if __name__ == "__main__":
    FX.main()
