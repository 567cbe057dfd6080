"""Source variants of the rendered kernels of commit 0ca5479, timed against them (the eighth
session's first call, docs/benchmarks/h200-source-variants-s8.txt). Run at that commit:
``PYTHONPATH=. python docs/benchmarks/s8/source_variants.py OUTDIR`` on one GPU, with
FWD_KINDS / BWD_KINDS (variant names joined by '+', an optional '@BQxBKVxWARPSxSTAGES'
forward config), CASES / BWD_CASES (spec:D); WARM=1 only compiles, QUICK=1 runs tiny shapes
under TRITON_INTERPRET=1. Each variant rewrites the rendered source by string replacement
before it is loaded, so it applies only to that commit's kernels; the kept variants are now
in the templates."""
import hashlib, json, os, re, sys
import torch, triton
import attngen, attngen.compiler as C
from attngen.render import RenderedModule
from attngen.tiles import LaunchConfig
from attngen.tune import shape_bucket
from attngen import bench as AB
from attngen.timing import bench

VARIANT = {"v": "base"}
orig_load = C.load_module


def split_fn(src, name, nxt):
    head, sep, tail = src.partition(f"def {name}(")
    assert sep, name
    if nxt:
        body, sep2, rest = tail.partition(f"def {nxt}(")
        assert sep2, nxt
        return head + sep, body, sep2 + rest
    return head + sep, tail, ""


def full_part(body):
    a, sep, b = body.partition("for i in range(0, n_full):")
    assert sep
    return a + sep, b


def fma_fwd(body):
    # FULL loop
    a, b = full_part(body)
    old = ("        t = qk * qk_scale_log2\n\n        m_new = tl.maximum(m_i, tl.max(t, 1))\n        m_safe = m_new\n"
           "        alpha = tl.exp2(m_i - m_safe)\n        p = tl.exp2(t - m_safe[:, None])\n")
    new = ("\n        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale_log2)\n        m_safe = m_new\n"
           "        alpha = tl.exp2(m_i - m_safe)\n        p = tl.exp2(qk * qk_scale_log2 - m_safe[:, None])\n")
    if old not in b:  # a score modification: t is not qk * scale
        return body
    b = b.replace(old, new, 1)
    # masked loop (mask-only specs)
    old2 = "        t = qk * qk_scale_log2\n        t = tl.where(mask_qk, t, float(\"-inf\"))\n"
    if old2 in a:
        a = a.replace(old2, "        t = tl.where(mask_qk, qk, float(\"-inf\"))\n", 1)
        a = a.replace("        m_new = tl.maximum(m_i, tl.max(t, 1))\n", "        m_new = tl.maximum(m_i, tl.max(t, 1) * qk_scale_log2)\n", 1)
        a = a.replace("        p = tl.exp2(t - m_safe[:, None])\n", "        p = tl.exp2(t * qk_scale_log2 - m_safe[:, None])\n", 1)
    return a + b


def nomask_full(body, loads):
    a, b = full_part(body)
    for m in loads:
        assert m in b, m
        b = b.replace(m, ")", 1)
    return a + b


FWD_LOADS = [",\n                    mask=kv_valid[:, None] & (offs_dqk[None, :] < D_QK), other=0.0)",
             ",\n                    mask=kv_valid[:, None] & (offs_dv[None, :] < D_V), other=0.0)"]
DKDV_LOADS = [",\n                         mask=q_valid[None, :] & (offs_dqk[:, None] < D_QK), other=0.0)",
              ",\n                         mask=q_valid[:, None] & (offs_dv[None, :] < D_V), other=0.0)"]

KLOAD = re.compile(r"k = tl\.load\(k_base \+ offs_kv\[:, None\]\.to\(tl\.int64\) \* stride_kt \+ offs_dqk\[None, :\] \* stride_kd,\n\s+mask=[^\n]*\)")
VLOAD = re.compile(r"v = tl\.load\(v_base \+ offs_kv\[:, None\]\.to\(tl\.int64\) \* stride_vt \+ offs_dv\[None, :\] \* stride_vd,\n\s+mask=[^\n]*\)")
DESCS = ("    k_desc = tl.make_tensor_descriptor(k_base, shape=[T_KV, D_QK], strides=[stride_kt, 1], block_shape=[BLOCK_KV, BLOCK_DQK])\n"
         "    v_desc = tl.make_tensor_descriptor(v_base, shape=[T_KV, D_V], strides=[stride_vt, 1], block_shape=[BLOCK_KV, BLOCK_DV])\n")


def tma_kv(body):
    anchor = "    v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh\n"
    assert anchor in body
    body = body.replace(anchor, anchor + DESCS, 1)
    body, n1 = KLOAD.subn("k = k_desc.load([tile * BLOCK_KV, 0])", body)
    body, n2 = VLOAD.subn("v = v_desc.load([tile * BLOCK_KV, 0])", body)
    assert n1 >= 1 and n2 >= 1, (n1, n2)
    return body


