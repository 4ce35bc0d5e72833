"""``load_pretrained`` / ``save_pretrained``: diffusers and transformers folders <-> jaxgen modules.

The class comes from config.json: ``_class_name`` (diffusers) or ``architectures[0]``
(transformers), looked up in ``CLASSES``, a plain dict of class name -> "module:attribute".
A convertible module mixes in ``Pretrained`` and states, as class attributes, its library, its
weight file name and what it does not implement; the key table comes from ``jaxgen.convert.tables``.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.errors import FlaxError

from jaxgen.convert import tables
from jaxgen.convert.config import check_types, filter_config, module_fields, read_json, write_json
from jaxgen.convert.safetensors_io import read_weights, write_weights
from jaxgen.errors import ConfigError, JaxgenError, WeightError

# Fields that say how jaxgen runs a model, not what the model is: never read from or written to
# config.json (transformers writes "dtype" there to describe the stored weights).
RUNTIME_FIELDS = ("attention_impl", "dtype", "param_dtype", "scan_layers")
# What building a module from impossible config values raises (inside Flax, JAX or NumPy).
BUILD_ERRORS = (TypeError, ValueError, ArithmeticError, IndexError, KeyError, AssertionError, FlaxError)
DIFFUSERS_VERSION = "0.36.0"      # written into configs we save; diffusers reads any version
TRANSFORMERS_VERSION = "4.57.0"

# PyTorch class name -> where jaxgen implements it. Plain data: add a line per new class.
CLASSES: dict[str, str] = {
    "UNet2DModel": "jaxgen.nn.unet:UNet2DModel",
    "UNet2DConditionModel": "jaxgen.nn.unet:UNet2DConditionModel",
    "UNet3DConditionModel": "jaxgen.nn.unet3d:UNet3DConditionModel",
    "ControlNetModel": "jaxgen.nn.controlnet:ControlNetModel",
    "AutoencoderKL": "jaxgen.nn.vae:AutoencoderKL",
    "VQModel": "jaxgen.nn.vq:VQModel",
    "CLIPTextModel": "jaxgen.nn.clip:CLIPTextModel",
    "CLIPTextModelWithProjection": "jaxgen.nn.clip:CLIPTextModelWithProjection",
    "CLIPVisionModel": "jaxgen.nn.clip:CLIPVisionModel",
    "CLIPVisionModelWithProjection": "jaxgen.nn.clip:CLIPVisionModelWithProjection",
    "CLIPModel": "jaxgen.nn.clip:CLIPModel",
    "ConvAutoencoder": "jaxgen.nn.autoencoder:ConvAutoencoder",
    "DenseAutoencoder": "jaxgen.nn.autoencoder:DenseAutoencoder",
    "ConvVAE": "jaxgen.nn.autoencoder:ConvVAE",
}


class Pretrained:
    """Mixin for Linen modules that load from and save to PyTorch-format folders.

    Class attributes a module sets:
      pt_library:      "diffusers" or "transformers" (or "jaxgen" for jaxgen-only models)
      pt_weights_name: the weight file's stem ("diffusion_pytorch_model" / "model")
      pt_supported:    field -> implemented values (tuple) or predicate; other values are errors
      pt_ignore:       regexes of PyTorch buffer keys that are not parameters
    and it implements ``dummy_inputs()`` -> (args, kwargs) for a tiny forward pass, used to
    learn the parameter shapes without computing anything (jax.eval_shape).
    """

    pt_library: ClassVar[str] = "diffusers"
    pt_weights_name: ClassVar[str] = "diffusion_pytorch_model"
    pt_supported: ClassVar[Mapping[str, Any]] = {}
    pt_aliases: ClassVar[Mapping[str, str]] = {}
    pt_ignore: ClassVar[tuple[str, ...]] = ()

    # -- config -----------------------------------------------------------------------------
    @classmethod
    def config_fields(cls) -> dict[str, Any]:
        """The fields config.json carries: the dataclass fields less RUNTIME_FIELDS."""
        return {k: v for k, v in module_fields(cls).items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_pt_config(cls, cfg: Mapping[str, Any], **runtime):
        """The module described by a PyTorch-side config dict (tolerant, see jaxgen.convert.config);
        ``runtime`` sets the RUNTIME_FIELDS the class has (attention_impl, dtype, param_dtype,
        scan_layers)."""
        unknown = set(runtime) - set(RUNTIME_FIELDS)
        if unknown:
            raise TypeError(f"from_pt_config: unexpected arguments {sorted(unknown)}; runtime options are "
                            f"{RUNTIME_FIELDS}.")
        kwargs = filter_config(cfg, cls.config_fields(), owner=cls.__name__, supported=cls.pt_supported,
                               aliases=cls.pt_aliases)
        return cls(**kwargs, **runtime)

    def pt_config(self) -> dict[str, Any]:
        """The config.json dict PyTorch's class reads back."""
        fields = {k: getattr(self, k) for k in self.config_fields()}
        name = self.pt_class_name()
        if self.pt_library == "transformers":
            return {"architectures": [name], **fields, "transformers_version": TRANSFORMERS_VERSION}
        if self.pt_library == "jaxgen":
            from jaxgen import __version__

            return {"_class_name": name, "_jaxgen_version": __version__, **fields}
        return {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION, **fields}

    def check_supported(self) -> None:
        """A ConfigError naming the first field whose value ``pt_supported`` does not allow (for
        modules built directly, not through from_pt_config)."""
        defaults = module_fields(type(self))
        for field, check in self.pt_supported.items():
            value = getattr(self, field)
            if value is None and defaults[field] is None:
                continue
            if not (check(value) if callable(check) else value in check):
                raise ConfigError(f"{type(self).__name__}: {field}={value!r} is not implemented by jaxgen.")

    @classmethod
    def pt_class_name(cls) -> str:
        return cls.__name__

    # -- weights ----------------------------------------------------------------------------
    def pt_renames(self) -> Mapping[str, str]:
        """Explicit exceptions to the naming rule: rule key -> PyTorch key."""
        return {}

    def dummy_inputs(self) -> tuple[tuple, dict]:
        raise TypeError(f"{type(self).__name__} must define dummy_inputs() to be converted")

    def abstract_params(self) -> dict:
        """The ``params`` tree as ShapeDtypeStructs (no compute, no memory). Config values that do
        not build a model (a zero or negative size, groups that do not divide the channels) are a
        ConfigError quoting what failed."""
        def init():  # the dummy inputs are made inside the trace: abstract too, whatever the sizes
            args, kwargs = self.dummy_inputs()
            return self.init(jax.random.key(0), *args, **kwargs)

        try:
            shapes = jax.eval_shape(init)
        except JaxgenError:
            raise
        except BUILD_ERRORS as e:
            raise ConfigError(f"{type(self).__name__} cannot be built from these config values "
                              f"({type(e).__name__}: {str(e).splitlines()[0].rstrip('.') if str(e) else ''}).") from e
        return shapes["params"]

    def params_from_state_dict(self, state_dict: Mapping[str, np.ndarray], dtype=np.float32) -> dict:
        return tables.torch_to_flax(state_dict, self.abstract_params(), renames=self.pt_renames(),
                                    ignore=self.pt_ignore, owner=type(self).__name__, dtype=dtype)

    def state_dict_from_params(self, params: Mapping[str, Any], dtype=None) -> dict[str, np.ndarray]:
        return tables.flax_to_torch(params, renames=self.pt_renames(), dtype=dtype)


