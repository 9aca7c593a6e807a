"""One model in vLLM's offline engine, measured once loaded: `python -m compress_export.integrations.vllm_offline
SPEC.json OUT.json`. The validate command runs it in a subprocess per model (a crash or a missing kernel is then
that model's error, not the run's); the engine is loaded once and every offline figure comes from that load:

- greedy outputs on fixed prompts (chat prompts through the model's own chat template);
- perplexity through vLLM's prompt log-probabilities on the shared protocol's windows (`evaluate.summarize`
  turns the per-token losses into token/word/byte perplexity and bits per byte, as `compress-export eval` does);
- latency at batch 1 per (prompt, output) length: time to first token = a 1-token generation, time per output
  token = (an O-token generation − that) / (O − 1), median of repeats (what `vllm bench latency` would give if run
  at output lengths 1 and O, each with its own engine load);
- offline throughput: N prompts of fixed length submitted at once, as `vllm bench throughput` does;
- memory: bytes of the parameters and buffers vLLM holds after loading (read inside the worker process).

Progress goes to stderr as `PROGRESS <stage>` lines; the result is one JSON file.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def _stage(name: str) -> None:
    print(f"PROGRESS {name}", file=sys.stderr, flush=True)


def _memory(model) -> dict:
    """Runs inside vLLM's worker (through LLM.apply_model): what the loaded model occupies."""
    import torch

    seen, n, hidden = set(), 0, 0
    for mod in model.modules():
        tensors = [t for t in mod.__dict__.get("_parameters", {}).values() if t is not None]
        tensors += [t for t in mod.__dict__.get("_buffers", {}).values() if t is not None]
        # (plain tensor attributes are not counted: attention layers hold the KV cache that way)
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            if key not in seen and t.numel():
                seen.add(key)
                n += t.untyped_storage().nbytes()
        w = mod.__dict__.get("_parameters", {}).get("weight")
        if w is not None and w.numel() == 0 and hasattr(mod, "cpu_linear"):
            # vLLM's CPU GEMM moved this dense weight into a oneDNN/packed handle the tensors above cannot see
            # (a MoE router, GateLinear, names its sizes in_features/out_features)
            ins = getattr(mod, "input_size_per_partition", None) or getattr(mod, "in_features", 0)
            outs = getattr(mod, "output_size_per_partition", None) or getattr(mod, "out_features", 0)
            hidden += ins * outs * w.element_size()
    out = {"weight_bytes": int(n + hidden), "weight_bytes_in_cpu_gemm_handles": int(hidden)}
    if torch.cuda.is_available():
        out["gpu_peak_bytes"] = int(torch.cuda.max_memory_reserved())
    return out


def kernels_in_use(model) -> dict:
    """Runs inside vLLM's worker: which kernel runs each quantized linear ({name: count}), ours by registry name
    ("compress_export:cpu-wna16"), vLLM's by class ("vllm:CPUWNA16LinearKernel"). Unquantized linears are not
    counted."""
    counts = {}
    for mod in model.modules():
        name = getattr(mod, "ce_kernel_name", None)
        if name:
            name = f"compress_export:{name}"
        else:
            qm = getattr(mod, "quant_method", None)
            # compressed-tensors keeps its kernel on the layer's scheme (W8A8: the int8 kernel)
            k = getattr(qm, "kernel", None) or getattr(getattr(mod, "scheme", None), "kernel", None)
            name = f"vllm:{type(k).__name__}" if k is not None else None
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def engine_facts(llm) -> dict:
    """What ran, read inside the worker: the kernels of the quantized linears and the weights' memory."""
    from compress_export.integrations.vllm_offline import _memory, kernels_in_use  # by package name (see run)

    facts = {}
    try:
        facts["kernels"] = llm.apply_model(kernels_in_use)[0]
        facts.update(llm.apply_model(_memory)[0])
    except Exception as e:  # figures, not a reason to lose the run's other figures
        facts["memory_error"] = f"{type(e).__name__}: {e}"
    return facts


def _text_ids(tok, text_path: str) -> list:
    with open(text_path, encoding="utf-8") as f:
        return tok(f.read(), add_special_tokens=False)["input_ids"]


