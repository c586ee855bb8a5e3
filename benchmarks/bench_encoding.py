"""Audio encoding speed and memory: the HTSAT (AF-CLAP) tower, which dominates encoding, by attention path, against
the float32 matrix-product floor of this machine. Every figure is a ratio taken within this one run.

Speed (random weights of `--config` shapes, `--windows` 10 s windows in one tower call, as `audio_tower_batch_size`
feeds them): the tower with transformers' eager window attention (the original's op sequence: matmul, bias add,
softmax, matmul), with af2-hf's fused SDPA window attention (the default), and with `--compile` the fused tower under
`torch.compile`; the runs of the variants are interleaved so that machine load drifts affect them alike. The floor:
the tower's floating-point operations (counted with `FlopCounterMode`) / the float32 matrix-product rate measured here
on one large product. Also printed: where the fused tower's time goes (profiler), and, as information, the tower with
oneDNN's implicit bfloat16 matrix products (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`) and its error.

Memory (`--memory`): one process per `audio_tower_batch_size` encodes `--memory-windows` windows
(`get_audio_features`) and reports how much it raised the process's peak RSS.

    python benchmarks/bench_encoding.py --config 0.5b --windows 8 --repeats 3 --compile --memory
    python benchmarks/bench_encoding.py --config tiny --windows 2 --repeats 1     # seconds; what the tests run
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_generate import build_model, shapes
from measure import elapsed, relative_error


def matmul_rate(size: int = 4096, repeats: int = 5) -> float:
    """float32 matrix-product rate of this machine in FLOP/s (one large square product, best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(elapsed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def profile_shares(run) -> dict:
    """Self CPU time of one call, grouped: matrix products, attention, copies, GELU, the rest."""
    groups = {"matrix products": ("aten::addmm", "aten::mm", "aten::bmm"), "copies": ("aten::copy_",),
              "attention (softmax / SDPA)": ("aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu"),
              "GELU": ("aten::gelu",)}
    with torch.profiler.profile() as prof:
        run()
    times = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    total = sum(times.values())
    shares = {name: sum(times.get(op, 0) for op in ops) / total for name, ops in groups.items()}
    shares["other"] = 1 - sum(shares.values())
    return shares


@torch.inference_mode()
def speed(args, rows):
    model = build_model(args.config, torch.device("cpu"), torch.float32)
    tower = model.model.audio_tower
    torch.manual_seed(0)
    features = torch.randn(args.windows, 1, 1001, model.config.audio_config.num_mel_bins) * 20 - 40

    def run_with(implementation, compiled=None):
        def run():
            model.config._attn_implementation_internal = implementation
            return (tower if compiled is None else compiled)(features).last_hidden_state
        return run

    variants = {"eager window attention": run_with("eager"), "fused SDPA window attention": run_with("sdpa")}
    if args.compile:
        variants["fused SDPA + torch.compile"] = run_with("sdpa", torch.compile(tower, dynamic=False))
    reference = variants["eager window attention"]()
    errors = {name: relative_error(run(), reference) for name, run in variants.items()}  # also warms up / compiles
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            times[name].append(elapsed(run))
    with FlopCounterMode(display=False) as counter:
        variants["fused SDPA window attention"]()
    flops, rate = counter.get_total_flops(), matmul_rate()
    floor = flops / rate
    base = statistics.median(times["eager window attention"])
    for name, samples in times.items():
        seconds = statistics.median(samples)
        rows.append(dict(measure=name, seconds=seconds, vs_eager=seconds / base, floor_s=floor,
                         achieved_over_floor=floor / seconds, relative_error_vs_eager=errors[name]))
    shares = profile_shares(variants["fused SDPA window attention"])
    rows.append(dict(measure="profile fused SDPA", **shares))
    rows.append(implicit_bf16(variants["fused SDPA window attention"], reference, base))
    return flops, rate


def implicit_bf16(run, reference, base) -> dict:
    """The fused tower with oneDNN's bfloat16 matrix products for float32 inputs (AMX where the CPU has it)."""
    backend = torch.backends.mkldnn.matmul
    saved = backend.fp32_precision
    try:
        backend.fp32_precision = "bf16"
        error = relative_error(run(), reference)
        seconds = statistics.median(elapsed(run) for _ in range(2))
    finally:
        backend.fp32_precision = saved
    return dict(measure="fused SDPA, implicit bf16 matmuls (not used)", seconds=seconds, vs_eager=seconds / base,
                relative_error_vs_eager=error)


def memory_child(config: str, windows: int, batch_size: int) -> None:
    """In a fresh process: encode `windows` windows with `audio_tower_batch_size=batch_size` (0: all at once) and
    print how far the peak RSS rose above the RSS before it (MiB), and the seconds."""
    model = build_model(config, torch.device("cpu"), torch.float32)
    model.config.audio_tower_batch_size = batch_size or None
    features = torch.randn(1, windows, 1001, model.config.audio_config.num_mel_bins) * 20 - 40
    mask = torch.ones(1, windows, dtype=torch.long)
    before = reset_peak_rss()
    with torch.inference_mode():
        seconds = elapsed(lambda: model.get_audio_features(features, mask))
    print(json.dumps(dict(peak_rss_rise_mib=(proc_status_kib("VmHWM") - before) / 1024, seconds=seconds)))


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def reset_peak_rss() -> int:
    """Reset the process's peak RSS (VmHWM) to its RSS now (Linux: /proc/self/clear_refs) so that the peak measured
    next is the next step's, not the model construction's; returns the RSS now in KiB."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return proc_status_kib("VmRSS")


def memory(args, rows):
    for batch_size in args.batch_sizes:
        result = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(batch_size), "--config", args.config,
             "--memory-windows", str(args.memory_windows)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)},
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        label = batch_size or "all"
        rows.append(dict(measure=f"encode {args.memory_windows} windows, audio_tower_batch_size={label}", **measured))


def print_tables(args, flops, rate, rows):
    print(f"tower FLOPs for {args.windows} windows: {flops / 1e9:.0f} G; float32 matrix-product rate "
          f"{rate / 1e9:.0f} GFLOP/s; floor {flops / rate:.2f} s\n")
    print("| tower | s | x eager | achieved/floor | rel. error vs eager |\n|---|---|---|---|---|")
    for row in rows:
        if "seconds" in row and "vs_eager" in row:
            floor = f"{row['achieved_over_floor']:.2f}" if "achieved_over_floor" in row else "-"
            print(f"| {row['measure']} | {row['seconds']:.2f} | {row['vs_eager']:.2f} | {floor} | "
                  f"{row['relative_error_vs_eager']:.1e} |")
    shares = next(row for row in rows if row["measure"] == "profile fused SDPA")
    print("\nfused tower time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if k != "measure"))
    memory_rows = [row for row in rows if "peak_rss_rise_mib" in row]
    if memory_rows:
        print("\n| memory | peak RSS rise MiB | s |\n|---|---|---|")
        for row in memory_rows:
            print(f"| {row['measure']} | {row['peak_rss_rise_mib']:.0f} | {row['seconds']:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="0.5b", choices=["tiny", "0.5b", "1.5b", "3b"])
    parser.add_argument("--windows", type=int, default=8, help="windows per tower call (default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the fused tower under torch.compile")
    parser.add_argument("--memory", action="store_true", help="peak RSS by audio_tower_batch_size (subprocesses)")
    parser.add_argument("--memory-windows", type=int, default=30)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 0], help="0: all windows at once")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default="bench_encoding.json")
    args = parser.parse_args()
    if args.memory_child is not None:
        return memory_child(args.config, args.memory_windows, args.memory_child)
    shapes(args.config)  # unknown names fail before any work
    print(f"config={args.config} threads={torch.get_num_threads()} load average={os.getloadavg()[0]:.1f} "
          f"torch={torch.__version__}", flush=True)
    rows = []
    flops, rate = speed(args, rows)
    if args.memory:
        memory(args, rows)
    print_tables(args, flops, rate, rows)
    with open(args.json, "w") as handle:
        json.dump(dict(config=args.config, windows=args.windows, flops=flops, matmul_rate=rate, rows=rows), handle,
                  indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
