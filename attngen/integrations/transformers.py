"""Hugging Face transformers models on attngen kernels: ``attn_implementation="attngen"``.

Importing this module registers the name ``"attngen"`` with transformers' attention interface
(the attention function) and its mask interface (the masks the model builds for it), so that

>>> import attngen.integrations.transformers                       # doctest: +SKIP
>>> model = AutoModel.from_pretrained(path, attn_implementation="attngen")  # doctest: +SKIP

runs every attention layer through an attngen operator. The registration is the purpose of
the import; nothing else runs (kernels are compiled on a layer's first call).

Each call derives, from the attention module and the keyword arguments the model passes, what
the layer computes (:class:`LayerAttention`), turns that into a spec, compiles it once per
distinct layer kind, and runs it with the key/value heads as they come (grouped-query
attention is not expanded). What maps to what:

| model family / call | spec |
|---|---|
| Llama family (`is_causal`, GQA) | `mask: k <= q`, the H_KV key/value heads as they come |
| Mistral (`config.sliding_window`) | `mask: k <= q and q - k < window` |
| Gemma-2 (`layer_types`, `attn_logit_softcapping`, `query_pre_attn_scalar`) | sliding layers as Mistral, global layers causal; both `score: cap * tanh(s / cap)`, `scale = query_pre_attn_scalar ** -0.5` |
| BERT family (`is_causal=False`) | no structural mask |
| bidirectional sliding window | `mask: q - k <= window and k - q <= window` |
| padding (any of the above) | `... and keep[b, k] != 0`, `keep` an int32 `[B, T_KV]` runtime input derived from the mask |
| `scaling` | the spec's `scale` (`None`: `1/sqrt(D_QK)`) |

Query rows sit at the bottom right of the key range (``align: bottom_right``), as in decoding
with a KV cache, except where transformers' conventions put them at the top left (a prefill
into an empty static cache: ``align: top_left``). The masks transformers hands the function
(``None`` where the layer's pattern suffices, else the boolean ``[B, 1, T_Q, T_KV]`` masks of
its mask builder; a user's 4-D boolean or additive float mask; a 2-D padding mask) are checked
against the layer's pattern: a 4-D mask must equal the pattern, in one of the two alignments,
with some keys of each batch entry removed, else the call raises. A query row that
sees no key (a padding row of a left-padded batch) returns zeros where eager attention returns
an average of all values. No later token reads that row, but a causal-LM loss can: with left
padding, the last padding position predicts the first real token, so set that label to -100
(ignored) to train exactly as with eager or SDPA attention.

What cannot be mapped raises :class:`~attngen.errors.UnsupportedError` (or
:class:`~attngen.errors.ShapeError` for a misshapen mask), never a silent fallback: attention
dropout (``dropout > 0``: call ``model.eval()`` or set the config's attention dropout to 0),
``output_attentions=True``, a 4-D mask that is not causal/window/padding (packed sequences,
prefix-LM or image-token overlays, per-head masks, a chunked prefill into a static cache),
additive masks that hold biases, flex attention's ``BlockMask``, relative-position
biases or attention sinks passed by the model, head dims above 256 and dtypes other than
float16, bfloat16 and float32.

Tested with transformers 5.17 and 5.24. Under ``torch.compile`` calls take a traced path
(:func:`_traced_forward`): padding by tensor operations, the mask checked by a device-side
assertion, and the kernels those calls use compiled by one eager forward beforehand, so
``torch.compile(model, fullgraph=True)`` traces the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from ..args import KERNEL_DTYPES, MAX_HEAD_DIM
from ..compiler import compile as compile_spec
from ..errors import ShapeError, UnsupportedError
from ..op import AttentionOp

#: The ``attn_implementation`` name this module registers.
NAME = "attngen"

#: Entries of an additive float mask at or below this value mask their key (transformers
#: writes the dtype's lowest finite value, older code -10000, some users -inf).
MASKED_AT_OR_BELOW = -1.0e4

#: Keyword arguments that some models pass and that change the attention's result, with
#: what they are; a call that passes one of them (not None) raises.
UNMAPPED_KWARGS = {
    "position_bias": "a relative-position bias added to the scores (T5 family)",
    "s_aux": "attention sinks (extra softmax logits per head)",
    "sinks": "attention sinks (extra softmax logits per head)",
    "head_mask": "a per-head multiplier of the attention weights",
}

_FIX = (
    "write the pattern as an attngen spec and call attngen.compile(spec) on the layer's q, k, v yourself, "
    "or load this model with attn_implementation='sdpa' or 'eager'"
)


@dataclass(frozen=True)
class LayerAttention:
    """What one attention layer of a transformers model computes, in attngen's terms.

    Attributes:
        causal: queries see keys at their own position and before.
        window: sliding window in tokens, transformers' convention: causal layers see keys
            with ``q - k < window``, bidirectional ones keys with ``|q - k| <= window``;
            ``None`` for no window.
        softcap: tanh soft-capping of the scaled scores, ``cap * tanh(s / cap)`` (Gemma-2);
            ``None`` for none.
        scale: multiplier of ``q·k``; ``None`` means ``1/sqrt(D_QK)``.
        padded: some keys are padding: the spec reads the runtime input ``keep`` (int32
            ``[B, T_KV]``, nonzero for a real key).
        align: where query rows sit among the keys: ``bottom_right`` (row ``i`` at position
            ``i + T_KV - T_Q``, decoding with a cache) or ``top_left`` (row ``i`` at ``i``).
    """

    causal: bool
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None
    padded: bool = False
    align: str = "bottom_right"

    def spec(self) -> dict[str, Any]:
        """The attngen spec of the layer, as a dict :func:`attngen.compile` takes."""
        terms, params, parts = [], {}, ["causal" if self.causal else "bidirectional"]
        if self.causal:
            terms.append("k <= q")
        if self.window is not None:
            terms.append("q - k < window" if self.causal else "q - k <= window and k - q <= window")
            params["window"] = self.window
            parts.append("window")
        score = None
        if self.softcap is not None:
            score = "cap * tanh(s / cap)"
            params["cap"] = self.softcap
            parts.append("softcap")
        inputs = {}
        if self.padded:
            terms.append("keep[b, k] != 0")
            inputs["keep"] = {"dtype": "int32", "shape": ["B", "T_KV"]}
            parts.append("padded")
        if self.align != "bottom_right":
            parts.append(self.align)
        return {
            "name": "hf_" + "_".join(parts),
            "description": f"transformers attention layer ({', '.join(parts)}), from attngen.integrations.transformers",
            "params": params,
            "inputs": inputs,
            "mask": " and ".join(terms) or None,
            "score": score,
            "scale": self.scale,
            "align": self.align,
        }


def _positive(value: Any, what: str, fix: str, *, integer: bool = False) -> int | float:
    """``value`` as a positive int (or finite float); UnsupportedError naming ``what`` otherwise."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise UnsupportedError(f"{what}={value!r}: attngen maps only {kind} here; {fix}")
    return int(value) if integer else float(value)


