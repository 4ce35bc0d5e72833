"""Bad input and damaged files (docs/RELIABILITY.md): nothing trained is lost, every user error of
every CLI entry point is one ``error:`` line with exit status 2, and a damaged checkpoint file is
named (its step and its path) while the newest intact step is used.

One tiny digits autoencoder is trained once (4 steps, a checkpoint after each, keep_checkpoints=0);
the fault-injection cases damage a copy of its last step. The CLI entry points run in this
process (``cli``): they share flag names, so each call drops the other entry modules' flags and
re-imports its own, which costs milliseconds where a subprocess costs seconds.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import io
import logging
import os
import shutil
import sys

import numpy as np
import pytest
from absl import flags

from jaxgen.errors import CheckpointError, ConfigError, DataError, NonFiniteError

CONFIG = "configs/digits_ae.py:tiny"
TRAIN_ARGS = ("--config.total_steps=4", "--config.checkpoint_every=1", "--config.keep_checkpoints=0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**changes):
    from configs.digits_ae import get_config

    c = get_config("tiny")
    c.update({"total_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 0, **changes})
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 4-step run with a checkpoint after every step (keep_checkpoints=0: all kept)."""
    from jaxgen.training.trainer import train

    workdir = str(tmp_path_factory.mktemp("rel") / "run")
    train(tiny_config(), workdir)
    return workdir


# -- the CLI, in this process ------------------------------------------------------------------
_ENTRY_FLAGS: dict[str, set[str]] = {}


def cli(module: str, *args: str) -> tuple[int, str, str]:
    """``python -m MODULE ARGS`` run in this process -> (exit status, stdout, stderr)."""
    import train.common  # noqa: F401  (its shared flags are defined once, outside every entry module)

    F = flags.FLAGS
    # restored at the end: other test files in this worker import entry modules and need their
    # flags (an entry module first imported here is forgotten again, so importing it defines them)
    saved = {name: F[name] for name in F}
    saved_modules = {m: mod for m, mod in sys.modules.items() if m.startswith("train.")}

    def owned_by(name: str) -> set[str]:
        return _ENTRY_FLAGS.get(name, set()) | {n for n in F if F.find_module_defining_flag(n) == name}

    for other in set(_ENTRY_FLAGS) | {m for m in sys.modules if m.startswith("train.") and m != "train.common"}:
        if other != module:
            for name in owned_by(other) & set(F):
                delattr(F, name)
    if module not in _ENTRY_FLAGS or not _ENTRY_FLAGS[module] <= set(F):
        for name in owned_by(module) & set(F):  # a re-import defines them anew
            delattr(F, name)
        sys.modules.pop(module, None)
        before = set(F)
        importlib.import_module(module)
        _ENTRY_FLAGS[module] = set(F) - before
    mod = sys.modules[module]
    for name in [n for n in F if "." in n]:     # --config.FIELD overrides register a flag per parse
        delattr(F, name)
    F.unparse_flags()
    argv = [module, *args]
    out, err = io.StringIO(), io.StringIO()
    old_argv, sys.argv = sys.argv, argv        # ml_collections reads --config.FIELD overrides there
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train.common.run(mod.main, argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        for name in list(F):
            if name not in saved or F[name] is not saved[name]:
                delattr(F, name)
        for name, flag in saved.items():
            if name not in F:
                F[name] = flag
        for m in [m for m in sys.modules if m.startswith("train.")]:
            if m not in saved_modules:
                sys.modules.pop(m)
        sys.modules.update(saved_modules)
        F.unparse_flags()
    return code, out.getvalue(), err.getvalue()


def assert_user_error(result, *needles):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err[-3000:])
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# -- 1. keep_checkpoints=0 keeps every checkpoint ------------------------------------------------
def test_keep_checkpoints_zero_keeps_every_step(run_dir):
    import jaxgen

    steps = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
    assert steps == [1, 2, 3, 4]
    for s in steps:
        assert os.path.isfile(os.path.join(run_dir, "checkpoints", str(s), "jaxgen_files.json"))
    assert jaxgen.load_run(run_dir).step == 4


