"""Configuration of AF-CLAP, the contrastive audio-text model (HTSAT + flan-T5 encoder) trained for Audio Flamingo 2."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig

from ._compat import SubConfigSpec, build_sub_config, sub_config_specs

# The release's audio tower: HTSAT-large with aff_2d fusion (the original's HTSAT-afclap.json).
_AUDIO_DEFAULTS = {
    "model_type": "clap_audio_model",
    "patch_embeds_hidden_size": 256,
    "depths": [2, 2, 12, 2],
    "num_attention_heads": [4, 8, 16, 32],
    "hidden_size": 2048,
    "enable_fusion": True,
    "fusion_type": "aff_2d",
    "hidden_dropout_prob": 0.0,
    "drop_path_rate": 0.1,
}
# google/flan-t5-large, whose encoder is the text tower (the original hard-codes it).
_TEXT_DEFAULTS = {
    "model_type": "t5",
    "vocab_size": 32128,
    "d_model": 1024,
    "d_kv": 64,
    "d_ff": 2816,
    "num_layers": 24,
    "num_heads": 16,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


@strict
class AFClapConfig(PreTrainedConfig):
    r"""
    Configuration of [`AFClapModel`]: AF-CLAP, NVIDIA's CLAP for Audio Flamingo 2. Defaults describe the release
    (HTSAT-large audio tower with `aff_2d` fusion, flan-T5-large encoder as the text tower, 512-wide joint space).

    Args:
        audio_config (`ClapAudioConfig` or `dict`): the HTSAT audio tower (transformers' `ClapAudioModel`); its
            `enable_fusion=True`, `fusion_type="aff_2d"` give the fusion of clips longer than 10 s. The audio
            embedding width is `audio_config.hidden_size`.
        text_config (`T5Config` or `dict`): the text tower (transformers' `T5EncoderModel`); its width is
            `text_config.d_model`.
        projection_dim (`int`): width of the joint embedding space (both projections end there).
        projection_hidden_act (`str`): activation between the two linear layers of each projection (ReLU).
        transform_dropout (`float`): dropout of `audio_transform`/`text_transform` (the original's `MLPLayers`,
            used only by the `mlp_loss` training objective; active in training mode only).
        logit_scale_init_value (`float`): initial value of both log temperatures, `log(1 / 0.07)` as the original.
        text_context_length (`int`): token positions the text tower reads (77, EOS included). Shorter tokenized
            texts are padded to it inside the model, because the text embedding is an UNMASKED mean over all
            these positions (see [`AFClapModel.get_text_features`]).
        audio_tagging_num_classes (`int`, *optional*): classes of HTSAT's token-semantic tagging head
            (`tscam_conv`, 527 AudioSet classes in the original); `None` builds no head. Not used by the CLAP
            embeddings; see [`AFClapModel.get_audio_tagging`].
    """

    model_type = "afclap"
    if SubConfigSpec is not None:
        sub_configs_defaults = sub_config_specs({"audio_config": _AUDIO_DEFAULTS, "text_config": _TEXT_DEFAULTS})
    else:  # pragma: no cover - transformers releases before SubConfigSpec
        sub_configs = {"audio_config": AutoConfig, "text_config": AutoConfig}

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    projection_hidden_act: str = "relu"
    transform_dropout: float = 0.1
    logit_scale_init_value: float = 2.6592600369262695  # log(1 / 0.07)
    text_context_length: int = 77
    audio_tagging_num_classes: int | None = None
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:  # pragma: no cover - transformers releases before SubConfigSpec
            self.audio_config = build_sub_config(self.audio_config, _AUDIO_DEFAULTS)
            self.text_config = build_sub_config(self.text_config, _TEXT_DEFAULTS)
        super().__post_init__(**kwargs)
        if self.text_context_length < 2:
            raise ValueError(f"text_context_length must be >= 2 (a token and EOS), got {self.text_context_length}.")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {self.projection_dim}.")

    @property
    def audio_embed_dim(self) -> int:
        """Width of the HTSAT embedding (before the audio projection)."""
        return self.audio_config.hidden_size

    @property
    def text_embed_dim(self) -> int:
        """Width of the T5 encoder states (before the text projection)."""
        return self.text_config.d_model


__all__ = ["AFClapConfig"]
