"""Decode speed and quality by precision: float32, mixed (language model + cross-attention in bfloat16, audio path in
float32) and torchao weight-only int8 (audio path skipped), against a plain Qwen2ForCausalLM with the same LM
weights and against the weight-read floor. Every figure is a ratio taken within this one run.

Speed (random weights of `--config` shapes, batch 1, one 10 s clip): after one prefill per variant, single decode
steps of all variants are timed in turn, step by step, so that machine load drifts affect them alike. Also printed:
the aten ops one decode step launches (counted with a TorchDispatchMode), the bytes it must read, and the share of
the float32 step spent in matrix products (profiler). Two floors: those bytes / the copy bandwidth (read + write of a
large buffer, as `run.py` measures it) and / the read bandwidth (a sum over a large buffer: a step only reads).
With `--compile`, generate() itself is timed (ms between consecutive new tokens, `--repeats` runs per variant, the
variants in turn): float32 and mixed bf16, eager with the dynamic cache and compiled with a static cache
(`CompileConfig(fullgraph=True)`), with the kernels one compiled step launches.

Quality (the converted golden tiny checkpoint, `../shared/golden/tiny`): each precision is loaded the standard way,
`from_pretrained(dir, dtype=torch.bfloat16)` (the model declares its audio path `_keep_in_fp32_modules_strict`) and
`from_pretrained(dir, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))` (`modules_to_not_convert`: the
model's `_keep_in_fp32_modules_strict`), and compared with the golden greedy and beam ids and logits of case A.

    python benchmarks/bench_precision.py --config 0.5b --steps 8 --compile
    python benchmarks/bench_precision.py --config tiny --steps 2          # seconds; what the tests run

int8 needs torchao (`pip install torchao`); without it the int8 rows are left out and the run says so.
"""

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig, Qwen2ForCausalLM
from transformers.quantizers.quantizers_utils import should_convert_module

from af2_hf import AudioFlamingo2ForConditionalGeneration
from af2_hf._compat import CACHE_KEY, output_cache
from bench_generate import build_model
from golden_tiny import DEFAULT_GOLDEN_DIR, load_golden_tiny
from measure import elapsed
from run import StepTimer, cache_bytes, copy_bandwidth




