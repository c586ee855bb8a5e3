"""PyTorch AF-CLAP: the contrastive audio-text model of Audio Flamingo 2 (HTSAT audio tower with ``aff_2d`` fusion,
flan-T5 encoder text tower, two-layer ReLU projections into a joint space, two learned temperatures).

The audio tower is transformers' ``ClapAudioModel`` (its fusion path equals the original's at inference), the text
tower transformers' ``T5EncoderModel``. What the original does differently from transformers' ``ClapModel`` is kept:

* text embedding = UNMASKED mean of the T5 states over all ``text_context_length`` (77) positions, pads included
  (the states of pad positions are computed with the pads masked as keys). The model re-packs every text to exactly
  77 positions (its tokens first, then pads) before the encoder, so the result does not depend on how a caller
  padded (right, left, to the longest, to 77);
* ``logits_per_audio`` and ``logits_per_text`` both use ``exp(logit_scale_a)`` (the original's ``ClipLoss`` without
  ``mlp_loss``); ``logit_scale_t`` scales the ``mlp_loss`` logits of :meth:`AFClapModel.get_mlp_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5EncoderModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.models.clap.modeling_clap import ClapAudioModel, ClapAudioSelfAttention
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .configuration_afclap import AFClapConfig

logger = logging.get_logger(__name__)

__all__ = ["AFClapModel", "AFClapOutput", "AFClapPreTrainedModel"]


@dataclass
class AFClapOutput(ModelOutput):
    """Output of [`AFClapModel.forward`], as transformers' ``ClapOutput``.

    Args:
        loss: the symmetric contrastive loss (``return_loss=True``; needs as many texts as clips).
        logits_per_audio: `(num_audio, num_text)`, ``exp(logit_scale_a) * audio_embeds @ text_embeds.T``.
        logits_per_text: `(num_text, num_audio)`, its transpose.
        text_embeds: `(num_text, projection_dim)`, L2-normalised projected text embeddings.
        audio_embeds: `(num_audio, projection_dim)`, L2-normalised projected audio embeddings.
        text_model_output: the text tower output (`last_hidden_state` over the 77 packed positions).
        audio_model_output: the audio tower output (`pooler_output` = the HTSAT embedding before projection).
    """

    loss: torch.FloatTensor | None = None
    logits_per_audio: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    audio_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


class AFClapProjection(nn.Module):
    """``Linear(in, out) -> act -> Linear(out, out)``: the original's ``audio_projection`` / ``text_projection``."""

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__()
        self.linear1 = nn.Linear(in_features, out_features)
        self.activation = ACT2FN[activation]
        self.linear2 = nn.Linear(out_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.activation(self.linear1(hidden_states)))


class AFClapTransform(nn.Module):
    """``Linear -> act -> Dropout -> Linear`` on the joint space: the original's ``audio_transform`` /
    ``text_transform`` (``MLPLayers``), used only by the ``mlp_loss`` objective."""

    def __init__(self, width: int, activation: str, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(width, width)
        self.activation = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(hidden_states))))


class AFClapAudioTagging(nn.Module):
    """HTSAT's token-semantic tagging head (the original's ``tscam_conv``): a ``(freq, 3)`` convolution over the
    HTSAT feature map, time-averaged, sigmoid -> clip-wise class probabilities (the original's ``clipwise_output``)."""

    def __init__(self, audio_config, num_classes: int):
        super().__init__()
        freq_ratio = audio_config.spec_size // audio_config.num_mel_bins
        stride = audio_config.patch_stride
        stride = stride[0] if isinstance(stride, (list, tuple)) else stride
        freq = audio_config.spec_size // 2 ** (len(audio_config.depths) - 1) // stride // freq_ratio
        self.conv = nn.Conv2d(audio_config.hidden_size, num_classes, kernel_size=(freq, 3), padding=(0, 1))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(feature_map).flatten(2).mean(dim=-1))


class AFClapPreTrainedModel(PreTrainedModel):
    config: AFClapConfig
    config_class = AFClapConfig
    base_model_prefix = "afclap"
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = False
    _no_split_modules = ["ClapAudioStage", "T5Block"]
    _supports_sdpa = False
    _supports_flash_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AFClapModel):
            init.constant_(module.logit_scale_a, self.config.logit_scale_init_value)
            init.constant_(module.logit_scale_t, self.config.logit_scale_init_value)
        elif isinstance(module, ClapAudioSelfAttention):
            init.zeros_(module.relative_position_bias_table)
            init.copy_(module.relative_position_index, module.create_relative_position_index())


