"""The Task base class: the per-family pieces the generic trainer and Run call."""
from __future__ import annotations

import contextlib
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.config import freeze
from jaxgen.data.fields import Input, check_field, example_arrays, gather
from jaxgen.data.pipeline import images_to_float
from jaxgen.errors import ConfigError, DataError
from jaxgen.training.config_values import plain


def build_module(class_path: str, fields: dict):
    """Instantiate "package.module:Class" with ``fields`` (lists frozen to tuples)."""
    try:
        module_name, attr = class_path.split(":")
        cls = getattr(importlib.import_module(module_name), attr)
    except (ValueError, ImportError, AttributeError) as e:
        raise ConfigError(f"model_class={class_path!r} does not name a class as 'package.module:Class' "
                          f"({e}).") from e
    try:
        return cls(**{k: freeze(v) for k, v in fields.items()})
    except TypeError as e:
        raise ConfigError(f"config.model does not fit {attr}: {e}.") from e


def class_labels(num: int, labels, num_classes: int, unconditional: str) -> np.ndarray | None:
    """int32 [num] class labels for sampling: ``labels`` (num ints, or one for all) checked to be
    in [0, num_classes), by default 0, 1, ..., K-1, 0, ...; None when num_classes is 0 (then
    passing labels is a DataError saying ``unconditional``)."""
    if num_classes == 0:
        if labels is not None:
            raise DataError(f"{unconditional}: it takes no labels.")
        return None
    if labels is None:
        return (np.arange(num) % num_classes).astype(np.int32)
    labels = np.asarray(labels)
    if labels.ndim == 0:
        labels = np.full((num,), labels)
    if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels have shape {labels.shape} and dtype {labels.dtype}; pass {num} "
                        "integer class labels (or one for all).")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"labels must be class ids in [0, {num_classes - 1}]; got "
                        f"[{labels.min()}, {labels.max()}].")
    return labels.astype(np.int32)