def torchao_int8():
    """torchao's weight-only int8 config, or None when torchao is not installed."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        return None
    return Int8WeightOnlyConfig()


def tensor_bytes(tensor) -> int:
    """Storage bytes of a tensor; a tensor subclass (torchao's quantized weights) counts its inner tensors."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def step_weight_bytes(model) -> int:
    """Bytes of the weights a cached AF2 decode step reads (no audio path, no cross-attention K/V projection), or of
    every weight of a plain language model. Tied weights count once."""
    skip = set()
    if isinstance(model, AudioFlamingo2ForConditionalGeneration):
        audio = (model.model.audio_tower, model.model.audio_transformer)
        skip = {id(p) for module in audio for p in module.parameters()}
        skip |= {id(block.to_kv.weight) for block in model.model.cross_attention_layers}
    seen, total = set(), 0
    for parameter in model.parameters():
        if id(parameter) not in skip and id(parameter) not in seen:
            seen.add(id(parameter))
            total += tensor_bytes(parameter)
    return total


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active (views and factories included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def mixed(model):
    """The float32 model as `from_pretrained(dtype=torch.bfloat16)` would load it: audio path kept in float32."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.model.audio_tower.float()
    model.model.audio_transformer.float()
    return model


def quantize_int8(model, config):
    """torchao weight-only int8 on the linear layers that transformers' quantizers convert: those not matched by the
    model's `_keep_in_fp32_modules_strict` (the audio path) and not the tied input/output embedding."""
    from torchao.quantization import quantize_

    skip = list(AudioFlamingo2ForConditionalGeneration._keep_in_fp32_modules_strict)

    def convert(module, name):
        return isinstance(module, nn.Linear) and name != "lm_head" and should_convert_module(name, skip)

    model = copy.deepcopy(model)
    quantize_(model, config, filter_fn=convert)
    return model


def plain_lm(model):
    """Qwen2ForCausalLM sharing the AF2 model's language model and lm_head (no copy)."""
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(model.config.text_config)
    lm.model, lm.lm_head = model.model.language_model, model.lm_head
    return lm.eval()


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


@torch.inference_mode()
def interleaved_steps(variants, input_ids, feats, mask, steps):
    """Prefill each variant, then run single-token decode steps, the variants in turn at every step: the first
    counted (aten ops), the second profiled (share of CPU time in matrix products), the next `steps` timed.
    Returns {name: (median ms/step, aten ops in one step, matrix-product share)}."""
    states = {}
    for name, model in variants.items():
        kwargs = dict(input_ids=input_ids)
        if isinstance(model, AudioFlamingo2ForConditionalGeneration):
            kwargs.update(input_features=feats.to(model.model.audio_tower.dtype), input_features_mask=mask)
        out = model(**kwargs, use_cache=True)
        states[name] = dict(cache=output_cache(out), token=out.logits[:, -1:].argmax(-1), times=[])
    length = input_ids.shape[1]
    for step in range(steps + 2):
        attention = torch.ones(1, length + step + 1, dtype=torch.long)
        for name, model in variants.items():
            state = states[name]
            kwargs = dict(input_ids=state["token"], attention_mask=attention, **{CACHE_KEY: state["cache"]})
            if isinstance(model, AudioFlamingo2ForConditionalGeneration):
                kwargs["input_features_mask"] = mask
            if step == 0:
                with OpCounter() as counter:
                    out = model(**kwargs)
                state["ops"] = counter.count
            elif step == 1:
                with torch.profiler.profile() as prof:
                    out = model(**kwargs)
                times = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
                state["share"] = sum(times.get(op, 0) for op in MATRIX_PRODUCTS) / sum(times.values())
            else:
                start = time.perf_counter()
                out = model(**kwargs)
                state["times"].append(time.perf_counter() - start)
            state["token"] = out.logits[:, -1:].argmax(-1)
    return {name: (1000 * statistics.median(s["times"]), s["ops"], s["share"]) for name, s in states.items()}


def read_bandwidth(megabytes=1024, repeats=8) -> float:
    """Streaming read rate in bytes/s: the best of `repeats` sums over a large float32 buffer (the reads a decode
    step's matrix-vector products do, without their writes)."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()
    best = min(elapsed(buffer.sum) for _ in range(repeats))
    return buffer.numel() * 4 / best


@torch.inference_mode()
def matrix_vector_rates(text_config, repeats=10) -> dict:
    """Bytes/s of the batch-1 matrix-vector products of one decoder layer's MLP shapes (8 layers' worth, more than
    the caches hold), per kernel: torch's float32 and bfloat16 `linear`, and oneDNN's bfloat16 product on weights
    packed ahead of time (`torch.ops.mkldnn`, the kernel inductor's weight freezing calls), when this build has it."""
    hidden, inner = text_config.hidden_size, text_config.intermediate_size
    shapes = [(inner, hidden), (hidden, inner)] * 8
    rates = {}
    for name, dtype in (("float32 linear", torch.float32), ("bfloat16 linear", torch.bfloat16)):
        weights = [torch.randn(shape, dtype=dtype) for shape in shapes]
        inputs = [torch.randn(1, shape[1], dtype=dtype) for shape in shapes]
        rates[name] = rate(lambda: [nn.functional.linear(x, w) for x, w in zip(inputs, weights)], weights, repeats)
        if dtype == torch.bfloat16 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
            packed_linear = torch.ops.mkldnn._linear_pointwise
            rates["bfloat16 oneDNN packed"] = rate(
                lambda: [packed_linear(x, w, None, "none", [], "") for x, w in zip(inputs, packed)], weights, repeats)
    return rates


def rate(run, weights, repeats) -> float:
    run()
    best = min(elapsed(run) for _ in range(repeats))
    return sum(w.numel() * w.element_size() for w in weights) / best


def compile_config() -> CompileConfig:
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # generate() auto-compiles on accelerators only unless asked
    return config


def greedy_tokens(tokens: int) -> dict:
    """generate() arguments for exactly `tokens` greedy new tokens (no early stop)."""
    return dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=tokens, min_new_tokens=tokens)


@torch.inference_mode()
def timed_generates(variants, inputs, tokens, repeats):
    """Greedy fixed-length generate() per variant (name -> (model, compile config or None)), the variants in turn at
    every repeat, after one warm-up each (compilation). Returns {name: median ms between consecutive new tokens}."""
    def generate(model, config, **extra):
        static = dict(cache_implementation="static", compile_config=config) if config is not None else {}
        return model.generate(**inputs, **greedy_tokens(tokens), **static, **extra)

    for model, config in variants.values():
        generate(model, config)
    gaps = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (model, config) in variants.items():
            timer = StepTimer(torch.device("cpu"))
            generate(model, config, streamer=timer)
            gaps[name] += [later - earlier for earlier, later in zip(timer.times[2:], timer.times[3:])]
    return {name: 1000 * statistics.median(values) for name, values in gaps.items()}


@torch.inference_mode()
def kernels_per_step(model, inputs, config, tokens) -> float:
    """Kernels one compiled decode step launches: the generated C++ kernels and the library calls (matrix products)
    inside each call of the compiled graph (profiled with inductor's kernel profiling)."""
    with torch.profiler.profile() as prof:
        model.generate(**inputs, **greedy_tokens(tokens), cache_implementation="static", compile_config=config)
    calls = [event for event in prof.events() if event.name.endswith("_inductor_wrapper_call")]
    if not calls:
        raise RuntimeError("no compiled graph call was profiled: the decode steps did not run compiled")
    return sum(len(event.cpu_children) for event in calls) / len(calls)


def compiled_decode(args, variants, inputs, read_bytes, bandwidth, reading, rows):
    """float32 and mixed bf16 decoding through generate(): eager (dynamic cache) vs static cache + torch.compile;
    `read_bytes`: the bytes one step of each precision reads (the floors)."""
    with inductor_config.patch({"cpp.enable_kernel_profile": True, "profiler_mark_wrapper_call": True}):
        runs = {}
        for precision in ("float32", "mixed bf16"):
            runs[f"{precision} eager"] = (variants[precision], None, precision)
            runs[f"{precision} compiled"] = (variants[precision], compile_config(), precision)
        ms = timed_generates({name: run[:2] for name, run in runs.items()}, inputs, args.steps + 2, args.repeats)
        kernels = {name: kernels_per_step(model, inputs, cc, 3) for name, (model, cc, _) in runs.items()
                   if cc is not None}
    for name, (_, _, precision) in runs.items():
        read = read_bytes[precision]
        rows.append(dict(measure=f"generate b1 10s {name}", ms=ms[name],
                         vs_float32_eager=ms[name] / ms["float32 eager"], kernels=kernels.get(name),
                         achieved_over_floor=1000 * read / bandwidth / ms[name],
                         achieved_over_read_floor=1000 * read / reading / ms[name]))


def speed(args, int8_config, rows):
    model = build_model(args.config, torch.device("cpu"), torch.float32)
    config = model.config
    variants = {"float32": model, "mixed bf16": mixed(model), "plain Qwen2 float32": plain_lm(model)}
    if int8_config is not None:
        variants["int8 weight-only"] = quantize_int8(model, int8_config)
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (1, args.prompt_tokens))
    feats = torch.randn(1, 1, 1001, config.audio_config.num_mel_bins) * 20 - 40
    mask = torch.ones(1, 1, dtype=torch.long)
    results = interleaved_steps(variants, input_ids, feats, mask, args.steps)
    bandwidth = copy_bandwidth(torch.device("cpu"), megabytes=256)
    reading = read_bandwidth()
    tokens = args.prompt_tokens + args.steps
    base_ms = results["float32"][0]
    read_bytes = {}
    for name, (ms, ops, _) in results.items():
        read = step_weight_bytes(variants[name])
        if isinstance(variants[name], AudioFlamingo2ForConditionalGeneration):
            dtype = torch.float32 if name != "mixed bf16" else torch.bfloat16
            read += cache_bytes(variants[name], 1, tokens, config.tokens_per_window, dtype)
        floor_ms, read_bytes[name] = 1000 * read / bandwidth, read
        rows.append(dict(measure=f"decode b1 10s {name}", ms=ms, ops=ops, read_mib=read / 2**20,
                         vs_float32=ms / base_ms, vs_plain_qwen2=ms / results["plain Qwen2 float32"][0],
                         floor_ms=floor_ms, achieved_over_floor=floor_ms / ms,
                         achieved_over_read_floor=1000 * read / reading / ms))
    rows.append(dict(measure="float32 decode step matrix-product share", share=results["float32"][2]))
    rows.append(dict(measure="matrix-vector bytes/s", **matrix_vector_rates(config.text_config)))
    if args.compile:
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), input_features=feats,
                      input_features_mask=mask)
        compiled_decode(args, variants, inputs, read_bytes, bandwidth, reading, rows)
    return bandwidth, reading


