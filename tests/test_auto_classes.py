"""Audio Flamingo 2 is registered under every Auto class that the installed transformers registers AudioFlamingo3 and
Qwen2-Audio under (the list is read from the installed release's Auto mappings, so a release that adds one fails
here until af2_hf registers it too), and each of them loads a saved AF2 folder."""

import pytest
import transformers
import transformers.models.auto.modeling_auto as modeling_auto
from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

import af2_hf
from af2_hf import AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model

REFERENCE_MODEL_TYPES = ("audioflamingo3", "qwen2_audio")


def _auto_model_classes_of_reference_models() -> set[str]:
    """Names of the AutoModel* classes whose mapping lists AudioFlamingo3 or Qwen2-Audio in the installed release."""
    names = set()
    for name in dir(modeling_auto):
        mapping = getattr(getattr(modeling_auto, name), "_model_mapping", None)
        if name.startswith("AutoModel") and mapping is not None:
            if any(model_type in mapping._model_mapping for model_type in REFERENCE_MODEL_TYPES):
                names.add(name)
    return names


def test_reference_models_are_found_in_the_installed_release():
    names = _auto_model_classes_of_reference_models()
    assert {"AutoModel", "AutoModelForPreTraining", "AutoModelForSeq2SeqLM"} <= names
    assert all(model_type in TOKENIZER_MAPPING_NAMES for model_type in REFERENCE_MODEL_TYPES)


@pytest.mark.parametrize("auto_name", sorted(_auto_model_classes_of_reference_models()))
def test_every_auto_model_class_of_the_reference_models_maps_af2(auto_name):
    mapped = getattr(modeling_auto, auto_name)._model_mapping[AudioFlamingo2Config]
    base = auto_name == "AutoModel"
    assert mapped is (AudioFlamingo2Model if base else AudioFlamingo2ForConditionalGeneration)


def test_tokenizer_feature_extractor_and_processor_auto_classes_map_af2():
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    assert all(model_type in FEATURE_EXTRACTOR_MAPPING_NAMES for model_type in REFERENCE_MODEL_TYPES)
    assert all(model_type in PROCESSOR_MAPPING_NAMES for model_type in REFERENCE_MODEL_TYPES)
    tokenizers = TOKENIZER_MAPPING[AudioFlamingo2Config]  # a class, or (slow, fast) on some releases
    assert transformers.Qwen2Tokenizer in (tokenizers if isinstance(tokenizers, tuple) else (tokenizers,))
    assert FEATURE_EXTRACTOR_MAPPING[AudioFlamingo2Config] is af2_hf.AudioFlamingo2FeatureExtractor
    assert PROCESSOR_MAPPING[AudioFlamingo2Config] is af2_hf.AudioFlamingo2Processor


def test_auto_classes_load_a_saved_af2_folder(tmp_path):
    from transformers import AutoTokenizer

    from af2_hf.tiny import make_tiny_model

    make_tiny_model(tmp_path / "tiny")
    for auto_name in sorted(_auto_model_classes_of_reference_models()):
        model = getattr(modeling_auto, auto_name).from_pretrained(tmp_path / "tiny")
        assert isinstance(model, AudioFlamingo2Model if auto_name == "AutoModel" else AudioFlamingo2ForConditionalGeneration)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids("<audio>")) == "<audio>"


def test_modeling_auto_has_no_other_reference_mapping():
    """Every *_MAPPING_NAMES of modeling_auto listing a reference model belongs to an Auto class checked above."""
    listed = {
        name for name in dir(modeling_auto)
        if name.endswith("_MAPPING_NAMES") and name != "CONFIG_MAPPING_NAMES"
        and any(model_type in getattr(modeling_auto, name) for model_type in REFERENCE_MODEL_TYPES)
    }
    covered = {
        getattr(modeling_auto, auto_name)._model_mapping._model_mapping is getattr(modeling_auto, name) and name
        for auto_name in _auto_model_classes_of_reference_models() for name in listed
    } - {False}
    assert covered == listed