def test_config_values_that_lose_work_or_train_wrongly_are_refused():
    from jaxgen.training.trainer import validate_config

    with pytest.raises(ConfigError, match="keep_checkpoints=-1"):
        validate_config(tiny_config(keep_checkpoints=-1))
    c = tiny_config()
    c.optim.lr = -0.001
    with pytest.raises(ConfigError, match=r"config.optim.lr=-0.001.*gradient|config.optim.lr=-0.001.*climbs"):
        validate_config(c)
    c = tiny_config()
    c.optim.b2 = 1.0
    with pytest.raises(ConfigError, match="config.optim.b2"):
        validate_config(c)


# -- 2. damaged checkpoints: fault injection -----------------------------------------------------
def _damage(path: str, how: str) -> None:
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:                                       # overwrite bytes in the middle
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(bytes(255 - b for b in f.read(16)) if size >= 32 else b"\x00")


def _digest(folder: str) -> dict[str, str]:
    return {os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)}


def _copy_steps(run_dir: str, dst: str, steps=(3, 4)) -> str:
    for s in steps:
        shutil.copytree(os.path.join(run_dir, "checkpoints", str(s)), os.path.join(dst, "checkpoints", str(s)))
    return dst


# every file kind of a step (largest match for the patterns), with a damage each; the data file
# (the case) with all three
FILE_KINDS = [
    ("state/ocdbt.process_0/d/*", "delete"), ("state/ocdbt.process_0/d/*", "truncate"),
    ("state/ocdbt.process_0/d/*", "corrupt"), ("state/ocdbt.process_0/manifest.ocdbt", "truncate"),
    ("state/manifest.ocdbt", "corrupt"), ("state/d/*", "delete"), ("state/_METADATA", "delete"),
    ("state/_sharding", "truncate"), ("state/array_metadatas/process_0", "corrupt"),
    ("config/metadata", "corrupt"), ("_CHECKPOINT_METADATA", "delete"),
]


@pytest.mark.parametrize("pattern,how", FILE_KINDS)
def test_damaged_file_is_named_and_the_newest_intact_step_loads(run_dir, tmp_path, caplog, pattern, how):
    import jaxgen

    workdir = _copy_steps(run_dir, str(tmp_path / "run"))
    step3 = _digest(os.path.join(workdir, "checkpoints", "3"))
    path = max(glob.glob(os.path.join(workdir, "checkpoints", "4", pattern)), key=os.path.getsize)
    rel = os.path.relpath(path, os.path.join(workdir, "checkpoints", "4"))
    _damage(path, how)
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        run = jaxgen.load_run(workdir)
    assert run.step == 3
    warning = " ".join(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert "step 4" in warning and rel in warning, warning
    with pytest.raises(CheckpointError) as e:
        jaxgen.load_run(workdir, step=4)
    assert "step 4" in str(e.value) and rel in str(e.value) and "--step 3" in str(e.value)
    # nothing is lost: step 3 untouched, the damaged step left where it was (load_run only reads)
    assert _digest(os.path.join(workdir, "checkpoints", "3")) == step3
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))


def test_damage_without_a_manifest_is_still_reported(run_dir, tmp_path, caplog):
    """Steps written before the manifest existed: Orbax's own error becomes the report."""
    import jaxgen

    workdir = _copy_steps(run_dir, str(tmp_path / "run"))
    os.remove(os.path.join(workdir, "checkpoints", "4", "jaxgen_files.json"))
    os.remove(os.path.join(workdir, "checkpoints", "4", "state", "_METADATA"))
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        assert jaxgen.load_run(workdir).step == 3
    assert any("step 4" in r.getMessage() and "state/_METADATA is missing" in r.getMessage()
               for r in caplog.records)


def test_no_intact_step_is_one_error_naming_every_step(run_dir, tmp_path):
    import jaxgen

    workdir = _copy_steps(run_dir, str(tmp_path / "run"))
    for s in (3, 4):
        os.remove(os.path.join(workdir, "checkpoints", str(s), "config", "metadata"))
    with pytest.raises(CheckpointError, match=r"step 4: config/metadata is missing; step 3: config/metadata is missing"):
        jaxgen.load_run(workdir)