def patch(src, kind):
    parts = set(kind.split("+")) - {"base"}
    pre, fwd, rest = split_fn(src, "attn_fwd", "attn_bwd_preprocess")
    if "fma" in parts:
        fwd = fma_fwd(fwd)
    if "nomask" in parts:
        fwd = nomask_full(fwd, FWD_LOADS)
    if "tma" in parts:
        fwd = tma_kv(fwd)
    src = pre + fwd + rest
    if "bnomask" in parts or "btma" in parts:
        pre, dkdv, rest = split_fn(src, "attn_bwd_dkdv", "attn_bwd_dq")
        if "bnomask" in parts:
            dkdv = nomask_full(dkdv, DKDV_LOADS)
        src = pre + dkdv + rest
        pre, dq, rest = split_fn(src, "attn_bwd_dq", None)
        if "bnomask" in parts:
            dq = nomask_full(dq, FWD_LOADS)
        if "btma" in parts:
            dq = tma_kv(dq)
        src = pre + dq + rest
    return src


def load(name, rendered):
    src = patch(rendered.source, VARIANT["v"].split("@")[0])
    if VARIANT["v"] != "base":
        assert src != rendered.source
    r = RenderedModule(src, hashlib.sha256(src.encode()).hexdigest())
    return orig_load(name + "_" + VARIANT["v"].split("@")[0].replace("+", "_"), r)


C.load_module = load

def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    quick = os.environ.get("QUICK") == "1" or os.environ.get("WARM") == "1"
    dev = "cuda" if os.environ.get("WARM") == "1" or not quick else "cpu"
    big = dev == "cuda"
    if big:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    dt = torch.bfloat16 if big else torch.float32
    B, H = 1, (16 if big else 2)
    T = 16384 if big else 200
    FWD_KINDS = os.environ.get("FWD_KINDS", "base,fma,nomask,fma+nomask,tma,fma+tma").split(",")
    BWD_KINDS = os.environ.get("BWD_KINDS", "base,fma+nomask+bnomask,fma+tma+bnomask+btma").split(",")
    CASES = os.environ.get("CASES", "dense:128,causal:128,document:128,causal:64,dense:64").split(",")
    BWD_CASES = os.environ.get("BWD_CASES", "dense:128,causal:128,document:128").split(",")
    rows = []
    for case in CASES:
        spec, D = case.split(":")
        D = int(D)
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, device=dev, dtype=dt, generator=g) for _ in range(4))
        ins = AB._doc_inputs(B, H, T, dev) if spec == "document" else {}
        cparams = {}
        if spec == "sliding_window":
            ins, cparams = {}, {"window": 1024}
            pairs = float(sum(min(i + 1, 1024) for i in range(T)))
        elif spec == "prefix_lm":
            ins, cparams = {}, {"prefix": T // 4}
            pairs = float(sum(max(i + 1, T // 4) for i in range(T)))
        elif spec == "alibi":
            ins = {"slopes": AB.alibi_slopes(H).to(dev)}
            pairs = T * (T + 1) / 2
        elif spec == "document":
            lens = torch.bincount(ins["doc"][0].long()).double()
            pairs = float((lens * (lens + 1) / 2).sum())
        elif spec == "causal":
            pairs = T * (T + 1) / 2
        else:
            pairs = float(T * T)
        fl = 4 * D * pairs * B * H
        ref = refg = None
        for kind in sorted(set(FWD_KINDS) | (set(BWD_KINDS) if case in BWD_CASES else set()), key=lambda s: (s != "base", s)):
            VARIANT["v"] = kind
            try:
                op = attngen.compile(spec, **cparams)
                if "@" in kind:
                    dims = {"B": B, "H": H, "H_KV": H, "T_Q": T, "T_KV": T, "D_QK": D, "D_V": D}
                    op.set_config("fwd", shape_bucket(dims, dt), LaunchConfig(*map(int, kind.split("@")[1].split("x"))))
                o = op(q, k, v, **ins)
                if ref is None:
                    ref = o.float()
                err = float((o.float() - ref).abs().max())
                ms = None if quick else bench(lambda: op(q, k, v, **ins))
                rows.append(dict(spec=spec, D=D, kind=kind, what="fwd", ms=ms, tf=ms and fl / ms / 1e9, err=err))
                print(f"{spec:9} D={D} {kind:24} fwd     {ms or 0:.4f} ms {(ms and fl / ms / 1e9) or 0:6.1f} TF/s err {err:.1e}", flush=True)
                if case in BWD_CASES and kind in BWD_KINDS:
                    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                    def fb():
                        op(*leaves, **ins).backward(do)
                    fb()
                    gs = torch.cat([x.grad.float().flatten() for x in leaves])
                    if refg is None:
                        refg = gs
                    gerr = float((gs - refg).abs().max())
                    ms2 = None if quick else bench(fb, grads=leaves)
                    rows.append(dict(spec=spec, D=D, kind=kind, what="fwd+bwd", ms=ms2, tf=ms2 and 3.5 * fl / ms2 / 1e9, err=gerr))
                    print(f"{spec:9} D={D} {kind:24} fwd+bwd {ms2 or 0:.4f} ms {(ms2 and 3.5 * fl / ms2 / 1e9) or 0:6.1f} TF/s err {gerr:.1e}", flush=True)
            except Exception as e:
                print(spec, D, kind, "FAILED", type(e).__name__, str(e)[:300], flush=True)
        json.dump(rows, open(os.path.join(out, "fwdexp.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
