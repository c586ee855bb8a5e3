"""AudioFlamingo2 benchmark suite: one entry point, a table and a JSON file.

Measures, on random weights of a chosen size (no download):
  * feature extraction for 10 s and 300 s of audio (on --device),
  * audio encoding (AF-CLAP + audio transformer) for 10 s and 300 s,
  * time to first token (features + prefill + first token) for 10 s and 300 s,
  * decode ms/token and tokens/s at batch 1 and batch 16 (dynamic cache; static cache + torch.compile with --compile),
  * the naive path (audio K/V re-projected at every step, as the original does) vs the cached one, and the ratio
    decode(300 s) / decode(10 s) at batch 1 (target <= 1.15),
  * peak memory of a batch-1 generate on 300 s of audio vs weight bytes (CUDA: max_memory_allocated since a reset;
    CPU: peak RSS of the whole process, an upper bound),
  * the decode floor = bytes one decode step must read (the weights it uses: language model, lm_head,
    cross-attention blocks without their audio K/V projection; plus the self- and cross-attention caches) /
    measured device copy bandwidth, and achieved / floor (the target is for CUDA; the CPU figure is for scale);
    the looser floor from all weight bytes is printed too.

    python benchmarks/run.py --config tiny
    python benchmarks/run.py --config 0.5b --json out.json
    python benchmarks/run.py --config 3b --device cuda --dtype bfloat16 --compile
"""

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch
from transformers import CompileConfig
from transformers.generation.streamers import BaseStreamer

