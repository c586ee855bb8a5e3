"""Decode speed and quality by precision: float32, mixed (language model + cross-attention in bfloat16, audio path in
float32) and torchao weight-only int8 (audio path skipped), against a plain Qwen2ForCausalLM with the same LM
weights and against the weight-read floor. Every figure is a ratio taken within this one run.

Speed (random weights of `--config` shapes, batch 1, one 10 s clip): after one prefill per variant, single decode
steps of all variants are timed in turn, step by step, so that machine load drifts affect them alike. Also printed:
the aten ops one decode step launches (counted with a TorchDispatchMode) and the bytes it must read.

Quality (the converted golden tiny checkpoint, `../shared/golden/tiny`): each precision is loaded the standard way,
`from_pretrained(dir, dtype=torch.bfloat16)` (the model declares its audio path `_keep_in_fp32_modules_strict`) and
`from_pretrained(dir, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))` (`modules_to_not_convert`: the
model's `_keep_in_fp32_modules_strict`), and compared with the golden greedy and beam ids and logits of case A.

    python benchmarks/bench_precision.py --config 0.5b --steps 8
    python benchmarks/bench_precision.py --config tiny --steps 2          # seconds; what the tests run

int8 needs torchao (`pip install torchao`); without it the int8 rows are left out and the run says so.
"""

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2ForCausalLM
from transformers.quantizers.quantizers_utils import should_convert_module

from af2_hf import AudioFlamingo2ForConditionalGeneration
from af2_hf._compat import CACHE_KEY, output_cache
from bench_generate import build_model
from run import cache_bytes, copy_bandwidth


GOLDEN = Path(os.environ.get("AF2_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared/golden/tiny"))


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


@torch.inference_mode()
def interleaved_steps(variants, input_ids, feats, mask, steps):
    """Prefill each variant, then time `steps` single-token decode steps, the variants in turn at every step.
    Returns {name: (median ms/step, aten ops in one step)}."""
    states = {}
    for name, model in variants.items():
        kwargs = dict(input_ids=input_ids)
        if isinstance(model, AudioFlamingo2ForConditionalGeneration):
            kwargs.update(input_features=feats.to(model.model.audio_tower.dtype), input_features_mask=mask)
        out = model(**kwargs, use_cache=True)
        states[name] = dict(cache=output_cache(out), token=out.logits[:, -1:].argmax(-1), times=[], ops=None)
    length = input_ids.shape[1]
    for step in range(steps + 1):
        attention = torch.ones(1, length + step + 1, dtype=torch.long)
        for name, model in variants.items():
            state = states[name]
            kwargs = dict(input_ids=state["token"], attention_mask=attention, **{CACHE_KEY: state["cache"]})
            if isinstance(model, AudioFlamingo2ForConditionalGeneration):
                kwargs["input_features_mask"] = mask
            if step == 0:  # warm-up step, counted
                with OpCounter() as counter:
                    out = model(**kwargs)
                state["ops"] = counter.count
            else:
                start = time.perf_counter()
                out = model(**kwargs)
                state["times"].append(time.perf_counter() - start)
            state["token"] = out.logits[:, -1:].argmax(-1)
    return {name: (1000 * statistics.median(s["times"]), s["ops"]) for name, s in states.items()}


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
    tokens = args.prompt_tokens + args.steps
    base_ms = results["float32"][0]
    for name, (ms, ops) in results.items():
        read = step_weight_bytes(variants[name])
        if isinstance(variants[name], AudioFlamingo2ForConditionalGeneration):
            dtype = torch.float32 if name != "mixed bf16" else torch.bfloat16
            read += cache_bytes(variants[name], 1, tokens, config.tokens_per_window, dtype)
        floor_ms = 1000 * read / bandwidth
        rows.append(dict(measure=f"decode b1 10s {name}", ms=ms, ops=ops, read_mib=read / 2**20,
                         vs_float32=ms / base_ms, vs_plain_qwen2=ms / results["plain Qwen2 float32"][0],
                         floor_ms=floor_ms, achieved_over_floor=floor_ms / ms))
    return bandwidth


@torch.inference_mode()
def quality(golden_dir, int8_config, rows):
    """Golden A: greedy/beam ids and logits of each precision vs the original's float32 golden data."""
    from safetensors.torch import load_file

    from af2_hf.convert_af2 import convert_af2_checkpoint

    golden = load_file(str(golden_dir / "expected.safetensors"))
    spec = json.loads((golden_dir / "expected.json").read_text())
    greedy = dict(spec["generation"]["greedy"])
    beam = {key: value for key, value in spec["generation"]["beam"].items() if key != "case"}
    folder = Path(tempfile.mkdtemp(prefix="af2_precision_")) / "converted"
    convert_af2_checkpoint(golden_dir / "original", golden_dir / "base_lm", folder, dtype="float32")
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
    parser.add_argument("--golden", default=str(GOLDEN), help="golden folder (default ../shared/golden/tiny)")
    args = parser.parse_args()
    int8_config = torchao_int8()
    load = os.getloadavg()[0]
    print(f"config={args.config} threads={torch.get_num_threads()} load average={load:.1f} torch={torch.__version__}"
          + ("" if int8_config is not None else "  (torchao not installed: no int8 rows)"), flush=True)
    rows = []
    quality(Path(args.golden), int8_config, rows)
    bandwidth = speed(args, int8_config, rows)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| precision | ms/step | x float32 | x plain Qwen2 | achieved/floor | MiB read/step | aten ops/step |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "ms" in row:
            print(f"| {row['measure'].removeprefix('decode b1 10s ')} | {row['ms']:.1f} | {row['vs_float32']:.2f} | "
                  f"{row['vs_plain_qwen2']:.2f} | {row['achieved_over_floor']:.2f} | {row['read_mib']:.0f} | "
                  f"{row['ops']} |")
    print("\n| golden A | greedy ids | greedy agreement | beam ids | max abs logit error | rel logit error |"
          " audio path float32 |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "greedy_ids_equal" in row:
            print(f"| {row['measure'].removeprefix('golden A ')} | {'same' if row['greedy_ids_equal'] else 'DIFFER'} "
                  f"| {row['greedy_agreement']:.3f} | {'same' if row['beam_ids_equal'] else 'DIFFER'} | "
                  f"{row['max_logit_error']:.2e} | {row['relative_logit_error']:.2e} | {row['audio_path_float32']} |")
    with open(args.json, "w") as handle:
        json.dump(dict(config=args.config, load_average=load, bandwidth=bandwidth, rows=rows), handle, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
