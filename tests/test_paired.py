"""The training contract on a paired-image task: colorization trained from a paired folder
(configs/paired_colorize.py), through named fields, declared inputs and declared abilities."""
import json
import os

import numpy as np
import pytest

from jaxgen.data import load_dataset
from jaxgen.data.dataset import ArrayDataset
from jaxgen.data.fields import Input, gather
from jaxgen.data.paired_example import grey_rgb, write_paired_shapes
from jaxgen.errors import DataError
from jaxgen.training.tasks import make_task
from jaxgen.training.trainer import train


def paired_config(folder, steps=2):
    import configs.paired_colorize as cfg

    c = cfg.get_config("tiny")
    c.data.name = f"folder:{folder}"
    c.total_steps = steps
    c.checkpoint_every = steps
    return c


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pairs"))
    write_paired_shapes(folder, {"train": 96, "test": 32})
    return folder


@pytest.fixture(scope="module")
def run(pairs, tmp_path_factory):
    c = paired_config(pairs, steps=300)
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    return train(c, str(tmp_path_factory.mktemp("paired_run")))


def test_paired_folder_reads_as_named_fields(pairs):
    ds = load_dataset(f"folder:{pairs}", "train", fields=("source", "image"))
    assert ds.images.shape == (96, 32, 32, 3) and ds.field("source").shape == (96, 32, 32, 3)
    np.testing.assert_array_equal(ds.field("source"), grey_rgb(ds.images))
    assert "source" in ds.field_names and len(ds.captions) == 96


def test_paired_run_learns_and_offers_translate(run, pairs, tmp_path):
    """get_config("tiny") trained with train(): the task's inputs reach the step, the loss falls,
    and the run's declared ability ``translate`` maps sources to colour better than the source."""
    assert "translate" in run.abilities and "sample" not in run.abilities
    rows = [json.loads(line) for line in open(os.path.join(run.workdir, "metrics.jsonl"))]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    test = load_dataset(f"folder:{pairs}", "test", fields=("source", "image"))
    out = run.translate(test.field("source"))
    assert out.shape == test.images.shape and out.dtype == np.uint8
    metrics = run.task.evaluate(run, str(tmp_path))
    assert metrics["test_mse"] < metrics["source_as_output_mse"], metrics
    assert os.path.isfile(tmp_path / "paired.png")
    with pytest.raises(AttributeError, match="offers encode, decode"):
        run.edit
    with pytest.raises(DataError, match="'source'"):
        run.translate(test.images[:, :16, :16])


def test_missing_and_misshaped_fields_name_the_field(pairs, tmp_path):
    task = make_task(paired_config(pairs))
    plain = load_dataset(f"folder:{pairs}", "train", fields=("image",))     # the targets only
    with pytest.raises(DataError, match=r"missing field\(s\) 'source'.*it has image, caption"):
        task.batch_arrays(plain)
    bad = ArrayDataset(images=plain.images, arrays={"source": plain.images[:, :16, :16]}, name="x", split="train")
    with pytest.raises(DataError, match=r"field 'source' is uint8 \[96, 16, 16, 3\]; this task takes uint8 \[N, 32, 32, 3\]"):
        task.batch_arrays(bad)
    arrays = task.batch_arrays(ArrayDataset(images=plain.images, arrays={"source": plain.images}))
    assert set(arrays) == {"image", "source"}
    assert set(task.example_batch()) == {"image", "label", "source"}


def test_fields_of_any_rank_batch_as_a_pure_function_of_seed_and_step():
    from jaxgen.data import pipeline

    n = 12
    frames = np.arange(n * 4 * 2 * 2 * 3, dtype=np.uint8).reshape(n, 4, 2, 2, 3)   # clips [N, F, H, W, C]
    ds = ArrayDataset(arrays={"frames": frames, "noise_level": np.arange(n)},
                      texts={"instruction": [f"edit {i}" for i in range(n)]}, name="clips", split="train")
    fields = gather(ds, {"frames": Input("image", (None, 2, 2, 3)), "noise_level": Input("int"),
                         "instruction": Input("text", optional=True)})
    arrays = {k: v for k, v in fields.items() if k != "instruction"}
    a = pipeline.host_batch(arrays, 4, seed=3, step=5)
    b = pipeline.host_batch(arrays, 4, seed=3, step=5)
    assert a["frames"].shape == (4, 4, 2, 2, 3)
    np.testing.assert_array_equal(a["frames"], b["frames"])
    np.testing.assert_array_equal(a["frames"][:, 0, 0, 0, 0], frames[a["noise_level"], 0, 0, 0, 0])
    with pytest.raises(DataError, match="field 'frames' is uint8 \\[12, 4, 2, 2, 3\\]; this task takes uint8 \\[N, 8"):
        gather(ds, {"frames": Input("image", (8, 2, 2, 3))})
