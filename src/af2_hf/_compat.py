"""What differs between the transformers 5.x releases af2-hf supports (>= 5.17).

* The cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache`` (forward arguments, model outputs,
  ``generate``'s model kwargs, ``create_causal_mask``); older releases only know ``past_key_values``.
  :data:`CACHE_KEY` is the name the installed release uses, and the AF2 models accept both spellings.
* Composite configs: releases before ``SubConfigSpec`` declare sub-configs as ``sub_configs`` and build them in
  ``__post_init__``.
"""

from transformers.modeling_outputs import BaseModelOutputWithPast


try:  # transformers >= 5.2x
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # pragma: no cover - depends on the installed release
    SubConfigSpec = None


#: The name of the cache argument / output field in the installed transformers.
CACHE_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output):
    """The cache held by a model output, under whichever name the installed transformers gives it."""
    return getattr(output, CACHE_KEY, None)


def pick_cache(cache, past_key_values):
    """Merge the two spellings of the cache argument of an AF2 forward (only one may be given)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache as either `cache` or `past_key_values`, not both.")
    return cache if cache is not None else past_key_values