from af2_hf import AudioFlamingo2FeatureExtractor
from bench_generate import build_model, interleaved_decode, sync, timed


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_weight_bytes(model) -> int:
    """Bytes of the weights a cached decode step reads: everything but the audio tower, the audio transformer and
    the cross-attention audio K/V projections (used at prefill only). Tied weights count once."""
    skip = {id(p) for module in (model.model.audio_tower, model.model.audio_transformer) for p in module.parameters()}
    skip |= {id(block.to_kv.weight) for block in model.model.cross_attention_layers}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def cache_bytes(model, batch, text_tokens, audio_tokens, dtype) -> int:
    """Bytes of the self-attention cache (text_tokens) and the cross-attention cache (audio_tokens) read per step."""
    text, element = model.config.text_config, torch.empty((), dtype=dtype).element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    self_attention = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * text_tokens
    blocks = len(model.model.cross_attention_layers)
    cross = 2 * blocks * model.config.cross_attention_num_heads * model.config.cross_attention_head_dim * audio_tokens
    return batch * element * (self_attention + cross)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def copy_bandwidth(device, megabytes=1024, repeats=10) -> float:
    """Device copy bandwidth in bytes/s (read + write of a large buffer)."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _, seconds = timed(lambda: dst.copy_(src), device, repeats=repeats)
    return 2 * src.numel() / seconds


class StepTimer(BaseStreamer):
    """Streamer that records when generate() hands over each new token (after a device sync)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def generate_ms_per_token(model, inputs, tokens, compile_config=None, repeats=3):
    """Median ms between consecutive new tokens of a greedy, fixed-length generate() (the decode phase, generate's
    own per-step work included; the prompt and the first token, i.e. the prefill, are excluded)."""
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=tokens, min_new_tokens=tokens)
    if compile_config is not None:
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    device = inputs["input_ids"].device
    for _ in range(min(2, repeats)):  # warm-up (and compilation)
        model.generate(**inputs, **kwargs)
    gaps = []
    for _ in range(repeats):
        timer = StepTimer(device)
        model.generate(**inputs, streamer=timer, **kwargs)
        # times[0]: the prompt, times[1]: the first new token (prefill); later gaps are decode steps
        gaps += [later - earlier for earlier, later in zip(timer.times[1:], timer.times[2:])]
    return 1000 * statistics.median(gaps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=["tiny", "0.5b", "1.5b", "3b"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="also time static cache + torch.compile decoding")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--json", default="benchmark_results.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    parser.add_argument("--long-seconds", type=int, default=300,
                        help="the long clip (default 300 s, the release limit; the tests use a short one)")
    args = parser.parse_args()
    long, repeats = args.long_seconds, args.repeats

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model(args.config, device, dtype)
    extractor = AudioFlamingo2FeatureExtractor(max_num_windows=30)
    weights = weight_bytes(model)
    results = dict(config=args.config, device=str(device), dtype=args.dtype, weight_bytes=weights,
                   torch=torch.__version__, threads=torch.get_num_threads(), rows=[])
    rows = results["rows"]

    def add(name, value, unit, note=""):
        # Each row is printed and saved as soon as it is measured, so a run cut short (a time limit) keeps them.
        rows.append(dict(name=name, value=value, unit=unit, note=note))
        print(f"  {name}: {value:.3f} {unit} {note}".rstrip(), flush=True)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)

    print(f"config={args.config} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"weights={weights / 2**30:.2f} GiB device={device} dtype={args.dtype}")
    rng = np.random.default_rng(0)
    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), device=device)
    contexts = {}
    for seconds in (10, long):
        waveform = rng.uniform(-0.8, 0.8, seconds * extractor.sampling_rate)
        features, t_feat = timed(lambda: extractor(waveform, sampling_rate=16000, return_tensors="pt",
                                                   device=str(device)), device, repeats=repeats)
        feats = features["input_features"].to(device=device, dtype=dtype)
        mask = features["input_features_mask"].to(device)
        contexts[seconds] = (feats, mask)
        add(f"features {seconds}s", t_feat * 1000, "ms")
        with torch.inference_mode():
            model.get_audio_features(feats, mask)
            _, t_enc = timed(lambda: model.get_audio_features(feats, mask), device, repeats=repeats)
        add(f"audio encoding {seconds}s", t_enc * 1000, "ms")

        def first_token():
            f = extractor(waveform, sampling_rate=16000, return_tensors="pt", device=str(device))
            with torch.inference_mode():
                out = model(input_ids=prompt, input_features=f["input_features"].to(device=device, dtype=dtype),
                            input_features_mask=f["input_features_mask"].to(device), logits_to_keep=1)
            return out.logits.argmax(-1)

        first_token()
        _, ttft = timed(first_token, device, repeats=repeats)
        add(f"time to first token {seconds}s", ttft * 1000, "ms", "features + prefill + first token")

    (p10, d10), (p_long, d_long) = interleaved_decode(model, prompt, [contexts[10], contexts[long]], args.steps,
                                                      False)
    (_, n10), (_, n_long) = interleaved_decode(model, prompt, [contexts[10], contexts[long]], args.steps, True)
    add("decode b1 10s (cached audio K/V)", d10, "ms/token")
    add(f"decode b1 {long}s (cached audio K/V)", d_long, "ms/token")
    add(f"decode b1 {long}s naive (K/V recomputed)", n_long, "ms/token")
    add(f"ratio decode({long}s)/decode(10s)", d_long / d10, "x", "target <= 1.15")
    add(f"speed-up cached vs naive at {long}s", n_long / d_long, "x")

    compile_config = None
    if args.compile:
        compile_config = CompileConfig(fullgraph=True, dynamic=False)
        compile_config._compile_all_devices = True

    def batch_inputs(seconds, batch):
        feats, mask = contexts[seconds]
        ids = prompt.expand(batch, -1).contiguous()
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    input_features=feats.expand(batch, -1, -1, -1).contiguous(),
                    input_features_mask=mask.expand(batch, -1).contiguous())

    # Memory first, before larger batches and compiled graphs raise the process peak: batch 1, the long clip.
    reset_peak_memory(device)
    with torch.inference_mode():
        model.generate(**batch_inputs(long, 1), max_new_tokens=args.steps, do_sample=False, pad_token_id=0,
                       eos_token_id=None)
    peak = peak_memory_bytes(device)
    add(f"peak memory b1 {long}s generate", peak / 2**30, "GiB",
        "process peak RSS (upper bound)" if device.type == "cpu" else "max_memory_allocated")
    add("peak memory / weights", peak / weights, "x", "target <= 1.15 (GPU, batch 1)")

    # The decode floor: the bytes one step must read over the measured copy bandwidth (on the CPU too, for scale).
    bandwidth = copy_bandwidth(device, megabytes=1024 if device.type == "cuda" else 256)
    add("device copy bandwidth", bandwidth / 1e9, "GB/s", "read + write of a large buffer")
    for batch in args.batch:
        for seconds in (10, long) if batch == 1 else (10,):
            inputs = batch_inputs(seconds, batch)
            timings = {"dynamic cache": generate_ms_per_token(model, inputs, args.steps, repeats=repeats)}
            if compile_config is not None:
                timings["static+compile"] = generate_ms_per_token(model, inputs, args.steps, compile_config, repeats)
            for mode, ms in timings.items():
                add(f"generate b{batch} {seconds}s {mode}", ms, "ms/token", f"{batch * 1000 / ms:.1f} tokens/s")
            if batch != 1:
                continue
            audio_tokens = contexts[seconds][0].shape[1] * model.config.tokens_per_window
            read = decode_weight_bytes(model) + cache_bytes(model, batch, args.prompt_tokens + args.steps,
                                                            audio_tokens, dtype)
            floor_ms = 1000 * read / bandwidth
            add(f"decode floor b1 {seconds}s (bytes read / bandwidth)", floor_ms, "ms/token",
                f"{read / 2**30:.3f} GiB read per step")
            for mode, ms in timings.items():
                target = "target >= 0.70 (GPU, static+compile)" if mode == "static+compile" else ""
                add(f"achieved / floor (b1 {seconds}s {mode})", floor_ms / ms, "x", target)
            best = min(timings.values())
            add(f"achieved / all-weights floor (b1 {seconds}s)", 1000 * weights / bandwidth / best, "x",
                "floor from every weight byte (looser), best mode")

    width = max(len(r["name"]) for r in rows)
    print()
    print(f"| {'measure':<{width}} | value | unit | note |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for r in rows:
        print(f"| {r['name']:<{width}} | {r['value']:.3f} | {r['unit']} | {r['note']} |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
