"""Load an export in vLLM offline and generate greedily: `python -m compress_export.integrations.vllm_check OUT`.

Prints one JSON line with the generated text, load and generation times and decode tokens/s, so tests and
benchmarks can run it in a subprocess (vLLM spawns its engine: this module must stay importable as __main__).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from compress_export.integrations.vllm_offline import generate


def read_result(stdout: str):
    """The JSON of the `RESULT ` line a subprocess printed (this module's protocol), or None."""
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[0][len("RESULT ") :]) if line else None


def prompt_top1(llm, token_ids: list) -> dict:
    """vLLM's own top-1 next token and its log-probability at every position of a prompt, and the
    log-probability of the prompt's actual next token (prompt logprobs)."""
    from compress_export.integrations.vllm_api import SamplingParams, TokensPrompt

    out = generate(
        llm,
        [TokensPrompt(prompt_token_ids=token_ids)],
        SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0),
    )[0]
    top, lp, actual = [], [], []
    for d, nxt in zip(out.prompt_logprobs[1:], token_ids[1:]):  # position 0 has no prediction
        best = min(d.items(), key=lambda kv: kv[1].rank)
        top.append(int(best[0]))
        lp.append(float(best[1].logprob))
        actual.append(float(d[nxt].logprob))  # vLLM always reports the prompt's own token too
    return {"top1": top, "top1_logprob": lp, "token_logprob": actual}


def decode_speed(llm, prompt: str, max_tokens: int, batch: int, repeats: int) -> float:
    """Median over `repeats` of generated tokens/s with `batch` copies of the prompt in flight (greedy,
    ignore_eos, so every sequence generates max_tokens)."""
    from compress_export.integrations.vllm_api import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = generate(llm, [prompt] * batch, sp, use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    return round(statistics.median(rates), 2)


def run(
    model: str,
    prompt: str,
    max_tokens: int,
    score_ids: list | None = None,
    batches=(1,),
    repeats: int = 1,
    **llm_kwargs,
) -> dict:
    from compress_export.integrations.vllm_offline import engine_facts, load_llm

    llm, facts = load_llm(model, 1024, **llm_kwargs)  # lora=FOLDER among them: every request carries it
    facts.update(engine_facts(llm))
    from compress_export.integrations.vllm_api import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    generate(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    t1 = time.time()
    out = generate(llm, [prompt], greedy, use_tqdm=False)[0].outputs[0]
    gen_s = time.time() - t1
    res = {
        "model": model,
        "quantization": facts["quantization"],
        "dtype": facts["dtype"],
        "kernels": facts.get("kernels"),
        "text": out.text,
        "tokens": len(out.token_ids),
        "load_s": facts["load_s"],
        "generate_s": round(gen_s, 3),
        "decode_tok_s": round(len(out.token_ids) / gen_s, 2),
        "lora": facts.get("lora"),
    }
    if repeats > 1 or tuple(batches) != (1,):
        res["decode_tok_s_by_batch"] = {str(b): decode_speed(llm, prompt, max_tokens, b, repeats) for b in batches}
    if score_ids:
        res.update(prompt_top1(llm, score_ids))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--score-ids",
        help="a JSON file with a list of token ids: also report vLLM's top-1 "
        "prediction and log-probability at each position (conformance checks)",
    )
    p.add_argument("--dtype", help="engine dtype (default: this machine's fastest, see compress_export.core.hardware)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM workers sharding the model")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes to time decode at, e.g. 1,4")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per batch size (median)")
    p.add_argument("--lora", help="a LoRA adapter folder applied to every request (an export's OUT/lowrank)")
    a = p.parse_args(argv)
    ids = json.load(open(a.score_ids)) if a.score_ids else None
    kw = {"dtype": a.dtype} if a.dtype else {}
    if a.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = a.tensor_parallel_size
    if a.lora:
        kw["lora"] = a.lora
    batches = [int(b) for b in a.batches.split(",")]
    print("RESULT " + json.dumps(run(a.model, a.prompt, a.max_tokens, ids, batches, a.repeats, **kw)), flush=True)
    from compress_export.integrations.vllm_offline import exit_after_results

    exit_after_results(0)


if __name__ == "__main__":
    sys.exit(main())
