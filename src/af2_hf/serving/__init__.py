"""Serving Audio Flamingo 2: an OpenAI-compatible HTTP server (``af2-hf serve``) and what the demo shares with it.

- :mod:`.engine`: the generation queue (one model, one ``generate`` at a time, streaming, cancellation);
- :mod:`.openai_schema`: the accepted OpenAI chat-completions requests and their translation;
- :mod:`.app`: the FastAPI application (routes, errors in OpenAI's shape, server-sent events);
- :mod:`.model_info`: the model's name and licence, as the server and the demo show them.

``transformers serve`` is not used: it picks a model's modality from transformers' own static class tables
(``MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES``) and loads the class named in ``config.architectures`` from the
``transformers`` namespace, so a model registered from outside (``AutoModelForMultimodalLM.register``) is refused
("Unknown modality") without patching transformers (5.17 to 5.24). FastAPI and uvicorn come with the ``serve``
extra: ``pip install -e ".[serve]"``.
"""