@torch.inference_mode()
def quality(golden_dir, int8_config, rows):
    """Golden A: greedy/beam ids and logits of each precision vs the original's float32 golden data."""
    tiny = load_golden_tiny(golden_dir, prefix="af2_precision_")
    golden, greedy, beam, folder = tiny.tensors, tiny.greedy_kwargs, tiny.beam_kwargs, tiny.converted_dir
    loads = {"float32": {}, "mixed bf16": dict(dtype=torch.bfloat16), "mixed fp16": dict(dtype=torch.float16)}
    if int8_config is not None:
        from transformers import TorchAoConfig

        skip = list(AudioFlamingo2ForConditionalGeneration._keep_in_fp32_modules_strict)
        loads["int8 weight-only"] = dict(quantization_config=TorchAoConfig(int8_config, modules_to_not_convert=skip))
    inputs = dict(input_ids=golden["a.input_ids"], input_features=golden["a.mel"][None],
                  input_features_mask=golden["a.window_mask"][None])
    expected_ids, expected_logits = golden["a.greedy_ids"], golden["a.logits"]
    for name, kwargs in loads.items():
        model = AudioFlamingo2ForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
        logits = model(**inputs).logits.float()
        ids = model.generate(**inputs, **greedy)
        beams = model.generate(**inputs, **beam)
        n = min(ids.shape[1], expected_ids.shape[1])
        rows.append(dict(
            measure=f"golden A {name}", greedy_ids_equal=bool(torch.equal(ids, expected_ids)),
            greedy_agreement=(ids[0, :n] == expected_ids[0, :n]).float().mean().item(),
            beam_ids_equal=bool(torch.equal(beams, golden["a.beam_ids"])),
            max_logit_error=(logits - expected_logits).abs().max().item(),
            relative_logit_error=((logits - expected_logits).norm() / expected_logits.norm()).item(),
            audio_path_float32=model.model.audio_tower.dtype == torch.float32
            and all(p.dtype == torch.float32 for p in model.model.audio_transformer.parameters()),
        ))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="0.5b", choices=["tiny", "0.5b", "1.5b", "3b"])
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per variant")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--json", default="bench_precision.json")
    parser.add_argument("--golden", default=str(DEFAULT_GOLDEN_DIR),
                        help="golden folder (default ../shared/golden/tiny)")
    parser.add_argument("--compile", action="store_true",
                        help="also time generate() eager vs static cache + torch.compile, float32 and mixed bf16")
    parser.add_argument("--repeats", type=int, default=3, help="generate() runs per variant with --compile")
    args = parser.parse_args()
    int8_config = torchao_int8()
    load = os.getloadavg()[0]
    print(f"config={args.config} threads={torch.get_num_threads()} load average={load:.1f} torch={torch.__version__}"
          + ("" if int8_config is not None else "  (torchao not installed: no int8 rows)"), flush=True)
    rows = []
    quality(Path(args.golden), int8_config, rows)
    bandwidth, reading = speed(args, int8_config, rows)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), read bandwidth {reading / 1e9:.1f} GB/s, "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| precision | ms/step | x float32 | x plain Qwen2 | achieved/floor | achieved/read floor | MiB read/step |"
          " aten ops/step |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["measure"].startswith("decode b1 10s "):
            print(f"| {row['measure'].removeprefix('decode b1 10s ')} | {row['ms']:.1f} | {row['vs_float32']:.2f} | "
                  f"{row['vs_plain_qwen2']:.2f} | {row['achieved_over_floor']:.2f} | "
                  f"{row['achieved_over_read_floor']:.2f} | {row['read_mib']:.0f} | {row['ops']} |")
    share = next(row["share"] for row in rows if "share" in row)
    print(f"\nfloat32 decode step: {share:.0%} of its CPU time in matrix products")
    kernels = next(row for row in rows if row["measure"] == "matrix-vector bytes/s")
    print("batch-1 matrix-vector products (decoder MLP shapes): " + ", ".join(
        f"{name} {value / 1e9:.1f} GB/s" for name, value in kernels.items() if name != "measure"))
    generate_rows = [row for row in rows if row["measure"].startswith("generate b1 10s ")]
    if generate_rows:
        print("\n| generate() | ms/token | x float32 eager | achieved/floor | achieved/read floor | kernels/step |")
        print("|---|---|---|---|---|---|")
        for row in generate_rows:
            kernels = "-" if row["kernels"] is None else f"{row['kernels']:.0f}"
            print(f"| {row['measure'].removeprefix('generate b1 10s ')} | {row['ms']:.1f} | "
                  f"{row['vs_float32_eager']:.2f} | {row['achieved_over_floor']:.2f} | "
                  f"{row['achieved_over_read_floor']:.2f} | {kernels} |")
    print("\n| golden A | greedy ids | greedy agreement | beam ids | max abs logit error | rel logit error |"
          " audio path float32 |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "greedy_ids_equal" in row:
            print(f"| {row['measure'].removeprefix('golden A ')} | {'same' if row['greedy_ids_equal'] else 'DIFFER'} "
                  f"| {row['greedy_agreement']:.3f} | {'same' if row['beam_ids_equal'] else 'DIFFER'} | "
                  f"{row['max_logit_error']:.2e} | {row['relative_logit_error']:.2e} | {row['audio_path_float32']} |")
    with open(args.json, "w") as handle:
        json.dump(dict(config=args.config, load_average=load, bandwidth=bandwidth, read_bandwidth=reading, rows=rows),
                  handle, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
