"""Configuration of Audio Flamingo 2 (AF2) for Hugging Face Transformers."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto import CONFIG_MAPPING

from ._compat import SubConfigSpec


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


def _sub_config_specs() -> dict:
    specs = {}
    for key, defaults in (("audio_config", _AUDIO_DEFAULTS), ("text_config", _TEXT_DEFAULTS)):
        init_kwargs = {k: v for k, v in defaults.items() if k != "model_type"}
        specs[key] = SubConfigSpec(config_class=AutoConfig, model_type=defaults["model_type"], init_kwargs=init_kwargs)
    return specs


def _build_sub_config(value, defaults: dict) -> PreTrainedConfig:
    """transformers releases without ``SubConfigSpec``: a dict or ``None`` becomes the sub-config as the newer
    releases build it from ``sub_configs_defaults`` (``None``: the AF2-3B defaults; a dict: its own values on the
    sub-config's defaults)."""
    if isinstance(value, PreTrainedConfig):
        return value
    kwargs = dict(defaults) if value is None else {"model_type": defaults["model_type"], **value}
    return CONFIG_MAPPING[kwargs.pop("model_type")](**kwargs)


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
        audio_tower_batch_size (`int`, *optional*, defaults to 8): windows the audio tower encodes per call. It
            bounds the tower's activation memory (about 34 MiB per window in bfloat16 for HTSAT-large, ~1 GiB for
            30 windows at once) without changing the results; `None` encodes all windows of a batch in one call.
        audio_token_id, end_of_chunk_token_id, sep_token_id, pad_token_id (`int`): AF2 special tokens.
    """

    model_type = "audioflamingo2"
    if SubConfigSpec is not None:
        sub_configs_defaults = _sub_config_specs()
    else:  # pragma: no cover - transformers releases before SubConfigSpec
        sub_configs = {"audio_config": AutoConfig, "text_config": AutoConfig}

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_transformer_num_layers: int = 3
    audio_transformer_num_heads: int = 8
    audio_transformer_intermediate_size: int = 2048
    audio_transformer_rope_theta: float = 4096.0
    audio_transformer_rotary_dim: int | None = None
    audio_transformer_layer_norm_eps: float = 1e-6
    cross_attention_every_n_layers: int = 1
    cross_attention_num_heads: int = 8
    cross_attention_head_dim: int = 64
    cross_attention_ff_mult: int = 4
    tokens_per_window: int = 64
    audio_tower_batch_size: int | None = 8
    audio_token_id: int = 151665
    end_of_chunk_token_id: int = 151666
    pad_token_id: int | None = 151667
    sep_token_id: int | None = 151668
    eos_token_id: int | list[int] | None = 151643
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:  # pragma: no cover - transformers releases before SubConfigSpec
            self.audio_config = _build_sub_config(self.audio_config, _AUDIO_DEFAULTS)
            self.text_config = _build_sub_config(self.text_config, _TEXT_DEFAULTS)
        super().__post_init__(**kwargs)
        # Tied embeddings follow the language model, as in Llava.
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
        width = self.audio_hidden_size
        if width % self.audio_transformer_num_heads != 0:
            raise ValueError(
                f"The audio width {width} is not divisible by audio_transformer_num_heads="
                f"{self.audio_transformer_num_heads}."
            )
        if self.cross_attention_every_n_layers < 1:
            raise ValueError("cross_attention_every_n_layers must be >= 1.")
        if self.audio_tower_batch_size is not None and self.audio_tower_batch_size < 1:
            raise ValueError(f"audio_tower_batch_size must be >= 1 or None, got {self.audio_tower_batch_size}.")

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


__all__ = ["AudioFlamingo2Config"]
