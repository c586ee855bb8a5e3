"""Decode speed vs audio length for AudioFlamingo2 (random weights, no download).

Times, for 10 s and 300 s of audio: audio encoding (AF-CLAP + audio transformer), prefill (incl. encoding), and
greedy decode ms/token with the audio keys/values cached at prefill. It also times the naive path that re-projects
every audio token in every cross-attention layer at every step (what the original does) and prints the ratio
decode(300 s) / decode(10 s) (target <= 1.15).

    python benchmarks/bench_generate.py                      # CPU, float32, AF2-0.5B shapes
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16
    python benchmarks/bench_generate.py --config tiny --steps 8
"""

import argparse
import json
import statistics
import time

import torch

from af2_hf import AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration
from af2_hf._compat import output_cache


def shapes(name: str) -> AudioFlamingo2Config:
    htsat_large = dict(patch_embeds_hidden_size=256, depths=[2, 2, 12, 2], num_attention_heads=[4, 8, 16, 32])
    if name == "tiny":
        audio = dict(patch_embeds_hidden_size=32, depths=[2, 2, 2, 2], num_attention_heads=[2, 4, 8, 16])
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1004)
        extra = dict(audio_transformer_num_layers=2, audio_transformer_num_heads=4, audio_transformer_intermediate_size=128)
    elif name == "0.5b":
        audio, extra = htsat_large, {}
        text = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151669)
    elif name == "1.5b":
        audio, extra = htsat_large, {}
        text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151669)
    elif name == "3b":
        audio, extra = htsat_large, {}
        text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, vocab_size=151669)
    else:
        raise ValueError(f"unknown config {name!r}")
    audio = dict(audio, enable_fusion=False)
    text = dict(text, model_type="qwen2", tie_word_embeddings=True, max_position_embeddings=32768)
    return AudioFlamingo2Config(audio_config=audio, text_config=text, **extra)


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> AudioFlamingo2ForConditionalGeneration:
    """A random-weight model of the named shapes, gates open so that the audio path does real work."""
    torch.manual_seed(0)
    # Built on the device in the dtype, as from_pretrained(..., dtype=...) loads a checkpoint (float32 rotary
    # frequencies kept); a 3B model is not initialised in float32 on the host first.
    with torch.device(device):
        model = AudioFlamingo2ForConditionalGeneration._from_config(shapes(name), dtype=dtype).eval()
    with torch.no_grad():
        for block in model.model.cross_attention_layers:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


@torch.inference_mode()
def interleaved_decode(model, input_ids, contexts, steps, naive):
    """Prefill every context, then time `steps` greedy single-token steps, alternating between the contexts at
    every step so that machine load drifts affect all of them alike. Returns [(prefill s, ms/token)]."""
    device = input_ids.device
    states = []
    for feats, mask in contexts:
        out, prefill = timed(lambda: model(input_ids=input_ids, input_features=feats, input_features_mask=mask), device)
        states.append(dict(cache=output_cache(out), audio=out.audio_hidden_states, mask=mask, prefill=prefill,
                           token=out.logits[:, -1:].argmax(-1), times=[]))
    attention = torch.ones(input_ids.shape[0], input_ids.shape[1] + steps + 1, dtype=torch.long, device=device)
    for i in range(steps):
        for state in states:
            kwargs = dict(input_ids=state["token"], cache=state["cache"], input_features_mask=state["mask"],
                          attention_mask=attention[:, : input_ids.shape[1] + i + 1])
            if naive:  # re-project every audio token in every cross-attention layer at every step
                kwargs["audio_hidden_states"] = state["audio"]
            out, t = timed(lambda: model(**kwargs), device)
            state["times"].append(t)
            state["token"] = out.logits[:, -1:].argmax(-1)
    return [(s["prefill"], 1000 * statistics.median(s["times"])) for s in states]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="0.5b", choices=["tiny", "0.5b", "1.5b", "3b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seconds", default="10,300", help="audio lengths to compare (comma separated)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per length")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive (K/V recomputed) comparison")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model(args.config, device, dtype)
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    print(f"config={args.config} params={params / 1e6:.1f}M device={device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} steps={args.steps}")

    rows, contexts = [], []
    input_ids = torch.randint(0, 1000, (1, args.prompt_tokens), device=device)
    for seconds in [int(s) for s in args.seconds.split(",")]:
        windows = max(1, -(-seconds // 10))
        feats = (torch.randn(1, windows, 1001, config.audio_config.num_mel_bins, device=device) * 20 - 40).to(dtype)
        mask = torch.ones(1, windows, dtype=torch.long, device=device)
        with torch.inference_mode():
            model.get_audio_features(feats, mask)  # warm-up
            _, encode = timed(lambda: model.get_audio_features(feats, mask), device)
        contexts.append((feats, mask))
        rows.append(dict(seconds=seconds, windows=windows, audio_tokens=windows * config.tokens_per_window,
                         encode_s=encode))
    interleaved_decode(model, input_ids, contexts, 2, naive=False)  # warm-up
    for row, (prefill, ms) in zip(rows, interleaved_decode(model, input_ids, contexts, args.steps, naive=False)):
        row.update(prefill_s=prefill, decode_ms=ms, naive_decode_ms=None)
    if not args.no_naive:
        for row, (_, ms) in zip(rows, interleaved_decode(model, input_ids, contexts, args.steps, naive=True)):
            row["naive_decode_ms"] = ms

    print()
    print("| audio | windows | audio tokens | encode (s) | prefill (s) | decode ms/token | tokens/s | naive ms/token | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        naive = f"{r['naive_decode_ms']:.2f}" if r["naive_decode_ms"] else "-"
        speedup = f"{r['naive_decode_ms'] / r['decode_ms']:.2f}x" if r["naive_decode_ms"] else "-"
        print(f"| {r['seconds']} s | {r['windows']} | {r['audio_tokens']} | {r['encode_s']:.3f} | {r['prefill_s']:.3f} | "
              f"{r['decode_ms']:.2f} | {1000 / r['decode_ms']:.1f} | {naive} | {speedup} |")
    ratio = rows[-1]["decode_ms"] / rows[0]["decode_ms"]
    print(f"\ndecode({rows[-1]['seconds']} s) / decode({rows[0]['seconds']} s) = {ratio:.3f}  (target <= 1.15)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=args.config, device=str(device), dtype=args.dtype, rows=rows, ratio=ratio), f, indent=1)


if __name__ == "__main__":
    main()
