"""PyTorch Audio Flamingo 2: AF-CLAP (HTSAT) audio tower, rotary audio transformer and a Qwen2 language model whose
decoder layers are preceded by tanh-gated cross-attention blocks over the audio tokens."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.auto import AutoModel
from transformers.models.clap.modeling_clap import ClapAudioModel, ClapAudioSelfAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from ._compat import CACHE_KEY, cache_argument, output_cache
from .configuration_audioflamingo2 import AudioFlamingo2Config
from .htsat_attention import use_sdpa_window_attention
from .loading import CheckpointMismatchError, strict_from_pretrained


logger = logging.get_logger(__name__)


@dataclass
class AudioFlamingo2ModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    audio_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_windows * tokens_per_window, audio_hidden_size)`, *optional*):
        Output of the audio transformer for the audio encoded in this forward pass (prefill only).
    """

    audio_hidden_states: torch.FloatTensor | None = None


@dataclass
class AudioFlamingo2CausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    audio_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_windows * tokens_per_window, audio_hidden_size)`, *optional*):
        Output of the audio transformer for the audio encoded in this forward pass (prefill only).
    """

    audio_hidden_states: torch.FloatTensor | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _attention_interface(config) -> Callable:
    """The attention function of the audio transformer and of the gated cross-attention blocks.

    Both attend with a key-padding mask over audio tokens (padding windows, samples without audio) that is not a
    causal text mask; FlashAttention kernels in transformers take only text padding masks, so with a FlashAttention
    implementation these two run SDPA while the language model's self-attention runs FlashAttention."""
    implementation = config._attn_implementation
    if implementation is not None and "flash_attention" in implementation:
        implementation = "sdpa"
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


def window_mask_to_token_mask(window_mask: torch.Tensor, tokens_per_window: int) -> torch.Tensor:
    """(batch, windows) -> (batch, windows * tokens_per_window): each window's flag for each of its tokens (a view
    expanded and copied, no host synchronisation)."""
    batch, windows = window_mask.shape
    return window_mask[:, :, None].expand(batch, windows, tokens_per_window).reshape(batch, windows * tokens_per_window)


def padding_mask_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, keys) 1/0 mask -> additive (batch, 1, 1, keys) mask with the dtype's minimum on padded keys."""
    mask = mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------------------
# Audio transformer
# ----------------------------------------------------------------------------------------------------------------------


class AudioFlamingo2AudioRotaryEmbedding(nn.Module):
    """Rotary frequencies over the flattened audio-token index, computed in float32 (rotate-half layout)."""

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__()
        self.dim = config.audio_rotary_dim
        self.base = config.audio_transformer_rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, device=device).float() / self.dim
        return 1.0 / (self.base**exponents)

    @torch.no_grad()
    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device=device, dtype=torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of every head of `x` (batch, heads, seq, head_dim) in float32."""
    rot_dim = cos.shape[-1]
    rotated, passed = x[..., :rot_dim].float(), x[..., rot_dim:]
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat((rotated.to(x.dtype), passed), dim=-1)


class AudioFlamingo2AudioAttention(nn.Module):
    def __init__(self, config: AudioFlamingo2Config):
        super().__init__()
        self.config = config
        hidden = config.audio_hidden_size
        self.num_heads = config.audio_transformer_num_heads
        self.head_dim = hidden // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden, bias=False)
        self.dense = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states, attention_mask, position_embeddings, **kwargs):
        batch, seq, _ = hidden_states.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query = apply_partial_rotary(query, cos, sin)
        key = apply_partial_rotary(key, cos, sin)
        attn_output, attn_weights = _attention_interface(self.config)(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs
        )
        return self.dense(attn_output.reshape(batch, seq, -1)), attn_weights


class AudioFlamingo2AudioTransformerLayer(GradientCheckpointingLayer):
    """Post-norm encoder layer: attention + residual + LayerNorm, then ReLU FFN + residual + LayerNorm."""

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__()
        hidden = config.audio_hidden_size
        eps = config.audio_transformer_layer_norm_eps
        self.self_attn = AudioFlamingo2AudioAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, config.audio_transformer_intermediate_size)
        self.fc2 = nn.Linear(config.audio_transformer_intermediate_size, hidden)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        """Returns the layer output and the attention weights (`None` unless the attention is eager)."""
        attn_output, attn_weights = self.self_attn(hidden_states, attention_mask, position_embeddings, **kwargs)
        hidden_states = self.self_attn_layer_norm(hidden_states + attn_output)
        ffn_output = self.fc2(nn.functional.relu(self.fc1(hidden_states)))
        return self.final_layer_norm(hidden_states + ffn_output), attn_weights


class AudioFlamingo2AudioTransformer(nn.Module):
    """Transformer over all audio tokens of a sample (windows in order), rotary positions, key-padding mask."""

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__()
        hidden = config.audio_hidden_size
        self.embed_scale = hidden**0.5
        self.input_layernorm = nn.LayerNorm(hidden, eps=config.audio_transformer_layer_norm_eps)
        self.rotary_emb = AudioFlamingo2AudioRotaryEmbedding(config)
        self.layers = nn.ModuleList(
            [AudioFlamingo2AudioTransformerLayer(config) for _ in range(config.audio_transformer_num_layers)]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """Returns the output, the hidden states (the normalised input and every layer's output) when
        `output_hidden_states`, and every layer's attention weights when `output_attentions`."""
        hidden_states = self.input_layernorm(hidden_states * self.embed_scale)
        position_embeddings = self.rotary_emb(hidden_states.shape[1], hidden_states.device)
        attention_mask = None if token_mask is None else padding_mask_to_additive(token_mask, hidden_states.dtype)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, attention_mask, position_embeddings, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return hidden_states, all_hidden_states, all_attentions


# ----------------------------------------------------------------------------------------------------------------------
# Gated cross-attention
# ----------------------------------------------------------------------------------------------------------------------


class AudioFlamingo2AudioCacheLayer(DynamicLayer):
    """Cache layer of a gated cross-attention block: the projected audio keys/values (a fixed-length sequence, not
    text). Cropping the text cache (assisted decoding drops rejected candidate tokens) leaves it unchanged."""

    def crop(self, *args, **kwargs) -> None:
        return None


class AudioFlamingo2StaticAudioCacheLayer(StaticLayer):
    """Static (pre-allocated, compile-friendly) cache layer of a gated cross-attention block, sized by the audio."""

    def crop(self, *args, **kwargs) -> None:
        return None


def _has_cached_audio(cache: Cache | None, layer_idx: int) -> bool:
    """Whether the cache layer `layer_idx` already holds projected audio keys/values. As mllama's check: no
    `get_seq_length() > 0` (a 0-dim tensor on static layers, i.e. a data-dependent branch under torch.compile)."""
    if cache is None or layer_idx >= len(cache.layers):
        return False
    layer = cache.layers[layer_idx]
    return bool(layer.is_initialized) and layer.keys is not None and layer.keys.numel() > 0


def _clear_cache_layer(layer) -> None:
    """Empty a cross-attention cache layer so that the next `update` stores (not appends) the new audio K/V."""
    layer.reset()
    if isinstance(layer, DynamicLayer) and layer.is_initialized:
        # transformers < 5.2x: DynamicLayer.reset() zeroes the tensors and keeps them, and update() would then append
        # to them; drop them, as newer releases' reset() does.
        layer.keys = layer.values = None
        layer.is_initialized = False


class AudioFlamingo2GatedCrossAttentionBlock(GradientCheckpointingLayer):
    """`x + tanh(attn_gate) * CrossAttn(LN(x), audio)` then `x + tanh(ff_gate) * FF(x)`.

    The audio keys/values are projected once (at prefill) and kept in the block's layer of the decoding cache (index
    `layer_idx = text_config.num_hidden_layers + block_idx`, after the decoder's self-attention layers, as mllama keeps
    its cross-attention states in the one cache generation creates). Samples without audio (`sample_has_audio`
    False) leave the block unchanged."""

    def __init__(self, config: AudioFlamingo2Config, block_idx: int):
        super().__init__()
        self.config = config
        self.block_idx = block_idx
        self.layer_idx = config.text_config.num_hidden_layers + block_idx
        dim = config.text_config.hidden_size
        self.num_heads = config.cross_attention_num_heads
        self.head_dim = config.cross_attention_head_dim
        inner = self.num_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.attn_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(config.audio_hidden_size, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, dim * config.cross_attention_ff_mult, bias=False)
        self.ff_act = ACT2FN["gelu"]
        self.ff_out = nn.Linear(dim * config.cross_attention_ff_mult, dim, bias=False)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def project_audio(self, audio_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = audio_hidden_states.shape
        key, value = self.to_kv(audio_hidden_states).chunk(2, dim=-1)
        shape = (batch, length, self.num_heads, self.head_dim)
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_hidden_states: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        sample_has_audio: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        r"""
        The tensors are positional so that reentrant activation checkpointing (which only tracks positional tensors)
        carries the gradient of the audio states.

        audio_hidden_states (`(batch, audio_tokens, audio_hidden_size)`, *optional*): the audio to attend to; without
            it, the keys/values this block cached at prefill.
        audio_attention_mask (`(batch, 1, 1, audio_tokens)`, *optional*): additive key-padding mask.
        sample_has_audio (`(batch,)` bool, *optional*): False for samples without audio, which skip the block.
        """
        if audio_hidden_states is not None:
            key, value = self.project_audio(audio_hidden_states)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
        else:
            # The model calls this block without audio only when its cache layer holds the audio keys/values.
            layer = cache.layers[self.layer_idx]
            key, value = layer.keys, layer.values

        batch, seq, _ = hidden_states.shape
        query = self.to_q(self.attn_norm(hidden_states)).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        attn_output, _ = _attention_interface(self.config)(
            self, query, key, value, audio_attention_mask, scaling=self.scaling, dropout=0.0
        )
        attn_output = self.to_out(attn_output.reshape(batch, seq, -1))
        output = hidden_states + self.attn_gate.tanh() * attn_output
        output = output + self.ff_gate.tanh() * self.ff_out(self.ff_act(self.ff_in(self.ff_norm(output))))
        if sample_has_audio is not None:
            output = torch.where(sample_has_audio[:, None, None], output, hidden_states)
        return output


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained base
# ----------------------------------------------------------------------------------------------------------------------


# The audio path (HTSAT tower, audio transformer) as module-name patterns (with or without the `model.` prefix of the
# generation class) covering its floating-point tensors only: not HTSAT's integer buffers (relative_position_index,
# BatchNorm's num_batches_tracked), which the dtype plan of `from_pretrained` would otherwise cast to float32.
_HTSAT = r"(?:model\.)?audio_tower\.audio_encoder\."
AUDIO_PATH_FP32_PATTERNS = [
    _HTSAT + r"(?:patch_embed|norm)",
    _HTSAT + r"batch_norm\.(?:weight|bias|running_mean|running_var)",
    _HTSAT + r"layers\.\d+\.(?:downsample|blocks\.\d+\.(?:layernorm_before|layernorm_after|intermediate|output"
    r"|attention\.output|attention\.self\.(?:query|key|value|relative_position_bias_table)))",
    r"(?:model\.)?audio_transformer",
]


class AudioFlamingo2PreTrainedModel(PreTrainedModel):
    config: AudioFlamingo2Config
    config_class = AudioFlamingo2Config
    base_model_prefix = "model"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "Qwen2DecoderLayer",
        "AudioFlamingo2GatedCrossAttentionBlock",
        "AudioFlamingo2AudioTransformerLayer",
        "ClapAudioStage",
    ]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # Mixed precision: `from_pretrained(..., dtype=torch.bfloat16 or torch.float16)` loads the language model and
    # the gated cross-attention blocks in that dtype and keeps the audio path (HTSAT tower, audio transformer) in
    # float32; `__init__` builds the audio path in float32 too, as transformers requires of `_strict` modules.
    # Quantizers take the same list as `modules_to_not_convert` (see README, "Speed and precision").
    _keep_in_fp32_modules_strict = AUDIO_PATH_FP32_PATTERNS
    # FlashAttention for the language model's self-attention; the audio transformer and the gated cross-attention
    # blocks attend with audio key-padding masks and run SDPA then (see `_attention_interface`), and so do the HTSAT
    # tower's window attentions, which run eager code only when the model is "eager" (`htsat_attention`).
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": Qwen2DecoderLayer, "attentions": Qwen2Attention}

    def set_attn_implementation(self, attn_implementation: str | dict):
        """As [`PreTrainedModel.set_attn_implementation`]; a single implementation applies to the language model
        and the AF2 layers, while the AF-CLAP (HTSAT) tower's config stays "eager" (transformers' Clap audio model
        implements eager attention only); its window attentions follow the model's implementation: SDPA, or eager code
        when the model is "eager" (`af2_hf.htsat_attention`). A dict (sub-config name -> implementation) is passed on
        as given."""
        if isinstance(attn_implementation, str):
            attn_implementation = {"": attn_implementation, "text_config": attn_implementation, "audio_config": "eager"}
        return super().set_attn_implementation(attn_implementation)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AudioFlamingo2GatedCrossAttentionBlock):
            # The gates start closed, as in the original: a fresh model behaves like its language model.
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)
        elif isinstance(module, AudioFlamingo2AudioRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, ClapAudioSelfAttention):
            init.zeros_(module.relative_position_bias_table)
            init.copy_(module.relative_position_index, module.create_relative_position_index())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        r"""
        [`PreTrainedModel.from_pretrained`] with Audio Flamingo 2's checks (`af2_hf.loading`): the folder is a model
        (an original release gets the `af2-hf convert` command), `config.json` is an AF2 one, and local weight files
        are complete, all before a model is built; then loading is strict: a checkpoint that does not hold exactly the
        model's tensors raises [`CheckpointMismatchError`] listing every missing, unexpected and differently shaped
        tensor. `output_loading_info=True` returns `(model, loading_info)` and reports them instead, as transformers
        does.

        Args:
            strict (`bool`, *optional*, defaults to `True`): `False` restores transformers' behaviour (warn,
                initialise missing weights randomly), e.g. to build a model from a partial checkpoint on purpose.
        """
        return strict_from_pretrained(
            super().from_pretrained, cls, pretrained_model_name_or_path, *model_args, strict=strict, **kwargs
        )


class AudioFlamingo2Model(AudioFlamingo2PreTrainedModel):
    """AF-CLAP audio tower + audio transformer + Qwen2 decoder with gated cross-attention blocks (no LM head)."""

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__(config)
        # transformers' HTSAT implements eager attention only (its config stays "eager"); its window attentions take
        # the model's implementation: SDPA unless the model is set to "eager" (`htsat_attention`).
        # The audio path is float32 whatever the default dtype (`_keep_in_fp32_modules_strict`).
        self.audio_tower = ClapAudioModel._from_config(
            config.audio_config, attn_implementation="eager", dtype=torch.float32
        )
        use_sdpa_window_attention(self.audio_tower, config)
        self.audio_transformer = AudioFlamingo2AudioTransformer(config).float()
        self.language_model = AutoModel.from_config(config.text_config)
        self.cross_attention_layers = nn.ModuleList(
            [AudioFlamingo2GatedCrossAttentionBlock(config, j) for j in range(len(config.cross_attention_layers))]
        )
        self._cross_block_for_layer = {layer: j for j, layer in enumerate(config.cross_attention_layers)}
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen audio tower keeps its BatchNorm statistics (the Trainer calls .train() on the whole model).
        if mode and not any(p.requires_grad for p in self.audio_tower.parameters()):
            self.audio_tower.eval()
        return self

    def check_audio_inputs(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None, batch: int | None = None
    ) -> torch.Tensor:
        """Checks the shapes of `input_features` / `input_features_mask` against the config (before any tower runs)
        and returns the window mask (all ones when none is given).

        Raises:
            ValueError: naming the wrong dimension: not `(batch, windows, frames, mel_bins)`, mel bins other than
                `audio_config.num_mel_bins`, no window, more frames than the HTSAT input holds
                (`spec_size * (spec_size // num_mel_bins)`), another batch than the text's, or a mask of another shape.
        """
        if input_features.dim() != 4:
            raise ValueError(
                "input_features must have shape (batch, windows, frames, mel_bins); got "
                f"{tuple(input_features.shape)}. Use AudioFlamingo2FeatureExtractor to compute them."
            )
        batch_features, windows, frames, mels = input_features.shape
        audio_config = self.config.audio_config
        if mels != audio_config.num_mel_bins:
            raise ValueError(f"input_features has {mels} mel bins; the audio tower expects {audio_config.num_mel_bins}.")
        max_frames = audio_config.spec_size * (audio_config.spec_size // audio_config.num_mel_bins)
        if not 1 <= frames <= max_frames:
            raise ValueError(
                f"input_features has {frames} frames per window; the audio tower takes 1 to {max_frames} "
                "(audio_config.spec_size * (spec_size // num_mel_bins))."
            )
        if windows == 0:
            raise ValueError(
                "input_features holds no window. For prompts without audio pass no input_features at all (or, in a "
                "batch that mixes them, a window whose input_features_mask entry is 0)."
            )
        if batch is not None and batch_features != batch:
            raise ValueError(
                f"input_features holds {batch_features} samples but the text batch has {batch}: "
                "give exactly one audio per text."
            )
        if input_features_mask is None:
            return torch.ones(batch_features, windows, dtype=torch.long, device=input_features.device)
        if tuple(input_features_mask.shape) != (batch_features, windows):
            raise ValueError(
                f"input_features_mask has shape {tuple(input_features_mask.shape)}, expected {(batch_features, windows)} "
                "(batch, windows) to match input_features."
            )
        return input_features_mask

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""Encode log-mel windows with the AF-CLAP tower and the audio transformer.

        Args:
            input_features: `(batch, windows, frames, mel_bins)` log-mel features from the feature extractor.
            input_features_mask: `(batch, windows)`, 1 for real windows, 0 for padding windows (a row of zeros: a
                sample without audio).
            output_hidden_states / output_attentions: also return the audio transformer's hidden states (its
                normalised input and every layer's output) / attention weights (eager attention only).
            return_dict: `False` returns the fields as a tuple.

        Returns:
            [`~modeling_outputs.BaseModelOutputWithPooling`]:
            `last_hidden_state` `(batch, windows * tokens_per_window, audio_hidden_size)`: the audio-transformer
            output the gated cross-attention blocks attend to (padding windows included; they are masked there).
            `pooler_output` `(batch, audio_hidden_size)`: the mean of `last_hidden_state` over the tokens of each
            sample's real windows (zeros for a sample without audio).
        """
        input_features_mask = self.check_audio_inputs(input_features, input_features_mask)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        batch, windows, frames, mels = input_features.shape
        tower_dtype = self.audio_tower.audio_encoder.patch_embed.proj.weight.dtype
        # The windows of the whole batch go through the audio tower together, audio_tower_batch_size at a time (the
        # windows are independent; the chunks bound the activation memory).
        flat = input_features.reshape(batch * windows, 1, frames, mels)
        chunk = self.config.audio_tower_batch_size or flat.shape[0]
        tokens = torch.cat([
            self.audio_tower(flat[start : start + chunk].to(tower_dtype)).last_hidden_state.flatten(2).transpose(1, 2)
            for start in range(0, flat.shape[0], chunk)
        ])  # (B*W, tokens, C)
        tokens_per_window = tokens.shape[1]
        if tokens_per_window != self.config.tokens_per_window:
            raise ValueError(
                f"The audio tower produced {tokens_per_window} tokens per window; config.tokens_per_window is "
                f"{self.config.tokens_per_window}."
            )
        tokens = tokens.reshape(batch, windows * tokens_per_window, -1)
        token_mask = window_mask_to_token_mask(input_features_mask.to(tokens.device), tokens_per_window)
        last_hidden_state, hidden_states, attentions = self.audio_transformer(
            tokens, token_mask, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        weights = token_mask.to(last_hidden_state.dtype)[..., None]
        pooled = (last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    def _audio_token_mask(self, input_features_mask, dtype, device, num_audio_tokens):
        mask = window_mask_to_token_mask(input_features_mask.to(device), self.config.tokens_per_window)
        if mask.shape[-1] != num_audio_tokens:
            raise ValueError(
                f"input_features_mask covers {mask.shape[-1]} audio tokens but the cache/audio holds {num_audio_tokens}."
            )
        return padding_mask_to_additive(mask, dtype)

    def _add_audio_cache_layers(self, cache: Cache) -> None:
        """Give the cache a layer per gated cross-attention block after the decoder's self-attention layers (a cache
        built by generate or from the text config has only those)."""
        first = self.config.text_config.num_hidden_layers
        needed = first + len(self.cross_attention_layers)
        if len(cache.layers) >= needed:
            return
        text_layer = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
        while len(cache.layers) < first:
            cache.layers.append(text_layer())
        while len(cache.layers) < needed:
            cache.layers.append(AudioFlamingo2AudioCacheLayer())

    def holds_cached_audio(self, cache: Cache | None) -> bool:
        """Whether every gated cross-attention block finds its projected audio keys/values in `cache`."""
        return bool(self.cross_attention_layers) and all(
            _has_cached_audio(cache, block.layer_idx) for block in self.cross_attention_layers
        )

    @capture_outputs
    @cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        audio_hidden_states: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> AudioFlamingo2ModelOutputWithPast:
        r"""
        input_features (`torch.FloatTensor` of shape `(batch, windows, frames, mel_bins)`, *optional*):
            Log-mel windows from [`AudioFlamingo2FeatureExtractor`]. Needed at prefill; during cached decoding the
            projected audio keys/values come from the cache instead. Without them (and without cached audio) the
            gated cross-attention blocks are skipped: the model is its language model (a text-only prompt).
        input_features_mask (`torch.Tensor` of shape `(batch, windows)`, *optional*):
            1 for real windows, 0 for padding windows; a row of zeros marks a sample without audio, which skips the
            gated cross-attention blocks. Keep passing it at every decoding step.
        audio_hidden_states (`torch.FloatTensor`, *optional*):
            Pre-computed `last_hidden_state` of [`~AudioFlamingo2Model.get_audio_features`], instead of
            `input_features`.
        cache (`Cache`, *optional*):
            The decoding cache (`past_key_values` is accepted too, the name before transformers 5.24): a
            [`~cache_utils.DynamicCache`] or [`~cache_utils.StaticCache`] whose first `text_config.num_hidden_layers`
            layers hold the decoder's self-attention keys/values and whose next layers hold each gated
            cross-attention block's projected audio keys/values (added to a cache that lacks them).
        """
        text_config = self.config.text_config
        use_cache = use_cache if use_cache is not None else text_config.use_cache
        if use_cache and self.training and any(block.gradient_checkpointing for block in self.cross_attention_layers):
            # The checkpointed cross-attention blocks would write their audio keys/values into the cache a second
            # time when the backward pass recomputes them (transformers only drops the cache there).
            logger.warning_once("use_cache=True is incompatible with activation checkpointing; using use_cache=False.")
            use_cache = False
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_features is not None and audio_hidden_states is not None:
            raise ValueError("Pass either input_features or audio_hidden_states, not both.")
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache must be a transformers Cache (DynamicCache, StaticCache), got {type(cache).__name__}.")

        lm = self.language_model
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if input_features is not None:
            input_features_mask = self.check_audio_inputs(input_features, input_features_mask, batch)
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=text_config)
        if cache is not None:
            self._add_audio_cache_layers(cache)

        if input_features is not None:
            audio_hidden_states = self.get_audio_features(input_features, input_features_mask, return_dict=True)
            audio_hidden_states = audio_hidden_states.last_hidden_state
        cross_layers = slice(text_config.num_hidden_layers, text_config.num_hidden_layers + len(self.cross_attention_layers))
        if audio_hidden_states is not None:
            if audio_hidden_states.shape[0] != batch:
                raise ValueError(
                    f"audio_hidden_states holds {audio_hidden_states.shape[0]} samples but the text batch has {batch}."
                )
            audio_hidden_states = audio_hidden_states.to(inputs_embeds.dtype)
            if cache is not None and use_cache:
                # A new audio replaces whatever the cache held (projected once, reused at every later step).
                for layer in cache.layers[cross_layers]:
                    _clear_cache_layer(layer)
            num_audio_tokens = audio_hidden_states.shape[1]
        elif self.holds_cached_audio(cache):
            num_audio_tokens = cache.layers[cross_layers][0].keys.shape[-2]
        else:
            num_audio_tokens = None
            if self.cross_attention_layers and input_features_mask is not None:
                raise ValueError(
                    "input_features_mask was given but neither input_features nor cached audio keys/values are "
                    "available: pass input_features at the first (prefill) step."
                )

        audio_attention_mask = sample_has_audio = None
        if num_audio_tokens is not None and input_features_mask is not None:
            audio_attention_mask = self._audio_token_mask(
                input_features_mask, inputs_embeds.dtype, inputs_embeds.device, num_audio_tokens
            )
            sample_has_audio = input_features_mask.to(inputs_embeds.device).bool().any(-1)

        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)

        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": text_config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_KEY: cache,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in text_config.layer_types:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        # The cross-attention blocks write their audio keys/values only with use_cache; they read them (no audio
        # given) from the cache in any case.
        block_cache = cache if use_cache or audio_hidden_states is None else None
        hidden_states = inputs_embeds
        position_embeddings = lm.rotary_emb(hidden_states, position_ids)
        for i, decoder_layer in enumerate(lm.layers[: text_config.num_hidden_layers]):
            j = self._cross_block_for_layer.get(i)
            if j is not None and num_audio_tokens is not None:
                hidden_states = self.cross_attention_layers[j](
                    hidden_states, audio_hidden_states, audio_attention_mask, sample_has_audio, cache=block_cache
                )
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[text_config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_KEY: cache},
                **kwargs,
            )
        hidden_states = lm.norm(hidden_states)
        return AudioFlamingo2ModelOutputWithPast(
            last_hidden_state=hidden_states,
            audio_hidden_states=audio_hidden_states,
            **{CACHE_KEY: cache if use_cache else None},
        )


