"""What differs between the transformers 5.x releases af2-hf supports (>= 5.17).

* The cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache`` (forward arguments, model outputs,
  ``generate``'s model kwargs, ``create_causal_mask``); older releases only know ``past_key_values``.
  :data:`CACHE_KEY` is the name the installed release uses. The AF2 forwards take ``cache`` and, through
  :func:`cache_argument`, still accept ``past_key_values``: with a deprecation warning exactly as transformers' own
  models give it where the release renamed it, silently where ``past_key_values`` is the release's own name.
* Composite configs: releases before ``SubConfigSpec`` declare sub-configs as ``sub_configs`` and build them in
  ``__post_init__`` (:func:`build_sub_config`); newer ones take ``sub_configs_defaults`` (:func:`sub_config_specs`).
"""

import functools
import inspect

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.auto import CONFIG_MAPPING
from transformers.utils.deprecation import deprecate_kwarg


try:  # transformers >= 5.2x
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # pragma: no cover - depends on the installed release
    SubConfigSpec = None


def sub_config_specs(defaults: dict[str, dict]) -> dict:
    """``sub_configs_defaults`` of a composite config (releases with ``SubConfigSpec``): for each sub-config key, an
    ``AutoConfig`` spec built from ``defaults[key]`` (its ``model_type`` and its init kwargs)."""
    specs = {}
    for key, values in defaults.items():
        init_kwargs = {k: v for k, v in values.items() if k != "model_type"}
        specs[key] = SubConfigSpec(config_class=AutoConfig, model_type=values["model_type"], init_kwargs=init_kwargs)
    return specs


def build_sub_config(value, defaults: dict) -> PreTrainedConfig:
    """Releases without ``SubConfigSpec``: a dict or ``None`` becomes the sub-config as the newer releases build it
    from ``sub_configs_defaults`` (``None``: ``defaults``; a dict: its own values on the sub-config's defaults)."""
    if isinstance(value, PreTrainedConfig):
        return value
    kwargs = dict(defaults) if value is None else {"model_type": defaults["model_type"], **value}
    return CONFIG_MAPPING[kwargs.pop("model_type")](**kwargs)


#: The name of the cache argument / output field in the installed transformers.
CACHE_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output):
    """The cache held by a model output, under whichever name the installed transformers gives it."""
    return getattr(output, CACHE_KEY, None)


def cache_argument(forward):
    """Decorates a forward whose cache parameter is ``cache`` so that ``past_key_values=`` is also accepted.

    transformers >= 5.24: transformers' own ``deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``, the
    decorator its models (Qwen2, Llama, Mllama) carry, so the warning is theirs word for word. Older releases, where
    ``past_key_values`` is the only name: renamed silently (passing both is an error), and the signature lists
    ``past_key_values`` (generate checks its model kwargs against the forward's signature there).
    """
    if CACHE_KEY == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            past_key_values = kwargs.pop("past_key_values")
            if kwargs.get("cache") is not None and past_key_values is not None:
                raise ValueError("Pass the cache as either `cache` or `past_key_values`, not both.")
            if kwargs.get("cache") is None:
                kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    signature = inspect.signature(forward)
    parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    parameters.append(inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None))
    parameters += [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    wrapper.__signature__ = signature.replace(parameters=parameters)
    return wrapper
