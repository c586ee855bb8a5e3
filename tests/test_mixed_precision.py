"""Mixed precision and quantization declarations: `from_pretrained(dtype=bfloat16/float16)` keeps the audio path
(HTSAT tower, audio transformer) in float32 through `_keep_in_fp32_modules_strict`, the golden A greedy and beam
ids stay identical, and the quantizers' skip rule, given that list as `modules_to_not_convert`, leaves every
audio-path module unquantized while the language model and the cross-attention blocks are quantized."""

import json
import warnings

import pytest
import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from af2_hf import AudioFlamingo2ForConditionalGeneration
from af2_testing import converted_tiny_dir, golden_dir


AUDIO_PATH = ("model.audio_tower.", "model.audio_transformer.")


def load(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-sub-config dict form is deprecated upstream
        return AudioFlamingo2ForConditionalGeneration.from_pretrained(converted_tiny_dir(), dtype=dtype).eval()


def golden_inputs(golden, case):
    return dict(input_ids=golden[f"{case}.input_ids"], input_features=golden[f"{case}.mel"][None],
                input_features_mask=golden[f"{case}.window_mask"][None])


def generation_kwargs():
    spec = json.loads((golden_dir() / "expected.json").read_text())
    beam = {key: value for key, value in spec["generation"]["beam"].items() if key != "case"}
    return dict(spec["generation"]["greedy"]), beam


def check_dtypes(model, text_dtype):
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue  # HTSAT's integer buffers (relative_position_index, num_batches_tracked) stay integer
        expected = torch.float32 if name.startswith(AUDIO_PATH) else text_dtype
        if name.endswith("inv_freq"):
            expected = torch.float32  # rotary frequencies are float32 buffers in every mode
        assert tensor.dtype == expected, (name, tensor.dtype)
    for name, tensor in model.named_buffers():
        if name.endswith("relative_position_index"):
            assert tensor.dtype == torch.int64, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_audio_path_float32_and_golden_ids(golden, dtype):
    model = load(dtype)
    check_dtypes(model, dtype)
    greedy, beam = generation_kwargs()
    with torch.inference_mode():
        audio = model.get_audio_features(golden["a.mel"][None], golden["a.window_mask"][None]).last_hidden_state
        assert audio.dtype == torch.float32
        assert torch.equal(model.generate(**golden_inputs(golden, "a"), **greedy), golden["a.greedy_ids"])
        if dtype == torch.bfloat16:
            assert torch.equal(model.generate(**golden_inputs(golden, "a"), **beam), golden["a.beam_ids"])


def test_per_sub_config_dtype_dict_gives_the_same_mixed_model():
    """transformers (5.17 to 5.24) maps a per-sub-config dtype dict to its "" entry for every module; the
    float32 audio path then comes from the model's declaration, as with a plain dtype."""
    model = load({"text_config": torch.bfloat16, "audio_config": torch.float32, "": torch.bfloat16})
    check_dtypes(model, torch.bfloat16)


def test_quantizers_skip_the_audio_path():
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(converted_tiny_dir())
    skip = list(AudioFlamingo2ForConditionalGeneration._keep_in_fp32_modules_strict)
    linear = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    audio = [name for name in linear if name.startswith(AUDIO_PATH)]
    text = [name for name in linear if not name.startswith(AUDIO_PATH)]
    assert audio and text
    assert not any(should_convert_module(name, skip) for name in audio)
    assert all(should_convert_module(name, skip) for name in text)
    assert any(".cross_attention_layers." in name for name in text)