class Task:
    """Subclasses set ``name`` and implement init_params, loss_fn; optionally preview, evaluate
    and the Run abilities.

    The training contract, for every family:

    * ``inputs()`` names the fields one training example needs, each a
      ``jaxgen.data.fields.Input`` (kind, per-example shape, optional); the default is
      {"image": uint8 [H, W, C], "label": int32 [] optional} from config.model.image_size and
      in_channels. ``batch_arrays`` gathers exactly those from the dataset (a missing or
      mis-shaped field is a DataError naming it) and turns them into the host arrays the input
      pipeline indexes; ``example_batch`` builds a one-example batch of the same shapes.
    * ``abilities`` names the methods a trained Run offers (``run.sample``, ``run.encode``,
      ``run.edit``, ...). Each is a task method ``fn(variables, *args, **kwargs)``; the Run binds
      its variables and forwards the call, so a new family adds abilities without touching the
      Run, ``train.sample`` or ``train.eval``.

    Model state (non-parameter Flax collections the forward pass updates, e.g. an EMA codebook's
    ``"vq_ema"`` or BatchNorm's ``"batch_stats"``): a task that has some returns it from
    ``init_variables`` and implements ``loss_fn_with_state`` (the trainer then uses that instead of
    ``loss_fn``, checkpoints the state and hands it to the Run) and ``bind_state``, which joins
    parameters and model state into what its inference functions take.
    """

    name = "task"
    stages: tuple[str, ...] = ("main",)
    abilities: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config
        self.model = build_module(config.model_class, config.model.to_dict())

    def stage_task(self, stage: str, frozen: dict, config) -> "Task":
        """The task that trains ``stage`` with ``config`` (the stage's merged config), given the
        earlier stages' final parameters ``frozen`` ({stage: params}). Single-stage tasks
        return themselves."""
        return self

    def attach(self, workdir: str, training: bool) -> None:
        """Called with the run directory before anything else: when training (on every process;
        only process 0 should write) and by load_run (training=False). Tasks that keep files
        beside the checkpoints (e.g. a tokenizer trained on the captions) create or read them here.
        """

    # -- data --------------------------------------------------------------------------------
    def inputs(self) -> dict[str, Input]:
        """The fields one training example needs: {name: Input}. Default: an image at the
        model's size and an optional class label."""
        m = self.config.model
        return {"image": Input("image", (m.image_size, m.image_size, m.in_channels), doc="the training image"),
                "label": Input("int", (), optional=True, doc="class id")}

    def load_data(self, split: str):
        """The ArrayDataset of ``split`` (config.data.name, prepared offline on first use; the
        optional config.data.options are passed to load_dataset, e.g. fields=("source", "image")
        for a paired image folder)."""
        from jaxgen.data import load_dataset

        data_dir = self.config.data.get("data_dir") or None
        options = plain(self.config.data.get("options", None) or {})
        options = {k: v for k, v in options.items() if v is not None}     # unset options: the source's defaults
        return load_dataset(self.config.data.name, split, data_dir=data_dir, **options)

    def gather(self, ds) -> dict:
        """The fields of ``inputs()`` from the dataset ``ds``, checked (jaxgen.data.fields.gather),
        without the examples whose label is in config.data.exclude_labels (anomaly detection:
        train without some classes, score them at evaluation)."""
        try:
            arrays = gather(ds, self.inputs(), where=f"{self.name} task on {ds.name}/{ds.split}")
        except DataError as e:
            hint = self._size_hint(ds)
            if not hint:
                raise
            raise DataError(f"{e} {hint}") from None
        exclude = tuple(self.config.data.get("exclude_labels", ()) or ())
        if exclude:
            if "label" not in arrays:
                raise DataError(f"data.exclude_labels={list(exclude)} but dataset {self.config.data.name!r} "
                                "has no labels; clear data.exclude_labels.")
            keep = ~np.isin(arrays["label"], exclude)
            arrays = {k: (v[keep] if isinstance(v, np.ndarray) else [t for t, k_ in zip(v, keep) if k_])
                      for k, v in arrays.items()}
        return arrays

    def _size_hint(self, ds) -> str:
        """What a config can set when a dataset's images are not the size or channel count the
        model declares ("" when they are)."""
        hints = []
        for name, spec in self.inputs().items():
            if spec.kind != "image" or name not in ds.field_names or len(spec.shape) < 3:
                continue
            got = tuple(np.shape(ds.field(name))[1:])
            if len(got) != len(spec.shape):
                continue
            (h, w, c), (H, W, C) = got[-3:], spec.shape[-3:]
            if (H, W) != (h, w) and H is not None and W is not None:
                hint = f"resize the data with --config.data.options.resolution={H} (image folders and TFDS datasets)"
                if "image_size" in self.config.model:
                    hint += f", or set config.model.image_size={h} to train at {h}x{w}"
                hints.append(hint)
            if C is not None and c != C:
                field = "in_channels" if "in_channels" in self.config.model else "channels"
                hints.append(f"the data has {c} channel(s) and the model {C}: set config.model.{field}={c}"
                             + (", or give the folder as grey with data.options.grayscale=('image',) in "
                                "the config file" if C == 1 and name == "image" else ""))
        return ("To fix: " + "; ".join(hints) + ".") if hints else ""

    def batch_arrays(self, ds) -> dict[str, np.ndarray]:
        """Host arrays the pipeline indexes, {name: array [N, ...]}: the gathered inputs. Tasks
        with text inputs override this to turn text into arrays (token ids, table rows)."""
        arrays = self.gather(ds)
        text = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
        if text:
            raise TypeError(f"{type(self).__name__} declares text input(s) {text} but does not turn them "
                            "into arrays: override batch_arrays.")
        return arrays

    def check_field(self, name: str, values) -> np.ndarray:
        """One input field given by a user (all examples), checked against ``inputs()[name]``:
        e.g. images uint8 [N, H, W, C] at the dataset's resolution, or a DataError saying what is
        wrong."""
        spec = self.inputs().get(name)
        if spec is None:
            raise DataError(f"a {self.name!r} run takes no {name!r}; it takes {', '.join(self.inputs())}.")
        try:
            return check_field(name, values, spec, where=f"a {self.name!r} run")
        except DataError as e:
            res = (self.config.data.get("options", None) or {}).get("resolution", None)
            if spec.kind != "image" or res is None or np.shape(values)[-3:-1] == (res, res):
                raise
            raise DataError(f"{e} This run trained on images resized and center-cropped to {res}x{res} "
                            "(config.data.options.resolution): give yours the same way, e.g. "
                            "jaxgen.data.folder.resize_center_crop(image, "
                            f"({res}, {res})) per image.") from None

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] at the dataset's resolution, or a DataError saying what is wrong."""
        return self.check_field("image", images)

    def example_batch(self) -> dict:
        """A one-example batch of the right shapes and dtypes (for init / eval_shape): zeros of
        every non-text input, optional ones included."""
        return example_arrays(self.inputs())

    # -- model -------------------------------------------------------------------------------
    def init_params(self, key: jax.Array, batch: dict) -> Any:
        """Fresh parameters from one example batch (shapes only matter)."""
        x = images_to_float(batch["image"][:1])
        return self.model.init(key, x)["params"]

    @contextlib.contextmanager
    def computing_in(self, dtype):
        """For as long as the context lasts, ``self.model`` computes in ``dtype`` (a clone with its
        ``dtype`` field set; the parameters stay what the caller passes). The trainer traces the
        loss inside it under config.compute_dtype, so convolutions and matmuls run in bf16/fp16
        (the modules keep normalisation statistics and softmax in float32); previews, sampling and
        evaluation keep the float32 model. float32, no model, or a model without a ``dtype``
        field: nothing changes."""
        model = getattr(self, "model", None)
        if dtype == jnp.float32 or model is None or "dtype" not in getattr(model, "__dataclass_fields__", {}):
            yield
            return
        self.model = model.clone(dtype=dtype)
        try:
            yield
        finally:
            self.model = model

    def init_variables(self, key: jax.Array, batch: dict) -> tuple[Any, Any]:
        """(params, model_state) from one example batch; model_state is None (the default) for a
        task whose model keeps no non-parameter collections."""
        return self.init_params(key, batch), None

    def loss_fn(self, params: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        raise TypeError(f"{type(self).__name__} defines no loss_fn")

    def loss_fn_with_state(self, params: Any, model_state: Any, batch: dict, key: jax.Array
                           ) -> tuple[jax.Array, tuple[dict, Any]]:
        """The objective of a task with model state: (loss, (metrics, new_model_state))."""
        raise TypeError(f"{type(self).__name__}.init_variables returned a model state, but the task "
                        "defines no loss_fn_with_state(params, model_state, batch, key) to update it.")

    def bind_state(self, params: Any, model_state: Any) -> Any:
        """What this task's inference functions (preview, the Run abilities, later stages) take as
        ``params``: the parameters themselves when there is no model state (the default)."""
        if model_state is not None:
            raise TypeError(f"{type(self).__name__} has a model state but defines no bind_state(params, "
                            "model_state) saying how its inference functions receive it.")
        return params

    def preview(self, params: Any, batch: dict) -> np.ndarray | None:
        """A uint8 image grid [H, W, C] to write as PNG during training (None: no preview)."""
        return None

    def evaluate(self, run, out_dir: str) -> dict:
        """Metrics for ``python -m train.eval``; may write PNGs into out_dir."""
        return {}