def _resolve(name: str):
    import importlib

    if name not in CLASSES:
        raise ConfigError(f"jaxgen has no implementation of {name!r}; it implements "
                          f"{', '.join(sorted(CLASSES))}.")
    module_name, attr = CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def class_name_of(cfg: Mapping[str, Any], where: str) -> str:
    """``_class_name`` (diffusers) or ``architectures[0]`` (transformers) of a config dict."""
    if "_class_name" in cfg:
        name, field = cfg["_class_name"], "_class_name"
    elif isinstance(cfg.get("architectures"), (list, tuple)) and cfg["architectures"]:
        name, field = cfg["architectures"][0], "architectures"
    else:
        raise ConfigError(f"{where}: config names no class (no '_class_name' and no 'architectures').")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: {field} must name a class (a string such as 'UNet2DModel'), "
                          f"found {name!r}.")
    return name


def load_pretrained(folder: str | os.PathLike, *, dtype=jnp.float32, allow_pickle: bool = False,
                    compute_dtype=None):
    """Load a diffusers / transformers ``save_pretrained`` folder.

    folder: holds config.json and the weights (``diffusion_pytorch_model.safetensors``,
            ``model.safetensors`` or a sharded ``*.safetensors.index.json``).
    dtype:  parameter dtype (float32 by default; None keeps the stored dtypes).
    compute_dtype: None keeps the module's (float32); e.g. jnp.bfloat16 returns the module with
            its ``dtype`` field set, so its convolutions and matmuls run in bf16 (normalisation
            statistics and softmax stay float32).
    allow_pickle: read .bin/.ckpt files with torch's weights-only loader (refused otherwise).
    Returns (module, params): ``module.apply({"params": params}, ...)``.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: no such folder. jaxgen loads from local folders; download a "
                          "model first (e.g. huggingface_hub.snapshot_download) and pass its path.")
    cfg_path = os.path.join(folder, "config.json")
    cfg = read_json(cfg_path)
    cls = _resolve(class_name_of(cfg, cfg_path))
    module = cls.from_pt_config(cfg)
    check_types({k: getattr(module, k) for k in cls.config_fields()}, cls, owner=f"{cfg_path}: {cls.__name__}")
    state = read_weights(folder, (cls.pt_weights_name,), allow_pickle=allow_pickle)
    try:
        params = module.params_from_state_dict(state, dtype=None if dtype is None else np.dtype(dtype))
    except WeightError as e:  # keys, shapes, dtypes or values that do not fit: say which folder
        raise WeightError(f"{folder}: {e}") from e
    except ConfigError as e:  # the config's values do not build a model (abstract_params)
        given = {getattr(cls, "pt_aliases", {}).get(k, k) for k in cfg}
        defaults = [f"{k}={getattr(module, k)!r}" for k in cls.config_fields() if k not in given]
        hint = f" Fields config.json does not set took their defaults: {', '.join(defaults[:12])}." if defaults else ""
        raise ConfigError(f"{cfg_path}: {e}{hint}") from e
    if compute_dtype is not None:
        module = module.clone(dtype=compute_dtype)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def save_pretrained(module, params: Mapping[str, Any], folder: str | os.PathLike, *, dtype=None) -> str:
    """Write ``module``'s config.json and weights in the PyTorch library's own layout.

    params: the ``params`` collection (a dict with a top-level "params" key is accepted too).
    dtype:  cast the saved tensors (e.g. np.float16); None keeps them.
    Returns the folder path; diffusers' / transformers' ``from_pretrained`` loads it.
    """
    if not isinstance(module, Pretrained):
        raise TypeError(f"{type(module).__name__} cannot be saved in a PyTorch layout.")
    folder = os.fspath(folder)
    if "params" in params and len(params) == 1:
        params = params["params"]
    os.makedirs(folder, exist_ok=True)
    state = module.state_dict_from_params(params, dtype=dtype)
    write_weights(folder, module.pt_weights_name, state)
    write_json(os.path.join(folder, "config.json"), module.pt_config())
    return folder