class AFClapModel(AFClapPreTrainedModel):
    """AF-CLAP: HTSAT (``ClapAudioModel``, ``aff_2d`` fusion) + flan-T5 encoder, both projected into one space."""

    def __init__(self, config: AFClapConfig):
        super().__init__(config)
        # transformers' HTSAT implements eager attention only; T5 is kept eager as the original ran it.
        self.audio_model = ClapAudioModel._from_config(config.audio_config, attn_implementation="eager")
        self.text_model = T5EncoderModel._from_config(config.text_config, attn_implementation="eager")
        width, act = config.projection_dim, config.projection_hidden_act
        self.audio_projection = AFClapProjection(config.audio_embed_dim, width, act)
        self.text_projection = AFClapProjection(config.text_embed_dim, width, act)
        self.audio_transform = AFClapTransform(width, act, config.transform_dropout)
        self.text_transform = AFClapTransform(width, act, config.transform_dropout)
        self.logit_scale_a = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_scale_t = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.audio_tagging = (
            AFClapAudioTagging(config.audio_config, config.audio_tagging_num_classes)
            if config.audio_tagging_num_classes
            else None
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.text_model.set_input_embeddings(value)

    # ------------------------------------------------------------------ text

    def pack_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-packs tokenized texts the way the original tokenizer call lays them out: each row's attended tokens
        first, then pad tokens up to exactly ``config.text_context_length`` positions (mask 1 then 0).

        Rows may come padded on either side or to any length; without ``attention_mask`` every token that is not
        ``pad_token_id`` counts. A row with more tokens than the context keeps its first ``context - 1`` and ends
        with EOS (what the tokenizer's truncation does), with a warning.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (num_texts, length); got {tuple(input_ids.shape)}.")
        if input_ids.shape[0] == 0:
            raise ValueError("No texts to encode (an empty list of texts or candidate labels?).")
        text_config = self.config.text_config
        pad_id = text_config.pad_token_id if text_config.pad_token_id is not None else 0
        if attention_mask is None:
            attention_mask = input_ids != pad_id
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}."
            )
        keep = attention_mask.bool()
        lengths = keep.sum(-1)
        if bool((lengths == 0).any()):
            empty = torch.nonzero(lengths == 0).flatten().tolist()
            raise ValueError(f"Text(s) {empty} have no tokens (all positions masked or padding).")
        context = self.config.text_context_length
        too_long = lengths > context
        if bool(too_long.any()):
            logger.warning(
                f"{int(too_long.sum())} text(s) have more than {context} tokens ({int(lengths.max())}); AF-CLAP reads "
                f"{context}: their first {context - 1} tokens and EOS are kept, as the original tokenizer truncates."
            )
        positions = keep.long().cumsum(-1) - 1
        placed = keep & (positions < context)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(-1).expand_as(input_ids)
        packed = torch.full((input_ids.shape[0], context), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        packed[rows[placed], positions[placed]] = input_ids[placed]
        if bool(too_long.any()):
            packed[too_long, context - 1] = text_config.eos_token_id
        packed_mask = (
            torch.arange(context, device=input_ids.device).unsqueeze(0) < lengths.clamp(max=context).unsqueeze(-1)
        ).long()
        return packed, packed_mask

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """T5 encoder over the packed 77 positions and the UNMASKED mean of its states.

        Returns:
            the encoder output and the pooled `(num_texts, d_model)` text embedding before projection.
        """
        input_ids, attention_mask = self.pack_text(input_ids, attention_mask)
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        # The original averages ALL positions, pads included (their states are computed with pads masked as keys).
        pooled = outputs.last_hidden_state.mean(dim=1)
        return outputs, pooled

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Text embeddings.

        Args:
            input_ids: `(num_texts, length)` T5 token ids (from [`AFClapProcessor`] or the tokenizer; any padding).
            attention_mask: `(num_texts, length)`, 1 for tokens; `None`: every non-pad token.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is the L2-normalised projected embedding
            `(num_texts, projection_dim)` (as ``ClapModel.get_text_features``) and `last_hidden_state` the T5 states
            `(num_texts, text_context_length, d_model)` the unmasked mean is taken over.
        """
        outputs, pooled = self.encode_text(input_ids, attention_mask, **kwargs)
        embeds = F.normalize(self.text_projection(pooled), dim=-1)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=embeds,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # ------------------------------------------------------------------ audio

    def encode_audio(
        self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """HTSAT over the fusion inputs; `pooler_output` is the audio embedding before projection
        `(num_audio, audio_config.hidden_size)` (the original's ``embedding``)."""
        if input_features.dim() != 4:
            raise ValueError(
                "input_features must have shape (num_audio, 4, frames, mel_bins) (global view + 3 fusion crops); got "
                f"{tuple(input_features.shape)}. Use AFClapFeatureExtractor to compute them."
            )
        mels = self.config.audio_config.num_mel_bins
        if input_features.shape[-1] != mels:
            raise ValueError(f"input_features has {input_features.shape[-1]} mel bins; the audio tower expects {mels}.")
        if not bool(torch.isfinite(input_features).all()):
            raise ValueError("input_features contain NaN or infinite values (non-finite audio?).")
        batch = input_features.shape[0]
        if is_longer is None:
            is_longer = torch.zeros(batch, 1, dtype=torch.bool, device=input_features.device)
        elif is_longer.numel() != batch:
            raise ValueError(f"is_longer has {is_longer.numel()} entries for {batch} clips.")
        if not self.config.audio_config.enable_fusion:
            input_features = input_features[:, :1]  # a tower without fusion reads the global view only
        dtype = self.audio_model.audio_encoder.patch_embed.proj.weight.dtype
        return self.audio_model(
            input_features=input_features.to(dtype), is_longer=is_longer.reshape(batch, 1), return_dict=True, **kwargs
        )

    def get_audio_features(
        self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Audio embeddings.

        Args:
            input_features: `(num_audio, 4, 1001, mel_bins)` from [`AFClapFeatureExtractor`]: the global view and
                the three fusion crops (for a clip of at most 10 s, the same mel 4 times).
            is_longer: `(num_audio, 1)` bool, True where the fusion crops are used (clips over 10 s).

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is the L2-normalised projected embedding
            `(num_audio, projection_dim)` (as ``ClapModel.get_audio_features``) and `last_hidden_state` the HTSAT
            feature map.
        """
        outputs = self.encode_audio(input_features, is_longer, **kwargs)
        embeds = F.normalize(self.audio_projection(outputs.pooler_output), dim=-1)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=embeds,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def get_audio_tagging(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """Clip-wise class probabilities `(num_audio, audio_tagging_num_classes)` of HTSAT's tagging head (the
        original's ``clipwise_output``; not used by the CLAP embeddings). Needs ``config.audio_tagging_num_classes``."""
        if self.audio_tagging is None:
            raise ValueError("This AF-CLAP model has no audio tagging head (config.audio_tagging_num_classes is None).")
        return self.audio_tagging(self.encode_audio(input_features, is_longer).last_hidden_state)

    # ------------------------------------------------------------------ joint

    def get_logit_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(logit_scale_a), exp(logit_scale_t))`` as the original ``get_logit_scale``."""
        return self.logit_scale_a.exp(), self.logit_scale_t.exp()

    def get_mlp_logits(self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four logits of the original ``mlp_loss`` objective from normalised embeddings: ``a_*`` pair the
        embeddings of one modality with the ``*_transform`` of the other and use ``exp(logit_scale_a)``; ``t_*``
        use ``exp(logit_scale_t)``."""
        scale_a, scale_t = self.get_logit_scale()
        audio_mlp, text_mlp = self.audio_transform(audio_embeds), self.text_transform(text_embeds)
        return {
            "a_logits_per_audio": scale_a * audio_embeds @ text_mlp.T,
            "a_logits_per_text": scale_a * text_mlp @ audio_embeds.T,
            "t_logits_per_audio": scale_t * audio_mlp @ text_embeds.T,
            "t_logits_per_text": scale_t * text_embeds @ audio_mlp.T,
        }

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        is_longer: torch.BoolTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> AFClapOutput | tuple:
        """Audio-text similarities, as transformers' ``ClapModel``.

        Args:
            input_ids, attention_mask: tokenized texts (see [`get_text_features`]).
            input_features, is_longer: fusion inputs (see [`get_audio_features`]).
            return_loss: also return the symmetric contrastive loss (clip i matches text i).

        Returns:
            [`AFClapOutput`]: `logits_per_audio = exp(logit_scale_a) * audio_embeds @ text_embeds.T` and its
            transpose `logits_per_text` (the original uses `logit_scale_a` for both), and the embeddings.
        """
        if input_ids is None or input_features is None:
            raise ValueError("AFClapModel.forward needs both input_ids (texts) and input_features (audio).")
        audio_outputs = self.get_audio_features(input_features, is_longer, **kwargs)
        text_outputs = self.get_text_features(input_ids, attention_mask, **kwargs)
        audio_embeds, text_embeds = audio_outputs.pooler_output, text_outputs.pooler_output
        logits_per_audio = self.logit_scale_a.exp() * audio_embeds @ text_embeds.T
        logits_per_text = logits_per_audio.T
        loss = None
        if return_loss:
            if logits_per_audio.shape[0] != logits_per_audio.shape[1]:
                raise ValueError(
                    f"return_loss pairs clip i with text i; got {logits_per_audio.shape[0]} clips and "
                    f"{logits_per_audio.shape[1]} texts."
                )
            labels = torch.arange(logits_per_audio.shape[0], device=logits_per_audio.device)
            loss = (F.cross_entropy(logits_per_audio, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return AFClapOutput(
            loss=loss,
            logits_per_audio=logits_per_audio,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            audio_embeds=audio_embeds,
            text_model_output=text_outputs,
            audio_model_output=audio_outputs,
        )