def test_train_resumes_from_the_newest_intact_step_and_train_step_flag(run_dir, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    data = max(glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d", "*")),
               key=os.path.getsize)
    _damage(data, "truncate")
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        code, out, err = cli("train.__main__", f"--config={CONFIG}", f"--workdir={workdir}", *TRAIN_ARGS)
    assert code == 0 and "to step 4" in out, err[-3000:]
    assert any("step 4" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    ckpts = os.path.join(workdir, "checkpoints")
    # the damaged step is kept beside the new one, untouched
    assert os.path.isfile(os.path.join(ckpts, "4.damaged", os.path.relpath(data, os.path.join(ckpts, "4"))))
    assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [1, 2, 3, 4]

    # --step N resumes from N; later steps are moved aside, not deleted
    code, out, err = cli("train.__main__", f"--config={CONFIG}", f"--workdir={workdir}", "--step=2", *TRAIN_ARGS)
    assert code == 0 and "to step 4" in out, err[-3000:]
    assert {"3.superseded", "4.superseded", "4.damaged"} <= set(os.listdir(ckpts))
    assert_user_error(cli("train.__main__", f"--config={CONFIG}", f"--workdir={workdir}", "--step=9", *TRAIN_ARGS),
                      "no checkpoint for step 9", "[1, 2, 3, 4]")


def test_resume_with_a_changed_model_names_the_field(run_dir, tmp_path):
    from jaxgen.training.trainer import train

    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    c = tiny_config()
    c.model.hidden_dim = 64
    with pytest.raises(ConfigError, match=r"model.hidden_dim: 128 -> 64") as e:
        train(c, workdir)
    assert "strict" not in str(e.value)


# -- 3. silently wrong -> said ---------------------------------------------------------------
@pytest.fixture(scope="module")
def png16(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("png16")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        os.makedirs(root / split)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
    return str(root)


def test_folder_at_another_resolution_says_which_option_fixes_it(png16, tmp_path):
    from configs.shapes_inpaint import get_config
    from jaxgen.training.tasks import make_task
    from jaxgen.training.trainer import train

    c = get_config("tiny")
    c.data.name = f"folder:{png16}"
    with pytest.raises(DataError, match=r"uint8 \[4, 16, 16, 3\].*--config.data.options.resolution=32"):
        train(c, str(tmp_path / "a"))
    c.data.options.resolution = 32                  # the advice works
    task = make_task(c)
    assert task.batch_arrays(task.load_data("train"))["image"].shape == (4, 32, 32, 3)
    with pytest.raises(DataError, match=r"resized and center-cropped to 32x32"):
        task.check_images(np.zeros((1, 16, 16, 3), np.uint8))


def test_rgb_folder_for_a_one_channel_model_names_in_channels(png16, tmp_path):
    from jaxgen.training.trainer import train

    c = tiny_config()
    c.data.name = f"folder:{png16}"
    with pytest.raises(DataError, match=r"model.in_channels=3"):
        train(c, str(tmp_path / "b"))


def test_nan_output_is_an_error_not_black_pixels(run_dir):
    import jaxgen

    run = jaxgen.load_run(run_dir)
    with pytest.raises(NonFiniteError, match="NaN/Inf values in 2 of 2 image"):
        run.decode(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(DataError, match="num=0"):
        run.decode_random_codes(0)


def test_long_prompt_warns_how_many_tokens_were_dropped():
    from jaxgen.tokenizer import train_tokenizer

    tok = train_tokenizer(["a red circle", "a blue square"] * 4, vocab_size=520)
    with pytest.warns(UserWarning, match=r"1 of 2 text\(s\).*75 tokens.*25 token\(s\) were dropped"):
        ids = tok(["red " * 100, "blue"])
    assert ids.shape == (2, 77) and ids[0, -1] == tok.eos_token_id


def test_negative_guidance_warns_and_nan_guidance_is_refused():
    from jaxgen.training.config_values import check_guidance

    with pytest.warns(UserWarning, match="guidance_scale=-2 is negative"):
        assert check_guidance(-2, "pushed away") == -2.0
    with pytest.raises(ConfigError, match="guidance_scale"):
        check_guidance(float("nan"), "")


# -- 4 and 5. every CLI entry point: one error line, exit 2 ----------------------------------------
def test_every_entry_point_runs_through_the_shared_error_rule():
    """A new entry point in train/ gets the rule by ending in common.run(main), not app.run."""
    for path in glob.glob(os.path.join(ROOT, "train", "*.py")):
        text = open(path).read()
        if 'if __name__ == "__main__":' in text:
            assert "common.run(main)" in text and "app.run(" not in text, path


def test_cli_train_user_errors(tmp_path):
    w = f"--workdir={tmp_path / 'w'}"
    assert_user_error(cli("train.__main__", f"--config={CONFIG}", w, "--config.optim.learnig_rate=1"),
                      "config.optim has no field 'learnig_rate'", "--config.optim.lr")
    assert_user_error(cli("train.__main__", f"--config={CONFIG}", w, "--config.totl_steps=1"),
                      "Did you mean --config.total_steps")
    assert_user_error(cli("train.__main__", "--config=configs/nope.py", w), "no config file 'configs/nope.py'")
    assert_user_error(cli("train.__main__", "--config=configs/nope.py", w, "--config.seed=1"), "no config file")
    assert_user_error(cli("train.__main__", "--config=configs/digits_ae.py:tny", w), "unknown config argument")
    assert_user_error(cli("train.__main__", f"--config={CONFIG}", w, "--config.total_steps=abc"), "total_steps")
    assert_user_error(cli("train.__main__", f"--config={CONFIG}"), "--workdir")
    assert_user_error(cli("train.__main__", f"--config={CONFIG}", w, "--config.optim.lr=-0.001"), "optim.lr")
    assert_user_error(cli("train.__main__", f"--config={CONFIG}", w, "--config.keep_checkpoints=-1"),
                      "keep_checkpoints")
    assert_user_error(cli("train.__main__", f"--config={CONFIG}", w, "--step=3"), "has no checkpoint yet")


def test_cli_sample_user_errors(run_dir, tmp_path):
    out = f"--out={tmp_path / 'o.png'}"
    w = f"--workdir={run_dir}"
    assert_user_error(cli("train.sample", w, out, "--labels=abc"), "--labels=abc", "integer")
    for num in ("0", "-2"):
        assert_user_error(cli("train.sample", w, out, f"--num={num}"), "--num")
    for steps in ("0", "-1"):
        assert_user_error(cli("train.sample", w, out, f"--steps={steps}"), "--steps")
    assert_user_error(cli("train.sample", w, out, "--prompt=hi", "--scheduler=Nope"),
                      "decodes random codes", "--prompt", "--scheduler")
    assert_user_error(cli("train.sample", w, f"--out={tmp_path / 'o.jpg'}"), ".png")
    assert_user_error(cli("train.sample", out), "--workdir")
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    assert_user_error(cli("train.sample", f"--workdir={folder}", out, "--num=0", "--prompt=x"), "--num")
    code, stdout, err = cli("train.sample", w, f"--out={tmp_path / 'ok.npz'}", "--num=2")
    assert code == 0 and "wrote 2 images" in stdout, err[-3000:]


def test_cli_other_entry_points_user_errors(run_dir, tmp_path):
    assert_user_error(cli("train.eval", f"--workdir={tmp_path / 'none'}"), "no such run directory")
    assert_user_error(cli("train.eval", f"--workdir={run_dir}", "--step=-1"), "--step")
    assert_user_error(cli("train.export", f"--workdir={run_dir}", f"--out={tmp_path / 'e'}"),
                      "not a text-to-image stack")
    assert_user_error(cli("train.anomaly", f"--workdirs={tmp_path / 'none'}", f"--out={tmp_path / 'a'}"),
                      "no such run directory")
    assert_user_error(cli("train.compare", str(tmp_path / "none")), "config.json")
    assert_user_error(cli("train.compare"), "usage")
    assert_user_error(cli("train.make_paired", f"--out={tmp_path / 'p'}", "--train=-1"), "--train")
