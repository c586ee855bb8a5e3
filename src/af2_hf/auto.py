"""Registers Audio Flamingo 2 with the transformers Auto classes and the ``audio-question-answering`` pipeline task.

Imported by ``af2_hf/__init__.py``, so ``import af2_hf`` is enough for::

    AutoConfig / AutoModel / AutoModelForMultimodalLM / AutoModelForPreTraining / AutoModelForSeq2SeqLM /
    AutoTokenizer / AutoProcessor / AutoFeatureExtractor.from_pretrained(dir)
    pipeline("audio-question-answering", model=dir)

Registration is idempotent (re-importing or reloading the module registers the same classes again without error).
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForMultimodalLM,
    AutoModelForPreTraining,
    AutoModelForSeq2SeqLM,
    AutoProcessor,
    AutoTokenizer,
    Qwen2Tokenizer,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_audioflamingo2 import AudioFlamingo2Config
from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
from .modeling_audioflamingo2 import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model
from .pipeline_audio_question_answering import AudioQuestionAnsweringPipeline

__all__ = ["AUDIO_QUESTION_ANSWERING_TASK", "register_afclap_classes", "register_auto_classes"]

AUDIO_QUESTION_ANSWERING_TASK = "audio-question-answering"


class _NoDefaultModel(dict):
    """The task's ``default`` entry: there is no default checkpoint to download, so ``pipeline(task)`` without a
    model raises a clear error (transformers looks up ``default["model"]``; a missing entry is a bare KeyError)."""

    def __contains__(self, key) -> bool:
        return key == "model" or super().__contains__(key)

    def __getitem__(self, key):
        if key == "model":
            raise ValueError(
                f"The {AUDIO_QUESTION_ANSWERING_TASK!r} pipeline has no default model: pass one, e.g. "
                f"pipeline({AUDIO_QUESTION_ANSWERING_TASK!r}, model='path/to/converted-af2') (a folder written by "
                "`af2-hf convert`)."
            )
        return super().__getitem__(key)


def register_auto_classes() -> None:
    """Registers the AF2 classes with the Auto classes and the ``audio-question-answering`` pipeline task.

    The classes are also registered for remote code (``register_for_auto_class``): every ``save_pretrained`` of an
    AF2 config, model, processor or feature extractor copies its module (and the modules it imports relatively)
    into the output directory and records it in ``auto_map``, so a saved directory loads with
    ``trust_remote_code=True`` where ``af2_hf`` is not installed. (:func:`af2_hf.add_remote_code` adds the
    ``AutoModel`` entry and the pipeline.)
    """
    from .processing_audioflamingo2 import AudioFlamingo2Processor

    AutoConfig.register(AudioFlamingo2Config.model_type, AudioFlamingo2Config, exist_ok=True)
    AutoModel.register(AudioFlamingo2Config, AudioFlamingo2Model, exist_ok=True)
    AutoModelForMultimodalLM.register(AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, exist_ok=True)
    # The other Auto classes transformers registers AudioFlamingo3 / Qwen2-Audio under (so code written for those
    # works with an AF2 folder; tests/test_auto_classes.py derives the list from the installed release).
    AutoModelForPreTraining.register(AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, exist_ok=True)
    AutoModelForSeq2SeqLM.register(AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(AudioFlamingo2Config, tokenizer_class=Qwen2Tokenizer, exist_ok=True)
    AutoFeatureExtractor.register(AudioFlamingo2Config, AudioFlamingo2FeatureExtractor, exist_ok=True)
    AutoProcessor.register(AudioFlamingo2Config, AudioFlamingo2Processor, exist_ok=True)

    AudioFlamingo2Config.register_for_auto_class("AutoConfig")
    AudioFlamingo2Model.register_for_auto_class("AutoModel")
    AudioFlamingo2ForConditionalGeneration.register_for_auto_class("AutoModelForMultimodalLM")
    AudioFlamingo2FeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
    AudioFlamingo2Processor.register_for_auto_class("AutoProcessor")

    registered = PIPELINE_REGISTRY.supported_tasks.get(AUDIO_QUESTION_ANSWERING_TASK)
    if registered is None or registered.get("impl") is not AudioQuestionAnsweringPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            AUDIO_QUESTION_ANSWERING_TASK,
            pipeline_class=AudioQuestionAnsweringPipeline,
            pt_model=AutoModelForMultimodalLM,
            default=_NoDefaultModel(),
            type="multimodal",
        )


def register_afclap_classes() -> None:
    """Registers AF-CLAP (``model_type="afclap"``) with AutoConfig/AutoModel/AutoFeatureExtractor/AutoProcessor;
    transformers' ``zero-shot-audio-classification`` pipeline then loads a converted folder through AutoModel (its
    implementation becomes :class:`CheckedZeroShotAudioClassificationPipeline`: label checks, AF-CLAP file loading)."""
    from .configuration_afclap import AFClapConfig
    from .feature_extraction_afclap import AFClapFeatureExtractor
    from .modeling_afclap import AFClapModel
    from . import pipeline_zero_shot_audio_classification as zero_shot
    from .processing_afclap import AFClapProcessor

    AutoConfig.register(AFClapConfig.model_type, AFClapConfig, exist_ok=True)
    AutoModel.register(AFClapConfig, AFClapModel, exist_ok=True)
    AutoFeatureExtractor.register(AFClapConfig, AFClapFeatureExtractor, exist_ok=True)
    AutoProcessor.register(AFClapConfig, AFClapProcessor, exist_ok=True)
    zero_shot.register_pipeline()


register_auto_classes()
register_afclap_classes()
