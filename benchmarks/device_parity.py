"""Golden parity on a device (CUDA checks for machines with a GPU; also runs on CPU).

Converts the golden original release (../shared/golden/tiny, or --golden), loads it on --device and compares every
stage with the original implementation's outputs: log-mel features computed on the device from the waveform (and
from a waveform tensor already there, which must stay there), AF-CLAP output, audio embeddings, logits (single,
padded batch), greedy ids and step logits, beam ids; in float32 (the project bar: ||err|| / ||ref|| <= 1e-4 per
stage, ids exact) and, for information, the same model in bfloat16 (agreement of the greedy ids and relative errors;
not a pass/fail criterion). AF-CLAP (../shared/golden/clap_tiny, or --clap-golden): embeddings, T5 states, logits and
zero-shot argmax on the device (:func:`afclap_parity`). Also: greedy decoding with a static cache + fullgraph torch.compile, the
audio-question-answering pipeline on the device, and on CUDA three cached decode steps without host synchronisation.

    python benchmarks/device_parity.py --device cuda --json parity.json
    python benchmarks/device_parity.py --device cpu --no-compile

Exits 1 when a float32 check fails.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CompileConfig, pipeline

from af2_hf import AudioFlamingo2FeatureExtractor, AudioFlamingo2ForConditionalGeneration, AudioQuestionAnsweringPipeline
from af2_hf._compat import output_cache
from golden_tiny import DEFAULT_GOLDEN_DIR, load_golden_tiny
from measure import relative_error as rel

TOL = 1e-4


def afclap_parity(device: torch.device, clap_golden_dir: Path, model_dir: Path | None = None) -> list[tuple]:
    """AF-CLAP on ``device`` against the original (../shared/golden/clap_tiny): ``(check, value, ok, unit)`` rows for
    the HTSAT embedding, the normalised audio/text embeddings, the T5 states, the logits and the zero-shot argmax in
    float32 (max-norm relative error <= 1e-4, the golden README's measure), and the logits in bfloat16 for
    information. The fusion crops are the ones the original drew."""
    from af2_hf import AFClapModel, AFClapProcessor
    from af2_hf.convert_afclap import convert_afclap_checkpoint

    golden = load_file(str(clap_golden_dir / "expected.safetensors"))
    spec = json.loads((clap_golden_dir / "expected.json").read_text())
    if model_dir is None:
        model_dir = Path(tempfile.mkdtemp(prefix="afclap_parity_")) / "converted"
        convert_afclap_checkpoint(clap_golden_dir / spec["files"]["checkpoint"], clap_golden_dir / spec["files"][
            "t5_stand_in"], model_dir, verbose=False)
    processor = AFClapProcessor.from_pretrained(model_dir)
    names = list(spec["clips"])
    crops = [None if spec["fusion"][n]["fusion_choice"] is None else tuple(
        spec["fusion"][n]["fusion_choice"][k] for k in ("idx_front", "idx_middle", "idx_back")) for n in names]
    inputs = processor(text=json.loads((clap_golden_dir / "labels.json").read_text()), crop_indices=crops,
                       audio=[str(clap_golden_dir / "audio" / spec["clips"][n]["file"]) for n in names])

    def max_norm(actual, expected):
        actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
        return ((actual - expected).abs().max() / expected.abs().max()).item()

    rows = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        model = AFClapModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        features = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        with torch.inference_mode():
            out = model(**features)
            if dtype_name == "float32":
                stages = {
                    "audio.embedding": model.encode_audio(features["input_features"], features["is_longer"])
                    .pooler_output,
                    "audio.embed": out.audio_embeds,
                    "text.last_hidden_state": out.text_model_output.last_hidden_state,
                    "text.embed": out.text_embeds,
                    "logits_per_audio": out.logits_per_audio,
                }
                for name, value in stages.items():
                    err = max_norm(value, golden[name])
                    rows.append((f"afclap {name} on {device.type}", err, err <= TOL, "rel"))
                same = torch.equal(out.logits_per_audio.argmax(-1).cpu(), golden["logits_per_audio"].argmax(-1))
                rows.append((f"afclap zero-shot argmax on {device.type}", float(same), same, "exact"))
            else:
                rows.append((f"afclap logits_per_audio {dtype_name}", max_norm(out.logits_per_audio,
                             golden["logits_per_audio"]), True, "rel (information)"))
        del model
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--golden", default=str(DEFAULT_GOLDEN_DIR))
    parser.add_argument("--no-compile", action="store_true", help="skip the static cache + torch.compile check")
    parser.add_argument("--json", default="device_parity.json")
    parser.add_argument("--clap-golden",
                        default=str(Path(__file__).resolve().parents[1].parent / "shared/golden/clap_tiny"),
                        help="AF-CLAP golden folder (default ../shared/golden/clap_tiny)")
    args = parser.parse_args()

    golden_dir, device = Path(args.golden), torch.device(args.device)
    tiny = load_golden_tiny(golden_dir, prefix="af2_parity_")
    golden, spec, out_dir = tiny.tensors, tiny.spec, tiny.converted_dir
    greedy_kwargs, beam_kwargs = tiny.greedy_kwargs, tiny.beam_kwargs
    extractor = AudioFlamingo2FeatureExtractor.from_pretrained(out_dir)

    rows, failures = [], []

    def check(name, value, ok, unit="rel"):
        rows.append(dict(check=name, value=value, unit=unit, ok=ok))
        if not ok:
            failures.append(name)

    def on_device(case, dtype):
        mel = golden[f"{case}.mel"][None].to(device=device, dtype=dtype)
        return dict(input_ids=golden[f"{case}.input_ids"].to(device), input_features=mel,
                    input_features_mask=golden[f"{case}.window_mask"][None].to(device))

    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        model = AudioFlamingo2ForConditionalGeneration.from_pretrained(out_dir, dtype=dtype).to(device).eval()
        strict = dtype_name == "float32"
        for case in ("a", "b", "c"):
            inputs = on_device(case, dtype)
            with torch.inference_mode():
                if strict:
                    feats = extractor(golden[f"{case}.waveform"].numpy(), sampling_rate=extractor.sampling_rate,
                                      return_tensors="pt", device=str(device))
                    mel_err = rel(feats["input_features"][0], golden[f"{case}.mel"])
                    check(f"{case} log-mel on {device.type}", mel_err, mel_err <= TOL)
                    # a waveform tensor already on the device: features computed (and returned) there, unchanged
                    resident = extractor(golden[f"{case}.waveform"].to(device), sampling_rate=extractor.sampling_rate,
                                         return_tensors="pt")["input_features"]
                    same = resident.device == feats["input_features"].device and torch.equal(
                        resident, feats["input_features"])
                    check(f"{case} log-mel from a {device.type} tensor stays there", float(same), same, "exact")
                    clap = model.model.audio_tower(inputs["input_features"][0][:, None])
                    clap = clap.last_hidden_state.flatten(2).transpose(1, 2)
                    err = rel(clap, golden[f"{case}.clap_out"])
                    check(f"{case} clap_out", err, err <= TOL)
                audio = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).last_hidden_state
                err = rel(audio, golden[f"{case}.audio_embeds"])
                check(f"{case} audio_embeds {dtype_name}", err, err <= TOL or not strict)
                logits = model(**inputs).logits
                err = rel(logits, golden[f"{case}.logits"])
                check(f"{case} logits {dtype_name}", err, err <= TOL or not strict)
                out = model.generate(**inputs, **greedy_kwargs, output_logits=True, return_dict_in_generate=True)
                expected = golden[f"{case}.greedy_ids"]
                same = out.sequences.shape == expected.shape and torch.equal(out.sequences.cpu(), expected)
                agree = (out.sequences.cpu()[0, : expected.shape[1]] == expected[0, : out.sequences.shape[1]]).float()
                check(f"{case} greedy ids {dtype_name}", agree.mean().item(), same or not strict, "agreement")
                if strict:
                    steps = torch.cat(out.logits).float()
                    err = rel(steps, golden[f"{case}.greedy_step_logits"])
                    check(f"{case} greedy step logits", err, err <= TOL)
        if strict:
            with torch.inference_mode():
                out = model.generate(**on_device("a", dtype), **beam_kwargs)
            check("a beam ids", float(torch.equal(out.cpu(), golden["a.beam_ids"])),
                  torch.equal(out.cpu(), golden["a.beam_ids"]), "exact")
            # padded batch (a, b): right-padded windows, left-padded text, attended positions only
            windows = golden["b.mel"].shape[0]
            feats = torch.full((2, windows, 1001, 64), -100.0)
            mask = torch.zeros(2, windows, dtype=torch.long)
            for i, case in enumerate(("a", "b")):
                n = golden[f"{case}.mel"].shape[0]
                feats[i, :n], mask[i, :n] = golden[f"{case}.mel"], 1
            attention = golden["batch.attention_mask"]
            with torch.inference_mode():
                out = model(input_ids=golden["batch.input_ids"].to(device), attention_mask=attention.to(device),
                            input_features=feats.to(device), input_features_mask=mask.to(device))
            err = rel(out.logits.cpu()[attention.bool()], golden["batch.logits"][attention.bool()])
            check("batch logits (attended)", err, err <= TOL)
            if device.type == "cuda":
                # A cached decode step must not synchronise with the host: run three under sync-debug "error" (no
                # text padding, so no 2-D attention mask: transformers' own mask helpers may inspect one on the host).
                inputs = on_device("c", dtype)
                with torch.inference_mode():
                    out = model(**inputs)
                    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        for step in range(3):
                            length = inputs["input_ids"].shape[1] + step + 1
                            position = torch.full((1, 1), length - 1, dtype=torch.long, device=device)
                            out = model(input_ids=token, cache=cache, position_ids=position,
                                        input_features_mask=inputs["input_features_mask"])
                            token = out.logits[:, -1:].argmax(-1)
                        synced = None
                    except RuntimeError as error:
                        synced = str(error).splitlines()[0]
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                check("decode step without host sync", float(synced is None), synced is None,
                      "ok" if synced is None else synced)
            if not args.no_compile:
                config = CompileConfig(fullgraph=True)
                config._compile_all_devices = True
                with torch.inference_mode():
                    out = model.generate(**on_device("a", dtype), **greedy_kwargs, cache_implementation="static",
                                         compile_config=config)
                ok = torch.equal(out.cpu(), golden["a.greedy_ids"])
                check("a greedy ids static+compile", float(ok), ok, "exact")
        del model

    # The audio-question-answering pipeline on the device, from the golden audio file to the golden answer (a
    # machine without soundfile fails this row with the reason, not the whole report).
    try:
        pipe = pipeline("audio-question-answering", model=str(out_dir), device=device,
                        pipeline_class=AudioQuestionAnsweringPipeline)
        answer = pipe(str(golden_dir / "audio" / spec["audio_files"]["a"]["file"]), question=spec["prompts"]["a"],
                      do_sample=False, max_new_tokens=greedy_kwargs["max_new_tokens"])["answer"]
        ok, unit = answer == spec["decoded"]["a.greedy"], "exact"
    except Exception as error:  # reported as a failed check
        ok, unit = False, f"{type(error).__name__}: {error}"[:200]
    check(f"pipeline answer on {device.type}", float(ok), ok, unit)

    if Path(args.clap_golden, "expected.safetensors").is_file():
        for name, value, ok, unit in afclap_parity(device, Path(args.clap_golden)):
            check(name, value, ok, unit)
    else:
        check("afclap golden folder", 0.0, False, f"missing: {args.clap_golden}")

    width = max(len(r["check"]) for r in rows)
    print(f"device={device} torch={torch.__version__}")
    print(f"| {'check':<{width}} | value | unit | ok |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for r in rows:
        print(f"| {r['check']:<{width}} | {r['value']:.3g} | {r['unit']} | {'yes' if r['ok'] else 'NO'} |")
    Path(args.json).write_text(json.dumps(dict(device=str(device), rows=rows, failures=failures), indent=1))
    print(f"\n{len(rows) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
