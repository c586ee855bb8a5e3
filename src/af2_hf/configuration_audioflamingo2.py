"""Configuration of Audio Flamingo 2 (AF2) for Hugging Face Transformers, validated before any model is built.

Sizes are checked when a config is made (``@strict`` field and class validators): every size positive, heads dividing
widths (audio tower stages, audio transformer, language model, key/value groups), ``tokens_per_window`` equal to the
audio tower's geometry, and the parameter count the sizes imply below :data:`MAX_PARAMETERS_ENV` (default
:data:`DEFAULT_MAX_PARAMETERS`). ``from_pretrained`` refuses a folder of another model type before reading anything
else (:meth:`AudioFlamingo2Config.get_config_dict`).
"""

import functools
import math
import os

from huggingface_hub.dataclasses import as_validated_field, strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils.type_validators import interval

from ._compat import SubConfigSpec, build_sub_config, sub_config_specs
from .loading import ModelTypeError, check_model_path

#: Environment variable that raises (or lowers) the largest parameter count a config may describe.
MAX_PARAMETERS_ENV = "AF2_HF_MAX_PARAMETERS"
#: 100 billion parameters (200 GB in bfloat16): 20 times AF2-3B (about 4.8 B), far below a typo's 1e15.
DEFAULT_MAX_PARAMETERS = 100_000_000_000


_AUDIO_DEFAULTS = {
    "model_type": "clap_audio_model",
    "patch_embeds_hidden_size": 256,
    "depths": [2, 2, 12, 2],
    "num_attention_heads": [4, 8, 16, 32],
    "enable_fusion": False,
    "hidden_size": 2048,
}
_TEXT_DEFAULTS = {
    "model_type": "qwen2",
    "vocab_size": 151669,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}


class ConfigValidationError(ValueError):
    """An Audio Flamingo 2 config with an invalid or inconsistent size; the message names the field. (The ``@strict``
    validators' own errors are not ``ValueError``s; AF2 raises this one from them, so that callers, the CLI among
    them, catch bad configs as ``ValueError``.)"""


@as_validated_field
def _positive_float(value):
    # (transformers' interval(min=0.0, exclude_min=True) ignores a 0.0 bound before 5.2x)
    if not value > 0:
        raise ValueError(f"must be > 0, got {value}.")


