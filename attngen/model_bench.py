"""``python -m attngen bench --suite llama``: a training step of a Llama-shaped decoder with
attngen, SDPA and FlexAttention as transformers' attention implementation, in one process.

The model is random-initialised from a ``LlamaConfig`` (no download): by default 8 layers,
H = 32 query heads, H_KV = 8 key/value heads, head dim 128 (hidden 4096), T = 8192, B = 1,
bf16. A step is the forward (next-token loss) and the backward; tokens/s = B·T / step time.
Before timing, each implementation's loss is compared with SDPA's on the same batch.
"""

from __future__ import annotations

import statistics

from .timing import command_line, wall_times


def _config(layers: int, heads: int, kv_heads: int, head_dim: int, t: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=int(heads * head_dim * 8 / 3) // 256 * 256 or 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       max_position_embeddings=t)


def training_step(layers: int = 8, heads: int = 32, kv_heads: int = 8, head_dim: int = 128, t: int = 8192, b: int = 1,
                  vocab: int = 32000, device: str = "cuda", dtype: str = "bfloat16", systems=("attngen", "sdpa", "flex_attention"),
                  warmup: int = 2, iters: int = 5) -> dict:
    """Time forward+backward of one model per attention implementation; return the rows.

    Raises:
        ImportError: transformers is not installed (``pip install 'attngen[transformers]'``).
    """
    import torch

    import importlib

    from transformers import LlamaForCausalLM

    importlib.import_module("attngen.integrations.transformers")  # registers attn_implementation="attngen"

    torch.manual_seed(0)
    config = _config(layers, heads, kv_heads, head_dim, t, vocab)
    dt = getattr(torch, dtype)
    base = LlamaForCausalLM(config).to(device=device, dtype=dt)
    state = base.state_dict()
    del base
    tokens = torch.randint(0, vocab, (b, t), device=device, generator=torch.Generator(device=device).manual_seed(1))
    rows, losses = [], {}
    for system in systems:
        model = LlamaForCausalLM._from_config(config, attn_implementation=system, dtype=dt).to(device)
        model.load_state_dict(state)
        model.train()
        rows.append(_time_model(system, model, tokens, device, warmup, iters, losses))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    reference = losses.get("sdpa")
    for row in rows:
        if row["status"] == "ok" and reference is not None:
            row["loss_vs_sdpa"] = abs(row["loss"] - reference)
    meta = dict(layers=layers, H=heads, H_KV=kv_heads, D=head_dim, T=t, B=b, vocab=vocab, dtype=dtype, device=device,
                command=command_line())
    if device == "cuda":
        import triton

        meta.update(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    return {"meta": meta, "rows": rows}


def _time_model(system: str, model, tokens, device: str, warmup: int, iters: int, losses: dict) -> dict:
    """One implementation's row: its first loss goes into ``losses``; then the median step."""
    import torch

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss

    try:
        losses[system] = step().item()
    except Exception as exc:  # an implementation that cannot run this model here
        return dict(system=system, status=f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    for _ in range(warmup):
        step()
    ms = statistics.median(wall_times(step, iters, device, before=lambda: model.zero_grad(set_to_none=True)))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    b, t = tokens.shape
    return dict(system=system, status="ok", ms=round(ms, 2), tokens_per_s=round(b * t / ms * 1e3), loss=losses[system],
                peak_gib=round(peak, 2))


def markdown(result: dict) -> str:
    """The training-step table as Markdown."""
    m = result["meta"]
    lines = [f"{m.get('card', m['device'])}; torch {m.get('torch', '')}, Triton {m.get('triton', '')}; Llama-shaped decoder, "
             f"{m['layers']} layers, H={m['H']}, H_KV={m['H_KV']}, D={m['D']}, T={m['T']}, B={m['B']}, {m['dtype']}, random init; "
             f"forward + backward (next-token loss), median step. Command: `{m['command']}`.", "",
             "| attention | step (ms) | tokens/s | peak memory (GiB) | loss − SDPA's loss |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | {r['status']} | | | |")
            continue
        diff = f"{r['loss_vs_sdpa']:.2e}" if "loss_vs_sdpa" in r else "—"
        lines.append(f"| {r['system']} | {r['ms']} | {r['tokens_per_s']} | {r['peak_gib']} | {diff} |")
    return "\n".join(lines) + "\n"