def layer_attention(module: torch.nn.Module, scaling: float | None, kwargs: dict[str, Any]) -> LayerAttention:
    """Read what an attention layer computes from its module and the call's keyword arguments.

    Args:
        module: the model's attention module (``LlamaAttention``, ``BertSelfAttention``, ...).
            Read: ``module.is_causal`` (default True), ``module.config.is_causal`` (default
            True; transformers' switch that makes a decoder bidirectional) and
            ``module.sliding_window``.
        scaling: the ``scaling`` the model passes (``None``: ``1/sqrt(D_QK)``).
        kwargs: the remaining keyword arguments of the call; read: ``is_causal`` (overrides
            the module's), ``sliding_window`` (overrides the module's), ``softcap``.

    Returns:
        The layer without padding (``padded=False``), bottom-right aligned.

    Raises:
        UnsupportedError: a window, softcap or scaling that is not a positive number.
    """
    causal = kwargs.get("is_causal")
    if causal is None:
        config = getattr(module, "config", None)
        causal = bool(getattr(module, "is_causal", True)) and bool(getattr(config, "is_causal", True))
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "sliding_window", None)
    if window is not None:
        window = _positive(window, "sliding_window", "set config.sliding_window to a token count or None", integer=True)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        softcap = _positive(softcap, "softcap", "set config.attn_logit_softcapping to a positive number or None")
    if scaling is not None:
        scaling = _positive(scaling, "scaling", "the attention module must pass a positive scale or None")
    return LayerAttention(causal=bool(causal), window=window, softcap=softcap, scale=scaling)


#: Operators by layer kind, for calls traced by torch.compile: a plain dict, which Dynamo reads
#: as a constant (it would trace into an lru_cache'd compile). Filled by eager calls.
_TRACED_OPS: dict[LayerAttention, AttentionOp] = {}


