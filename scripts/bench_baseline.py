#!/usr/bin/env python3
"""Baselines for engine/examples/bench.rs on the same GGUF and the same prompt length:
transformers on PyTorch (CPU, eager, f32 weights dequantized from the GGUF) and llama.cpp
(llama-cpp-python, the GGUF as it is). Prints one JSON line per engine.

    python scripts/bench_baseline.py MODEL.gguf [--prompt-tokens 128] [--new-tokens 64] [--threads N]
"""
import argparse
import json
import os
import resource
import sys
import time

TEXT = (
    "The honey bee is a eusocial flying insect within the genus Apis of the bee clade. "
    "Bees live in colonies, build nests from wax, and store honey and pollen. "
)


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_transformers(path, prompt_tokens, new_tokens, threads, runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = []
    while len(ids) < prompt_tokens:
        ids += tok(TEXT, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids[:prompt_tokens]])
    best = None
    with torch.no_grad():
        for run in range(runs + 1):
            t0 = time.perf_counter()
            out = model(x, use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            prefill, decode = prompt_tokens / (t1 - t0), (new_tokens - 1) / (t2 - t1)
            if run and (best is None or prefill + decode > sum(best)):
                best = (prefill, decode)
    return {"engine": "transformers", "torch": torch.__version__, "prefill_tps": best[0], "decode_tps": best[1],
            "peak_rss_mb": peak_mb()}


def bench_llama_cpp(path, prompt_tokens, new_tokens, threads, runs):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    ids = []
    while len(ids) < prompt_tokens:
        ids += llm.tokenize(TEXT.encode(), add_bos=False)
    ids = ids[:prompt_tokens]
    best = None
    for run in range(runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
        t2 = time.perf_counter()
        prefill, decode = prompt_tokens / (t1 - t0), (new_tokens - 1) / (t2 - t1)
        if run and (best is None or prefill + decode > sum(best)):
            best = (prefill, decode)
    return {"engine": "llama.cpp", "prefill_tps": best[0], "decode_tps": best[1], "peak_rss_mb": peak_mb()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=["transformers", "llama.cpp"])
    a = p.parse_args()
    for name, fn in [("llama.cpp", bench_llama_cpp), ("transformers", bench_transformers)]:
        if a.only and a.only != name:
            continue
        try:
            r = fn(a.model, a.prompt_tokens, a.new_tokens, a.threads, a.runs)
        except ImportError as e:
            print(f"# {name} skipped: {e}", file=sys.stderr)
            continue
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
