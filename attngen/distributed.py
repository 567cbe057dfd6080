"""Context parallelism: ring attention over ``torch.distributed`` for any softmax spec.

The sequence is sharded over the ranks of a process group; each rank keeps its queries and
passes its keys and values around the ring, one hop per step, while it computes attention of
its queries against the block it holds. Partial results merge exactly by their log-sum-exp
(:func:`attngen.merge_states`). The backward pass walks the ring again, carrying each block's
dK/dV accumulators with it, and recomputes each block's probabilities from the final
log-sum-exp (as the FlashAttention-2 backward does within one GPU).

Method: ring attention (Liu, Zaharia and Abbeel, 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context"), with the zigzag sharding that balances causal masks
(each rank holds chunk ``r`` and chunk ``2W - 1 - r`` of ``2W`` equal chunks; as in Llama 3's
context parallelism and ring-flash-attention).

Positions stay global: every kernel call is told where its queries and keys sit in the whole
sequence (:class:`attngen.op.Shard`), so masks and score modifications see true token
positions, and runtime inputs indexed by position (document ids) are passed whole, the same
tensor on every rank. A (query chunk, key chunk) block whose every pair the mask removes is
skipped without a kernel launch, decided in closed form from the mask (the same tile
classification the kernels use), so a causal rank skips the ring steps that lie in its future.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .errors import ShapeError, UnsupportedError
from .merge import merge_states
from .op import AttentionOp, Shard

LAYOUTS = ("zigzag", "contiguous")


def chunks(t: int, world_size: int, rank: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """The ``(start, length)`` runs of global positions a rank holds, in local order.

    Args:
        t: the global sequence length.
        world_size: ranks in the group.
        rank: this rank's index in the group.
        layout: ``zigzag`` (chunks ``rank`` and ``2W - 1 - rank`` of ``2W`` equal chunks:
            every rank gets the same share of a causal mask's work) or ``contiguous``
            (chunk ``rank`` of ``W``).

    Raises:
        ShapeError: ``t`` not divisible into the layout's equal chunks.
        ValueError: an unknown layout or a rank outside the group.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    pieces = 2 * world_size if layout == "zigzag" else world_size
    if t % pieces:
        raise ShapeError(f"sequence length {t}: the {layout} layout over {world_size} ranks needs a multiple of {pieces}; pad the sequence")
    n = t // pieces
    if layout == "contiguous":
        return [(rank * n, n)]
    return [(rank * n, n), ((pieces - 1 - rank) * n, n)]


def shard_sequence(x: torch.Tensor, world_size: int, rank: int, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of a whole-sequence tensor (``dim`` is the sequence axis; for
    ``[B, H, T, D]`` attention tensors, 2): its :func:`chunks` concatenated, contiguous."""
    parts = [x.narrow(dim, start, n) for start, n in chunks(x.shape[dim], world_size, rank, layout)]
    return torch.cat(parts, dim).contiguous()


def gather_sequence(local: torch.Tensor, group: Any = None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The whole-sequence tensor from every rank's shard (``all_gather``, then reordered by
    :func:`chunks`); the inverse of :func:`shard_sequence`. Not differentiable."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    t = local.shape[dim] * world
    out = local.new_empty(local.shape[:dim] + (t,) + local.shape[dim + 1:])
    for r, shard in enumerate(gathered):
        offset = 0
        for start, n in chunks(t, world, r, layout):
            out.narrow(dim, start, n).copy_(shard.narrow(dim, offset, n))
            offset += n
    return out


_KEY_RANGES: dict[str, Any] = {}


def _key_ranges(op: AttentionOp):
    """The closed-form key-tile classification of an op's spec (``tiles_k``), cached."""
    from .lower import lower
    from .passes import run_pipeline

    digest = op.plan.spec_digest
    if digest not in _KEY_RANGES:
        _KEY_RANGES[digest] = run_pipeline(lower(op.spec)).graph["tiles_k"]
    return _KEY_RANGES[digest]


def block_visible(op: AttentionOp, q_start: int, q_len: int, k_start: int, k_len: int) -> bool:
    """Whether the mask keeps any pair of queries ``[q_start, q_start + q_len)`` and keys
    ``[k_start, k_start + k_len)`` (global positions), decided in closed form. Masks that read
    runtime inputs, the batch or the head are visible unless their position bounds alone
    rule the block out (conservative: the kernel's own tile skipping does the rest)."""
    if op.spec.mask is None:
        return True
    from .classify import evaluate_intervals

    ranges = _key_ranges(op)
    for conj in ranges.conjuncts:
        names = conj.bound_symbols
        if names & {"b", "h"} or any(n.startswith("ld") for n in names):
            return True
    env = {
        "g_first": torch.tensor([q_start]),
        "g_last": torch.tensor([q_start + q_len - 1]),
        "given_full": torch.tensor([True]),
        "var_min": k_start,
        "var_max": k_start + k_len - 1,
        "T_Q": q_len,
        "T_KV": k_len,
        "b": 0,
        "h": 0,
    }
    intervals = evaluate_intervals(ranges, env, n_var=k_len, block_var=k_len, var_off=k_start)
    return any(int((e - s).sum()) > 0 for s, fs, fe, e in intervals)


def _check(op: AttentionOp, q, k, v, inputs: dict, layout: str, group) -> tuple[int, int, int, list[torch.Tensor]]:
    """Validate a context-parallel call; return world size, rank, global length and the
    runtime inputs in the spec's order."""
    import torch.distributed as dist

    from .args import check_call

    if not dist.is_available() or not dist.is_initialized():
        raise UnsupportedError("context_parallel: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (nccl on GPUs, gloo on the CPU)")
    if op.spec.normalizer == "linear":
        raise UnsupportedError(f"context_parallel: spec {op.spec.name!r} is linear attention, which carries a state "
                               "along the sequence instead of merging blocks by log-sum-exp; this is not built")
    if op.plan.sigmoid:
        raise UnsupportedError(f"context_parallel: spec {op.spec.name!r} uses the sigmoid normalizer, which has no "
                               "log-sum-exp to merge ring steps by; use a softmax spec")
    if op.plan.perm is not None:
        raise UnsupportedError(f"context_parallel: spec {op.spec.name!r} has a strided part run in residue order, "
                               "which needs the whole key sequence on one device")
    code = " ".join(filter(None, (op.plan.mask_code, op.plan.score_code)))
    if re.search(r"\bT_(Q|KV)\b", code):
        raise UnsupportedError(f"context_parallel: spec {op.spec.name!r} reads T_Q or T_KV, which would mean a "
                               "shard's length inside a ring step; write the length as a param instead")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if q.shape[2] != k.shape[2]:
        raise ShapeError(f"context_parallel: q has {q.shape[2]} local positions and k has {k.shape[2]}; "
                         "shard queries, keys and values of one sequence the same way (self-attention)")
    t = q.shape[2] * world
    chunks(t, world, rank, layout)  # validates the layout and divisibility
    whole = {"q": q.new_empty(1).as_strided(q.shape[:2] + (t, q.shape[3]), (0, 0, 0, 0)),
             "k": k.new_empty(1).as_strided(k.shape[:2] + (t, k.shape[3]), (0, 0, 0, 0)),
             "v": v.new_empty(1).as_strided(v.shape[:2] + (t, v.shape[3]), (0, 0, 0, 0))}
    _, ordered = check_call(op.spec, whole["q"], whole["k"], whole["v"], inputs, grad_inputs=None,
                            constant_reads=op._constant_reads)  # runtime inputs span the whole sequence
    wanting = [name for name, x in inputs.items() if isinstance(x, torch.Tensor) and x.requires_grad]
    if wanting:
        raise UnsupportedError(f"context_parallel: {wanting[0]} requires grad; learnable score parameters are not "
                               f"supported across ranks; pass {wanting[0]}.detach()")
    # every rank must hold a shard of the same length, else the ring's transfers mismatch
    lengths = [torch.zeros(1, dtype=torch.int64, device=q.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([q.shape[2]], dtype=torch.int64, device=q.device), group=group)
    if len({int(x) for x in lengths}) > 1:
        raise ShapeError(f"context_parallel: the ranks hold shards of {[int(x) for x in lengths]} positions; every rank "
                         "needs an equal shard of one sequence (shard_sequence makes them)")
    return world, rank, t, ordered


class _Ring:
    """One ring pass: send to the next rank, receive from the previous, non-blocking.

    Each pass is posted as one batch (``batch_isend_irecv``): under NCCL its sends and
    receives form one group that progresses as a whole, on the process group's communicator.
    Posted one by one (``isend``, then ``irecv``), each is its own NCCL operation, queued
    after the previous one on the stream of a separate two-rank communicator that NCCL sets
    up at the first transfer; with two ranks (next is prev) both ranks then send before
    either receives, and an NCCL send may wait for its peer's receive. NCCL matches
    transfers by the order they are posted, not by tag (gloo by tag); every rank posts the
    same passes in the same order, so both agree."""

    def __init__(self, group) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        self.next, self.prev = to_global((rank + 1) % world), to_global((rank - 1) % world)

    def start(self, tensors: list[torch.Tensor], tag: int = 0) -> tuple[list, list[torch.Tensor]]:
        """Post the sends of ``tensors`` and the receives of their successors, with tags from
        ``tag`` on (transfers in flight at once need distinct tags under gloo); returns the
        pending requests and the receive buffers (valid after :meth:`wait`)."""
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = []
        for i, (out, into) in enumerate(zip(sent, received)):
            ops.append(self.dist.P2POp(self.dist.isend, out, self.next, self.group, tag + i))
            ops.append(self.dist.P2POp(self.dist.irecv, into, self.prev, self.group, tag + i))
        # the send buffers stay referenced until the transfer completes
        return [sent, *self.dist.batch_isend_irecv(ops)], received

    @staticmethod
    def wait(requests: list) -> None:
        for req in requests[1:]:
            req.wait()


_BLOCKS: dict[tuple, list] = {}


def _blocks(op, t, world, rank, owner, layout):
    """The visible (local query slice, Shard, key slice) blocks of a ring step; decided once
    per spec, length, rank and step (the forward and backward ask for the same blocks)."""
    key = (op.plan.spec_digest, t, world, rank, owner, layout)
    if key not in _BLOCKS:
        _BLOCKS[key] = _visible_blocks(op, t, world, rank, owner, layout)
    return _BLOCKS[key]


def _visible_blocks(op, t, world, rank, owner, layout):
    out = []
    q_off = 0
    for q_start, q_len in chunks(t, world, rank, layout):
        k_off = 0
        for k_start, k_len in chunks(t, world, owner, layout):
            if block_visible(op, q_start, q_len, k_start, k_len):
                out.append((slice(q_off, q_off + q_len), Shard(q_start, k_start, t), slice(k_off, k_off + k_len)))
            k_off += k_len
        q_off += q_len
    return out


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, op, group, layout, t, world, rank, *inputs):
        ring = _Ring(group)
        inputs = list(inputs)
        B, H, T_local, _ = q.shape
        o = torch.zeros(B, H, T_local, v.shape[3], dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, T_local), float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k, v]
        for step in range(world):
            owner = (rank - step) % world
            pending, incoming = ring.start(kv) if step < world - 1 else ([], None)  # overlap: next block in flight
            for qs, shard, ks in _blocks(op, t, world, rank, owner, layout):
                o_part, lse_part = op.forward_impl(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], inputs, shard)
                o[:, :, qs], lse[:, :, qs] = merge_states(o[:, :, qs], lse[:, :, qs], o_part.float(), lse_part)
            ring.wait(pending)
            kv = incoming
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *inputs)
        ctx.meta = (op, group, layout, t, world, rank)
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *inputs = ctx.saved_tensors
        op, group, layout, t, world, rank = ctx.meta
        ring = _Ring(group)
        do = do.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device), torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        kv, pending_grad, incoming_grad = [k, v], [], None
        for step in range(world):
            owner = (rank - step) % world
            pending_kv, incoming_kv = ring.start(kv) if step < world - 1 else ([], None)
            parts = []
            for qs, shard, ks in _blocks(op, t, world, rank, owner, layout):
                dl = dlse[:, :, qs].contiguous() if dlse is not None else None
                dq_p, dk_p, dv_p, _ = op.backward_impl(do[:, :, qs], dl, q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                                                       o[:, :, qs], lse[:, :, qs].contiguous(), inputs, shard=shard)
                dq[:, :, qs] += dq_p.float()
                parts.append((ks, dk_p, dv_p))
            if pending_grad:  # the accumulators of this step's block, sent by the previous rank
                ring.wait(pending_grad)
                dkv = incoming_grad
            for ks, dk_p, dv_p in parts:
                dkv[0][:, :, ks] += dk_p.float()
                dkv[1][:, :, ks] += dv_p.float()
            # the accumulators travel with their block; after the last step one more hop
            # brings each home to its owner (a single rank holds its own all along)
            if world > 1:
                pending_grad, incoming_grad = ring.start(dkv, tag=2)
            ring.wait(pending_kv)
            kv = incoming_kv
        if world > 1:
            ring.wait(pending_grad)
            dkv = incoming_grad
        dk, dv = dkv
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * (6 + len(inputs))