@lru_cache(maxsize=None)
def compiled(layer: LayerAttention) -> AttentionOp:
    """The attngen operator of ``layer``, compiled on first use and cached per layer kind.

    Raises:
        SpecError: a window too large for the kernels' 32-bit positions (``>= 2**30``).
    """
    op = compile_spec(layer.spec())
    _TRACED_OPS[layer] = op
    return op


def _prepare_traced(layer: LayerAttention) -> None:
    """Compile, in an eager call, the operators a traced call of the same layer may use:
    its unpadded and padded forms (a traced call cannot tell padding from values)."""
    for kind in (replace(layer, padded=False), replace(layer, padded=True)):
        if kind not in _TRACED_OPS:
            _TRACED_OPS[kind] = compile_spec(kind.spec())


def _pattern_tensor(layer: LayerAttention, t_q: int, t_kv: int, device) -> torch.Tensor:
    """The layer's structural mask (no padding), bool ``[T_Q, T_KV]``: the terms of
    :meth:`LayerAttention.spec`'s mask, as tensor operations (traceable)."""
    q = torch.arange(t_q, device=device)[:, None] + (t_kv - t_q if layer.align == "bottom_right" else 0)
    k = torch.arange(t_kv, device=device)[None, :]
    keep = torch.ones(t_q, t_kv, dtype=torch.bool, device=device)
    if layer.causal:
        keep = keep & (k <= q)
    if layer.window is not None:
        keep = keep & ((q - k < layer.window) if layer.causal else ((q - k).abs() <= layer.window))
    return keep