@as_validated_field
def _positive_or_none(value):
    if value is not None and value < 1:
        raise ValueError(f"must be >= 1 or None, got {value}.")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _divides(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(f"{name}={value} is not divisible by {divisor_name}={divisor}.")


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def audio_tower_tokens_per_window(audio_config) -> int:
    """Tokens the HTSAT audio tower (transformers' ``ClapAudioModel``) makes of one window: its final patch grid,
    ``(spec_size // 2 ** (stages - 1) // patch_stride)`` along both axes (8 x 8 = 64 for AF-CLAP)."""
    reduction = 2 ** (len(audio_config.depths) - 1)
    stride = _pair(audio_config.patch_stride)
    return (audio_config.spec_size // reduction // stride[0]) * (audio_config.spec_size // reduction // stride[1])


def _check_audio_config(config) -> None:
    audio = config.audio_config
    depths, heads = list(audio.depths), list(audio.num_attention_heads)
    _positive("audio_config.patch_embeds_hidden_size", audio.patch_embeds_hidden_size)
    if not depths:
        raise ValueError("audio_config.depths is empty: the audio tower needs at least one stage.")
    for i, depth in enumerate(depths):
        _positive(f"audio_config.depths[{i}]", depth)
    if len(heads) != len(depths):
        raise ValueError(
            f"audio_config.num_attention_heads has {len(heads)} entries for {len(depths)} stages (audio_config.depths)."
        )
    for i, head_count in enumerate(heads):
        _positive(f"audio_config.num_attention_heads[{i}]", head_count)
        width = audio.patch_embeds_hidden_size * 2**i
        _divides(f"the width of audio tower stage {i} (audio_config.patch_embeds_hidden_size * 2**{i})", width,
                 f"audio_config.num_attention_heads[{i}]", head_count)
    for name in ("spec_size", "num_mel_bins", "window_size"):
        _positive(f"audio_config.{name}", getattr(audio, name))
    for i, stride in enumerate(_pair(audio.patch_stride)):
        _positive(f"audio_config.patch_stride[{i}]", stride)
    tokens = audio_tower_tokens_per_window(audio)
    if tokens != config.tokens_per_window:
        raise ValueError(
            f"tokens_per_window={config.tokens_per_window}, but the audio tower makes {tokens} tokens of a window "
            "(audio_config.spec_size, patch_stride and the number of stages in depths)."
        )


def _check_audio_transformer(config) -> None:
    width = config.audio_hidden_size
    _divides("the audio width (audio_config.patch_embeds_hidden_size * 2 ** (len(depths) - 1))", width,
             "audio_transformer_num_heads", config.audio_transformer_num_heads)
    rotary, head_dim = config.audio_rotary_dim, config.audio_transformer_head_dim
    if rotary % 2 or not 2 <= rotary <= head_dim:
        raise ValueError(
            f"audio_transformer_rotary_dim={rotary} must be even and between 2 and the audio transformer's head "
            f"dimension {head_dim}."
        )


def _check_text_config(config) -> None:
    text = config.text_config
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
        _positive(f"text_config.{name}", getattr(text, name))
    kv_heads = getattr(text, "num_key_value_heads", None)
    if kv_heads is not None:
        _positive("text_config.num_key_value_heads", kv_heads)
        _divides("text_config.num_attention_heads", text.num_attention_heads, "text_config.num_key_value_heads",
                 kv_heads)
    if getattr(text, "head_dim", None) is None:
        _divides("text_config.hidden_size", text.hidden_size, "text_config.num_attention_heads",
                 text.num_attention_heads)


def parameter_count_estimate(config) -> dict[str, int]:
    """Weights of each part of the model the config describes, by the sizes that set them (matrices only; biases and
    norms add well under 1 %)."""
    text, audio = config.text_config, config.audio_config
    hidden, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    width, inner = config.audio_hidden_size, config.cross_attention_num_heads * config.cross_attention_head_dim
    mlp_ratio = float(getattr(audio, "mlp_ratio", 4.0))
    stages = [audio.patch_embeds_hidden_size * 2**i for i in range(len(audio.depths))]
    tower = sum(int((4 + 2 * mlp_ratio) * w * w) * d for w, d in zip(stages, audio.depths))
    return {
        "text_config.vocab_size x text_config.hidden_size (embeddings"
        + ("" if config.tie_word_embeddings else " and lm_head") + ")":
            text.vocab_size * hidden * (1 if config.tie_word_embeddings else 2),
        "text_config.num_hidden_layers x (hidden_size, intermediate_size) (decoder layers)":
            text.num_hidden_layers * (attention + 3 * hidden * text.intermediate_size),
        "cross_attention_* (gated cross-attention blocks)": len(config.cross_attention_layers)
        * (2 * hidden * inner + 2 * width * inner + 2 * config.cross_attention_ff_mult * hidden * hidden),
        "audio_transformer_* (audio transformer)": config.audio_transformer_num_layers
        * (4 * width * width + 2 * width * config.audio_transformer_intermediate_size),
        "audio_config.patch_embeds_hidden_size x depths (audio tower)": tower + sum(8 * w * w for w in stages[:-1]),
    }


def max_parameters() -> int:
    """The largest parameter count a config may describe: ``$AF2_HF_MAX_PARAMETERS`` (e.g. ``2e11``) or
    :data:`DEFAULT_MAX_PARAMETERS`."""
    value = os.environ.get(MAX_PARAMETERS_ENV)
    if not value:
        return DEFAULT_MAX_PARAMETERS
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"{MAX_PARAMETERS_ENV}={value!r} is not a number (e.g. 2e11).") from None


def _check_parameter_count(config) -> None:
    parts = parameter_count_estimate(config)
    total, limit = sum(parts.values()), max_parameters()
    if total > limit:
        largest = max(parts, key=parts.get)
        raise ValueError(
            f"The config describes a model of about {total:.3g} parameters ({2 * total / 2**30:,.0f} GiB in "
            f"bfloat16), above the limit of {limit:.3g}; the largest part is {largest}: {parts[largest]:.3g}. "
            f"Check these sizes, or set the environment variable {MAX_PARAMETERS_ENV} (e.g. "
            f"{MAX_PARAMETERS_ENV}={10 ** math.ceil(math.log10(total)):.0e}) to build such a model on purpose."
        )


def _check_layer_counts(config_dict: dict) -> None:
    """Refuse, before any config object is made, a ``config.json`` whose layer counts alone exceed the parameter
    limit: transformers builds a per-layer list (``layer_types``) as long as ``num_hidden_layers`` while making the
    text config, so ``num_hidden_layers=10**9`` would take minutes and gigabytes before any validator could run."""
    text = config_dict.get("text_config") or {}
    checks = [("text_config.num_hidden_layers", text.get("num_hidden_layers"), text.get("hidden_size", 1)),
              ("audio_transformer_num_layers", config_dict.get("audio_transformer_num_layers"), 1)]
    for name, layers, width in checks:
        if isinstance(layers, int) and isinstance(width, int) and layers * max(width, 1) ** 2 > max_parameters():
            raise ConfigValidationError(
                f"{name}={layers} describes a model above the limit of {max_parameters():.3g} parameters; check it, "
                f"or set the environment variable {MAX_PARAMETERS_ENV} to build such a model on purpose."
            )


@strict
class AudioFlamingo2Config(PreTrainedConfig):
    r"""
    Configuration of [`AudioFlamingo2ForConditionalGeneration`]. Defaults describe the AF2-3B release: an
    HTSAT-large AF-CLAP audio tower, a 3-layer rotary audio transformer and a Qwen2.5-3B language model with a
    tanh-gated cross-attention block before every decoder layer.

    Args:
        audio_config (`ClapAudioConfig` or `dict`):
            The AF-CLAP (HTSAT) audio tower. Its output width is
            `patch_embeds_hidden_size * 2 ** (len(depths) - 1)`.
        text_config (`Qwen2Config` or `dict`):
            The language model.
        audio_transformer_num_layers (`int`): post-norm layers of the audio transformer.
        audio_transformer_num_heads (`int`): attention heads of the audio transformer.
        audio_transformer_intermediate_size (`int`): FFN width of the audio transformer.
        audio_transformer_rope_theta (`float`): rotary base of the audio transformer.
        audio_transformer_rotary_dim (`int`, *optional*): rotated dimensions per head; defaults to
            `max(head_dim // 2, 32)` as in the original.
        audio_transformer_layer_norm_eps (`float`): epsilon of every audio-transformer LayerNorm.
        cross_attention_every_n_layers (`int`): a gated cross-attention block precedes decoder layer `i` when
            `(i + 1) % cross_attention_every_n_layers == 0`.
        cross_attention_num_heads (`int`), cross_attention_head_dim (`int`), cross_attention_ff_mult (`int`):
            shape of the gated cross-attention blocks.
        tokens_per_window (`int`): audio tokens produced by the audio tower for one 10 s window.
        audio_tower_batch_size (`int`, *optional*, defaults to 4): windows the audio tower encodes per call. It
            bounds the tower's activation memory without changing the results; `None` encodes all windows of a
            batch in one call. Measured for 30 windows (HTSAT-large, float32, 2-core CPU,
            `benchmarks/bench_encoding.py --memory`): the encoding raised the peak RSS by 0.5 GiB with 4,
            0.7-0.8 GiB with 8 and 2.0 GiB with all windows at once, in times within the machine's noise.
        audio_token_id, end_of_chunk_token_id, sep_token_id, pad_token_id (`int`): AF2 special tokens.
    """

    model_type = "audioflamingo2"
    if SubConfigSpec is not None:
        sub_configs_defaults = sub_config_specs({"audio_config": _AUDIO_DEFAULTS, "text_config": _TEXT_DEFAULTS})
    else:  # pragma: no cover - transformers releases before SubConfigSpec
        sub_configs = {"audio_config": AutoConfig, "text_config": AutoConfig}

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_transformer_num_layers: int = interval(min=1)(default=3)
    audio_transformer_num_heads: int = interval(min=1)(default=8)
    audio_transformer_intermediate_size: int = interval(min=1)(default=2048)
    audio_transformer_rope_theta: float = _positive_float(default=4096.0)
    audio_transformer_rotary_dim: int | None = _positive_or_none(default=None)
    audio_transformer_layer_norm_eps: float = _positive_float(default=1e-6)
    cross_attention_every_n_layers: int = interval(min=1)(default=1)
    cross_attention_num_heads: int = interval(min=1)(default=8)
    cross_attention_head_dim: int = interval(min=1)(default=64)
    cross_attention_ff_mult: int = interval(min=1)(default=4)
    tokens_per_window: int = interval(min=1)(default=64)
    audio_tower_batch_size: int | None = _positive_or_none(default=4)
    audio_token_id: int = 151665
    end_of_chunk_token_id: int = 151666
    pad_token_id: int | None = 151667
    sep_token_id: int | None = 151668
    eos_token_id: int | list[int] | None = 151643
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:  # pragma: no cover - transformers releases before SubConfigSpec
            self.audio_config = build_sub_config(self.audio_config, _AUDIO_DEFAULTS)
            self.text_config = build_sub_config(self.text_config, _TEXT_DEFAULTS)
        super().__post_init__(**kwargs)
        # Tied embeddings follow the language model, as in Llava.
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)

    def validate_sizes(self):
        """Part of the ``@strict`` validation (run when a config is made and saved): positive sizes, heads that divide
        widths, ``tokens_per_window`` from the audio tower's geometry, and a plausible parameter count. Errors name
        the field."""
        _check_audio_config(self)
        _check_audio_transformer(self)
        _check_text_config(self)
        _check_parameter_count(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """[`PreTrainedConfig.get_config_dict`] that first checks the path (see `af2_hf.loading.check_model_path`:
        an existing directory that is no model, an original release) and then refuses a ``config.json`` of another
        model type (a Qwen2 or CLAP checkpoint), before any model is built from default sizes."""
        check_model_path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ModelTypeError(str(pretrained_model_name_or_path), model_type, cls.model_type)
        _check_layer_counts(config_dict)
        return config_dict, kwargs

    @property
    def max_position_embeddings(self) -> int:
        """The language model's context length, ``text_config.max_position_embeddings`` (setting it sets that field).
        ``generate`` reads it as for text models: the default ``max_length`` is capped by it, and a longer
        generation logs transformers' "exceeded the model's predefined maximum length" warning."""
        return self.text_config.max_position_embeddings

    @max_position_embeddings.setter
    def max_position_embeddings(self, value: int) -> None:
        self.text_config.max_position_embeddings = value

    @property
    def audio_hidden_size(self) -> int:
        """Width C of the AF-CLAP tokens (HTSAT output) and of the audio transformer."""
        return self.audio_config.patch_embeds_hidden_size * 2 ** (len(self.audio_config.depths) - 1)

    @property
    def audio_transformer_head_dim(self) -> int:
        return self.audio_hidden_size // self.audio_transformer_num_heads

    @property
    def audio_rotary_dim(self) -> int:
        if self.audio_transformer_rotary_dim is not None:
            return self.audio_transformer_rotary_dim
        return max(self.audio_transformer_head_dim // 2, 32)

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the decoder layers that are preceded by a gated cross-attention block."""
        n = self.cross_attention_every_n_layers
        return [i for i in range(self.text_config.num_hidden_layers) if (i + 1) % n == 0]


def _typed_validation_errors(init):
    """``__init__`` that raises :class:`ConfigValidationError` (a ``ValueError``) for the ``@strict`` validators'
    errors, with their message (field or validator name and cause)."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except StrictDataclassError as error:
            raise ConfigValidationError(f"Invalid {type(self).__name__}: {error}") from error

    return __init__


AudioFlamingo2Config.__init__ = _typed_validation_errors(AudioFlamingo2Config.__init__)

__all__ = [
    "AudioFlamingo2Config",
    "ConfigValidationError",
    "DEFAULT_MAX_PARAMETERS",
    "MAX_PARAMETERS_ENV",
    "parameter_count_estimate",
]