class AudioFlamingo2ForConditionalGeneration(AudioFlamingo2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Tensor parallelism: the language model's plan comes from its config (`base_model_tp_plan` of Qwen2, collected
    # under `model.language_model.` by `post_init`) and the LM head's is Qwen2ForCausalLM's; the audio tower, audio
    # transformer and gated cross-attention blocks stay replicated.
    _tp_plan = dict(Qwen2ForCausalLM._tp_plan or {})

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__(config)
        self.model = AudioFlamingo2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_audio_features(self, input_features, input_features_mask=None, **kwargs):
        return self.model.get_audio_features(input_features, input_features_mask, **kwargs)

    @can_return_tuple
    @cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        audio_hidden_states: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> AudioFlamingo2CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Token ids for the causal-LM loss (shifted inside); -100 is ignored. `num_items_in_batch` (from the
            Trainer) is honoured.
        """
        outputs = self.model(
            input_ids=input_ids,
            input_features=input_features,
            input_features_mask=input_features_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            audio_hidden_states=audio_hidden_states,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.text_config.vocab_size, **kwargs)
        return AudioFlamingo2CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_hidden_states=outputs.audio_hidden_states,
            **{CACHE_KEY: output_cache(outputs)},
        )

    # -- generation -----------------------------------------------------------------------------------------------

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        features = model_kwargs.get("input_features")
        if expand_size > 1 and features is not None:
            # Beams / num_return_sequences: encode each audio once, then repeat the encoded audio instead of running
            # the audio tower once per copy.
            model_kwargs["audio_hidden_states"] = self.get_audio_features(
                features, model_kwargs.get("input_features_mask"), return_dict=True
            ).last_hidden_state
            model_kwargs["input_features"] = None
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _prepare_static_cache(self, *args, model_kwargs, **kwargs) -> Cache:
        cache = super()._prepare_static_cache(*args, model_kwargs=model_kwargs, **kwargs)
        # `max_cache_len` counts text tokens. As mllama does, the layers of the gated cross-attention blocks (after
        # the decoder's layers) are static layers sized by the audio instead. A text-only batch gets none.
        del cache.layers[self.config.text_config.num_hidden_layers :]  # a cache reused by older releases
        features, audio = model_kwargs.get("input_features"), model_kwargs.get("audio_hidden_states")
        if features is not None:
            audio_len = features.shape[1] * self.config.tokens_per_window
        elif audio is not None:
            audio_len = audio.shape[1]
        else:
            return cache
        cache.layers.extend(
            AudioFlamingo2StaticAudioCacheLayer(max_cache_len=audio_len) for _ in self.model.cross_attention_layers
        )
        return cache

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        input_features=None,
        input_features_mask=None,
        audio_hidden_states=None,
        is_first_iteration=False,
        use_cache=True,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            input_features=input_features,
            input_features_mask=input_features_mask,
            audio_hidden_states=audio_hidden_states,
            is_first_iteration=is_first_iteration,
            use_cache=use_cache,
            **kwargs,
        )
        # The audio is encoded and projected once per generate, at its first forward (a new audio replaces the audio
        # of a cache passed in); later forwards read the cached audio keys/values. Whether they are there is read
        # from the cache, not from `is_first_iteration`: an assistant model's or a prompt-lookup prefill is not a
        # first iteration yet finds an empty cache. The window mask is needed at every step.
        # (transformers' own `prepare_inputs_for_generation` drops `input_features` and its mask after the first
        # iteration whatever the cache holds.)
        model_inputs["input_features_mask"] = input_features_mask
        if use_cache and not is_first_iteration and self.model.holds_cached_audio(model_inputs.get(CACHE_KEY)):
            model_inputs["input_features"] = None
            model_inputs["audio_hidden_states"] = None
        else:
            model_inputs["input_features"] = input_features
            model_inputs["audio_hidden_states"] = audio_hidden_states
        return model_inputs


__all__ = [
    "AudioFlamingo2PreTrainedModel",
    "AudioFlamingo2Model",
    "AudioFlamingo2ForConditionalGeneration",
]