def _cut(ids: list, length: int, index: int) -> list:
    """The index-th prompt of `length` tokens cut from the text, wrapping around (deterministic, real text)."""
    start = (index * 997) % max(1, len(ids))
    return [ids[(start + k) % len(ids)] for k in range(length)]


def greedy(llm, tok, prompts: list, max_new_tokens: int) -> list:
    from compress_export.integrations.vllm_api import SamplingParams, TokensPrompt

    batch = []
    for p in prompts:
        if p.get("chat"):
            text = tok.apply_chat_template(
                [{"role": "user", "content": p["text"]}], add_generation_prompt=True, tokenize=False
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]  # the template writes its own special tokens
        else:
            ids = tok(p["text"])["input_ids"]
        batch.append(TokensPrompt(prompt_token_ids=list(ids)))
    outs = generate(llm, batch, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    return [
        {
            "prompt": p["text"],
            "chat": bool(p.get("chat")),
            "text": o.outputs[0].text,
            "token_ids": list(o.outputs[0].token_ids),
        }
        for p, o in zip(prompts, outs)
    ]


def perplexity(llm, tok, text_ids: list, window: int, windows: int) -> dict:
    """The protocol's windows scored by vLLM: loss at each position = −(vLLM's log p of the actual next token)."""
    import torch

    from compress_export.integrations.vllm_api import SamplingParams, TokensPrompt
    from compress_export.pipeline.evaluate import cut_windows, summarize

    ids = cut_windows(torch.tensor(text_ids), window, windows)
    t0 = time.perf_counter()
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    if id(llm) in _LORA:  # vLLM 0.32's CPU LoRA path fails on prompt logprobs of several requests in one batch
        outs = [o for p in prompts for o in generate(llm, [p], params, use_tqdm=False)]
    else:
        outs = generate(llm, prompts, params, use_tqdm=False)
    loss = torch.tensor(
        [[-pos[int(t)].logprob for pos, t in zip(o.prompt_logprobs[1:], row[1:])] for o, row in zip(outs, ids)],
        dtype=torch.float64,
    )
    return summarize(tok, ids, loss, time.perf_counter() - t0).as_dict()


def _timed(llm, prompt_ids: list, max_tokens: int) -> float:
    from compress_export.integrations.vllm_api import SamplingParams, TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    generate(llm, [TokensPrompt(prompt_token_ids=prompt_ids)], sp, use_tqdm=False)
    return time.perf_counter() - t


def latency(llm, text_ids: list, lengths: list, repeats: int) -> list:
    rows = []
    for n_in, n_out in lengths:
        prompts = [_cut(text_ids, n_in, 100 + k) for k in range(repeats)]  # a fresh prompt each: no prefix cache
        first = statistics.median(_timed(llm, p, 1) for p in prompts)
        prompts = [_cut(text_ids, n_in, 200 + k) for k in range(repeats)]
        full = statistics.median(_timed(llm, p, n_out) for p in prompts)
        tpot = (full - first) / max(1, n_out - 1)
        rows.append(
            {
                "input_len": n_in,
                "output_len": n_out,
                "ttft_ms": round(first * 1e3, 2),
                "tpot_ms": round(tpot * 1e3, 2),
                "e2e_ms": round(full * 1e3, 2),
                "decode_tok_s": round(1.0 / tpot, 2) if tpot > 0 else None,
            }
        )
    return rows


def throughput(llm, text_ids: list, num_prompts: int, input_len: int, output_len: int) -> dict:
    from compress_export.integrations.vllm_api import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=_cut(text_ids, input_len, 300 + k)) for k in range(num_prompts)]
    sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t = time.perf_counter()
    outs = generate(llm, prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = num_prompts * input_len
    return {
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
        "seconds": round(dt, 3),
        "requests_per_s": round(num_prompts / dt, 3),
        "input_tok_s": round(n_in / dt, 2),
        "output_tok_s": round(n_out / dt, 2),
        "total_tok_s": round((n_in + n_out) / dt, 2),
    }


_ENGINES: list = []  # every engine this process started, shut down by exit_after_results


def exit_after_results(code: int = 0) -> None:
    """End a runner process once its results are written: shut its engines down explicitly, then leave without
    interpreter teardown. vLLM's CPU engine has aborted at teardown ("terminate called without an active
    exception", SIGABRT) after every result was out, which made a finished run look failed."""
    for llm in _ENGINES:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # a failed shutdown must not turn finished results into an error
            print(f"vLLM engine shutdown: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def load_llm(model: str, max_model_len: int, lora: str | None = None, **kwargs):
    """vLLM's offline engine with this platform's working settings (CPU: forced platform, the CPU's fastest dtype,
    eager, small KV cache; each yields to an explicit kwarg). lora: a LoRA adapter folder (an export's low-rank
    correction) applied to every request. Returns (llm, facts about the load)."""
    from compress_export.integrations.vllm_launch import (
        attention_defaults,
        cpu_environment,
        dtype_hint,
        engine_defaults,
        scoped_environment,
        user_chose_attention,
    )

    os.environ.update(cpu_environment(tensor_parallel=int(kwargs.get("tensor_parallel_size") or 1)))
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships our inspection functions
    from compress_export.integrations.vllm_api import LLM

    kwargs = {**engine_defaults(), **kwargs}
    if not user_chose_attention(kwargs=kwargs):
        kwargs = {**attention_defaults(model, kwargs.get("dtype")), **kwargs}
    if lora:
        from compress_export.integrations.vllm_lowrank import check_no_lora
        from compress_export.io.lowrank import ADAPTER_NAME, adapter_rank, vllm_max_lora_rank

        check_no_lora(lora)
        rank = adapter_rank(lora)
        if rank is None:
            raise ValueError(f"{lora}: no adapter_config.json (not a LoRA adapter folder)")
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_max_lora_rank(rank))
    t0 = time.perf_counter()
    with scoped_environment(dtype_hint(kwargs.get("dtype"))):  # the plugin's route sees the dtype
        llm = LLM(model=model, max_model_len=max_model_len, seed=0, **kwargs)
    _ENGINES.append(llm)
    if lora:
        from compress_export.integrations.vllm_api import LoRARequest

        _LORA[id(llm)] = LoRARequest(ADAPTER_NAME, 1, str(Path(lora).resolve()))
    cfg = llm.llm_engine.vllm_config.model_config
    return llm, {
        "model": model,
        "load_s": round(time.perf_counter() - t0, 2),
        "quantization": cfg.quantization,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "lora": lora,
    }


_LORA: dict = {}  # id(llm) → the LoRARequest every generate call of that engine carries


def generate(llm, prompts, params, **kw):
    """llm.generate, with the engine's LoRA adapter (if it was loaded with one) on every request."""
    if id(llm) in _LORA:
        kw["lora_request"] = _LORA[id(llm)]
    return llm.generate(prompts, params, **kw)


def run(spec: dict) -> dict:
    """Every figure the spec asks for; `"only": "perplexity"` measures just that (compress-export eval)."""
    _stage("loading the model in vLLM")
    llm, res = load_llm(spec["model"], spec["max_model_len"], spec.get("lora"), **spec.get("engine", {}))
    res.update(engine_facts(llm))
    tok = llm.get_tokenizer()
    text_ids = _text_ids(tok, spec["text"])
    if spec.get("only") == "perplexity":
        _stage("perplexity (prompt logprobs)")
        res["perplexity"] = perplexity(llm, tok, text_ids, spec["window"], spec["windows"])
        return res
    _timed(llm, _cut(text_ids, 8, 0), 2)  # warm-up
    _stage("greedy outputs")
    res["greedy"] = greedy(llm, tok, spec["prompts"], spec["max_new_tokens"])
    _stage("perplexity (prompt logprobs)")
    res["perplexity"] = perplexity(llm, tok, text_ids, spec["window"], spec["windows"])
    _stage("latency at batch 1")
    res["latency"] = latency(llm, text_ids, spec["latency_lengths"], spec["latency_repeats"])
    _stage("offline throughput")
    res["throughput"] = throughput(llm, text_ids, **spec["throughput"])
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m compress_export.integrations.vllm_offline SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    res = run(spec)
    tmp = argv[1] + ".part"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, argv[1])
    exit_after_results(0)


if __name__ == "__main__":
    sys.exit(main())