def _traced_forward(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """:func:`attention_forward` under ``torch.compile``: no host reads of tensor values.

    Padding always runs through the padded operator (``keep`` derived by tensor operations),
    and a 4-D mask is checked against the layer's pattern by a device-side assertion
    (``torch._assert_async``) instead of a host comparison: a mask the layer cannot honour
    stops the run rather than being replaced by the pattern. On the CPU that is an error
    naming the assertion; on a GPU a failed device-side assertion, after which the process's
    CUDA context is lost (every later CUDA call fails). Query rows sit at the bottom right of
    the keys (the top-left prefill of a static cache is refused by the assertion).

    Raises:
        UnsupportedError: the layer's operator was not compiled by an eager call first.
    """
    _check_supported(query, key, value, dropout, kwargs)
    layer = layer_attention(module, scaling, kwargs)
    batch, _, t_q, _ = query.shape
    t_kv = key.shape[2]
    keep = None
    if attention_mask is None:
        if layer.causal and 1 < t_q < t_kv:
            layer = replace(layer, align="top_left")
    elif attention_mask.dim() == 2:
        keep = (attention_mask[:, -t_kv:] != 0).to(torch.int32).contiguous()
    else:
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        visible = visible[:, 0]
        pattern = _pattern_tensor(layer, t_q, t_kv, query.device)
        seen = visible.any(dim=1) | ~pattern.any(dim=0)
        torch._assert_async(torch.all(visible == (pattern & seen[:, None, :])),
                            "attngen: the attention mask is not the layer's pattern with padding keys removed")
        keep = seen.expand(batch, t_kv).to(torch.int32).contiguous()
    if keep is not None:
        layer = replace(layer, padded=True)
    op = _TRACED_OPS.get(layer)
    if op is None:
        raise UnsupportedError("torch.compile: this layer's attngen kernels are not compiled yet; run one forward of the "
                               "model eagerly (same padding and cache use) before compiling it, so that tracing finds them")
    out = op(query, key, value, **({} if keep is None else {"keep": keep.to(query.device)}))
    return out.transpose(1, 2).contiguous(), None


@lru_cache(maxsize=8)
def _pattern(layer: LayerAttention, t_q: int, t_kv: int, device: str) -> torch.Tensor:
    """:func:`_pattern_tensor`, cached for eager calls (a layer sees few distinct lengths)."""
    return _pattern_tensor(layer, t_q, t_kv, device)


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask as bool (True: the query sees the key)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        visible = mask == 0
        if not bool((visible | (mask <= MASKED_AT_OR_BELOW)).all()):
            raise UnsupportedError(
                "attention_mask: an additive float mask holds values other than 0 (attend) and large negatives "
                f"(<= {MASKED_AT_OR_BELOW:g} or -inf, masked), i.e. a score bias such as ALiBi; attngen maps only masks "
                "here: put the bias in a spec's score and call attngen.compile yourself, or use attn_implementation='eager'"
            )
        return visible
    raise UnsupportedError(
        f"attention_mask: a 4-D mask of dtype {str(mask.dtype).replace('torch.', '')} is ambiguous; pass a boolean "
        "mask (True = attend) or an additive float mask (0 = attend, large negative = masked)"
    )


def match_mask(
    attention_mask: torch.Tensor | None, layer: LayerAttention, batch: int, heads: int, t_q: int, t_kv: int
) -> tuple[LayerAttention, torch.Tensor | None]:
    """Fit the mask transformers passes to the layer: the alignment and which keys are real.

    Args:
        attention_mask: ``None`` (the layer's own pattern; for a causal layer with
            ``1 < T_Q < T_KV`` transformers means queries at the first positions, a prefill
            into an empty static cache); a 2-D padding mask ``[B, L]`` (``L >= T_KV``; its
            last ``T_KV`` columns belong to the keys; nonzero or True keeps a key); or a 4-D
            mask ``[B or 1, H or 1, T_Q, T_KV]``, boolean (True: attend) or additive float
            (0: attend, ``<= -1e4`` or ``-inf``: masked).
        layer: the layer's structure (:func:`layer_attention`), which a 4-D mask must
            reproduce in one of the two alignments.
        batch: ``B`` of the call.
        heads: ``H`` (query heads) of the call.
        t_q: ``T_Q`` of the call.
        t_kv: ``T_KV`` of the call.

    Returns:
        ``(layer, keep)``: the layer with its alignment and ``padded`` set, and ``keep``:
        ``None`` when every key is real, else int32 ``[B, T_KV]``, 1 for a real key and 0
        for padding (keys the pattern hides from every query count as real).

    Raises:
        ShapeError: the mask's shape fits neither layout.
        UnsupportedError: a mask object that is not a tensor (flex attention's
            ``BlockMask``), a per-head mask, an additive mask holding biases, or a 4-D mask
            that is not the layer's pattern with some keys removed.
    """
    if attention_mask is None:
        if layer.causal and 1 < t_q < t_kv:
            return replace(layer, align="top_left"), None
        return layer, None
    if not isinstance(attention_mask, torch.Tensor):
        raise UnsupportedError(
            f"attention_mask: a {type(attention_mask).__name__} cannot be mapped; attngen takes None, a 2-D padding "
            "mask or a 4-D boolean/additive mask (load the model with attn_implementation='attngen' so that "
            "transformers builds those)"
        )
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 2:
        if shape[0] != batch or shape[1] < t_kv:
            raise ShapeError(f"attention_mask: a 2-D padding mask must be [B={batch}, L >= T_KV={t_kv}], got {list(shape)}")
        return _padded(layer, attention_mask[:, -t_kv:] != 0)
    if attention_mask.dim() != 4:
        raise ShapeError(f"attention_mask: expected 2 dimensions [B, T_KV] or 4 [B, 1, T_Q, T_KV], got shape {list(shape)}")
    if shape[0] not in (1, batch) or shape[1] not in (1, heads) or shape[2:] != (t_q, t_kv):
        raise ShapeError(
            f"attention_mask: a 4-D mask must be [B={batch} or 1, H={heads} or 1, T_Q={t_q}, T_KV={t_kv}], got {list(shape)}"
        )
    visible = _visible(attention_mask)
    if shape[1] > 1 and not bool((visible == visible[:, :1]).all()):
        raise UnsupportedError(f"attention_mask: the mask differs between heads; attngen maps one mask for all heads; {_FIX}")
    visible = visible[:, 0]
    shapes = [layer]
    if layer.window is not None and not layer.causal and layer.window > 1:
        # some bidirectional models (ModernBERT) pass FlashAttention's inclusive window,
        # one more than the |q - k| <= w their mask uses
        shapes.append(replace(layer, window=layer.window - 1))
    for shaped in shapes:
        for align in ("bottom_right", "top_left") if t_q != t_kv else ("bottom_right",):
            aligned = replace(shaped, align=align)
            pattern = _pattern(aligned, t_q, t_kv, str(visible.device))
            keep = visible.any(dim=1) | ~pattern.any(dim=0)
            if torch.equal(visible, pattern & keep[:, None, :]):
                return _padded(aligned, keep.expand(batch, t_kv))
    raise UnsupportedError(
        f"attention_mask: this {list(shape)} mask is not the layer's pattern ({_describe(layer)}, query rows at the "
        "bottom right or top left of the keys) with padding keys removed; packed sequences, prefix-LM or image-token "
        f"overlays, per-query masks and a chunked prefill into a static cache cannot be mapped; {_FIX}"
    )


def _padded(layer: LayerAttention, keep: torch.Tensor) -> tuple[LayerAttention, torch.Tensor | None]:
    """``(layer, None)`` when ``keep`` (bool ``[B, T_KV]``) keeps every key, else the padded
    layer and ``keep`` as int32."""
    if bool(keep.all()):
        return layer, None
    return replace(layer, padded=True), keep.to(torch.int32).contiguous()


def _describe(layer: LayerAttention) -> str:
    spec = layer.spec()
    return f"mask {spec['mask']!r}" if spec["mask"] else "no mask"


def _check_supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, kwargs: dict[str, Any]) -> None:
    """Raise UnsupportedError for a call this integration cannot run exactly."""
    if dropout:
        raise UnsupportedError(
            f"dropout={dropout}: attngen's kernels have no attention dropout; call model.eval() for inference, "
            "or set the config's attention dropout (attention_dropout / attention_probs_dropout_prob) to 0.0 to train"
        )
    if kwargs.get("output_attentions"):  # (transformers itself refuses config.output_attentions here)
        raise UnsupportedError(
            "output_attentions=True: attngen's kernels never form the attention matrix; drop output_attentions, "
            "or load the model with attn_implementation='eager' to inspect attention weights"
        )
    for name, what in UNMAPPED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise UnsupportedError(f"{name}: the model passes {what}, which attngen's integration cannot map; {_FIX}")
    if query.dtype not in KERNEL_DTYPES:
        dtype = str(query.dtype).replace("torch.", "")
        raise UnsupportedError(f"query: dtype {dtype} is not supported by the kernels; cast the model with model.to(torch.float32) (or bfloat16, float16)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() == 4 and t.shape[-1] > MAX_HEAD_DIM:
            raise UnsupportedError(
                f"{name}: head dim {t.shape[-1]} exceeds the kernels' {MAX_HEAD_DIM}; use attn_implementation='sdpa' for this model"
            )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls for ``attn_implementation="attngen"``.

    Args:
        module: the attention module (read for ``is_causal``, ``sliding_window``, ``config``).
        query: ``[B, H, T_Q, D_QK]``, float16, bfloat16 or float32.
        key: ``[B, H_KV, T_KV, D_QK]``, ``H % H_KV == 0`` (GQA heads are used as they come).
        value: ``[B, H_KV, T_KV, D_V]``.
        attention_mask: ``None``, a 2-D padding mask ``[B, L]`` or a 4-D boolean / additive
            mask ``[B or 1, H or 1, T_Q, T_KV]`` (see :func:`match_mask`).
        scaling: multiplier of ``q·k`` (``None``: ``1/sqrt(D_QK)``).
        dropout: attention dropout probability; only 0 is supported.
        **kwargs: ``is_causal``, ``sliding_window``, ``softcap`` are mapped (see
            :func:`layer_attention`); ``output_attentions`` and :data:`UNMAPPED_KWARGS` raise
            when set; the rest (``position_ids``, cache bookkeeping) does not change the
            attention and is ignored.

    Returns:
        ``(attn_output, None)``: ``attn_output`` ``[B, T_Q, H, D_V]`` contiguous, in the
        query's dtype; attention weights are never formed.

    Raises:
        UnsupportedError: dropout, ``output_attentions``, a mask or keyword that cannot be
            mapped, a head dim above 256, a dtype other than float16/bfloat16/float32, or CPU
            tensors without ``TRITON_INTERPRET=1``.
        ShapeError: a misshapen mask, or q, k and v that do not fit together.
    """
    if torch.compiler.is_compiling():
        return _traced_forward(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    _check_supported(query, key, value, dropout, kwargs)
    layer = layer_attention(module, scaling, kwargs)
    batch, heads, t_q, _ = query.shape
    layer, keep = match_mask(attention_mask, layer, batch, heads, t_q, key.shape[2])
    _prepare_traced(layer)
    inputs = {} if keep is None else {"keep": keep.to(query.device)}
    out = compiled(layer)(query, key, value, **inputs)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Register :func:`attention_forward` and transformers' boolean mask builder under ``name``.

    The mask builder (``transformers.masking_utils.sdpa_mask``) makes models hand the function
    ``None`` where the layer's own pattern suffices, else a boolean ``[B, 1, T_Q, T_KV]`` mask.
    Idempotent; this module calls it on import.

    Raises:
        UnsupportedError: the installed transformers has no attention or mask interface
            (the message names its version; install ``transformers>=5``).
    """
    import transformers

    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise UnsupportedError(
            f"transformers {transformers.__version__} lacks AttentionInterface or masking_utils.AttentionMaskInterface; "
            "install transformers>=5 (pip install -U transformers)"
        ) from exc
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


register()