def context_parallel(op: AttentionOp, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                     layout: str = "zigzag", return_lse: bool = False,
                     **inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a sequence sharded over the ranks of a process group (ring attention).

    Every rank calls this collectively with its shard of the same sequence (see
    :func:`shard_sequence`); the result is this rank's shard of the whole-sequence attention,
    equal (to rounding) to ``op`` on one device, and differentiable in ``q``, ``k``, ``v``.

    Args:
        op: a compiled softmax spec (``attngen.compile``).
        q: ``[B, H, T_local, D_QK]``, this rank's query positions in the layout's order
            (``T_local = T / W``); float16, bfloat16 or float32.
        k: ``[B, H_KV, T_local, D_QK]``, the keys at the same positions.
        v: ``[B, H_KV, T_local, D_V]``.
        group: the process group (default: the whole world). NCCL with CUDA tensors, gloo
            with CPU tensors (under Triton's interpreter).
        layout: ``zigzag`` (default; balances causal masks) or ``contiguous``.
        return_lse: also return the log-sum-exp ``[B, H, T_local]`` (float32, natural log).
        **inputs: the spec's runtime inputs for the **whole** sequence (e.g. ``doc [B, T]``),
            the same tensor on every rank; they are read at global positions.

    Returns:
        ``o [B, H, T_local, D_V]`` in q's dtype, and with ``return_lse`` also the lse.

    Raises:
        UnsupportedError: torch.distributed not initialised; a sigmoid spec (no log-sum-exp
            to merge by); a strided spec with a residue-order part; a spec that reads
            ``T_Q``/``T_KV``; runtime inputs that require grad.
        ShapeError: q and k shards of different lengths, a length the layout cannot split
            evenly, or the :func:`attngen.compile` call checks on the whole-sequence shapes.
    """
    world, rank, t, ordered = _check(op, q, k, v, inputs, layout, group)
    o, lse = _RingAttention.apply(q, k, v, op, group, layout, t, world, rank, *ordered)
    return (o, lse) if return_lse else o
