"""bench/run_all.py, the one command for every performance figure, run at its smallest preset so
the script cannot rot (its times mean nothing here)."""
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def run_all():
    sys.path.insert(0, BENCH)
    threads = torch.get_num_threads()
    try:
        import run_all

        yield run_all
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(BENCH)


def test_smoke_preset_writes_every_figure(run_all, tmp_path):
    result = json.loads(json.dumps(run_all.run("smoke", log=lambda *_: None)))     # JSON-ready
    assert result["preset"] == "smoke" and result["machine"]["backend"] == "cpu"
    assert set(result["unet_cond"]) == {"batch_1", "batch_2"}
    for row in result["unet_cond"].values():
        assert row["parity_rel_error"] < 1e-4                   # the same weights give the same output
        for name in ("forward", "train_step"):
            r = row[name]
            assert r["jaxgen_s"] > 0 and r["diffusers_s"] > 0 and r["jaxgen_compile_s"] > 0 and r["flops"] > 0
            assert r["ours_over_peer"] == pytest.approx(r["jaxgen_s"] / r["diffusers_s"])
            assert r["mfu"] is None                              # no peak known for a CPU
        assert row["train_step"]["flops"] > 2 * row["forward"]["flops"]   # backward costs about twice the forward
    assert row["forward"]["flops"] > result["unet_cond"]["batch_1"]["forward"]["flops"]
    pipe = result["pipeline"]
    assert pipe["size"] == 16 and set(pipe["steps"]) == {"2"}
    assert pipe["steps"]["2"]["max_abs_diff"] < 1e-2 and pipe["steps"]["2"]["jaxgen_per_image_s"] > 0
    assert set(result["compile_s"]) == {"unet_cond_forward_batch_1", "unet_cond_train_step_batch_1",
                                        "unet_cond_forward_batch_2", "unet_cond_train_step_batch_2",
                                        "pipeline_16px_2_steps"}
    assert np.isfinite(list(result["compile_s"].values())).all()


def test_peak_table_and_errors(run_all):
    assert run_all.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert run_all.peak_flops("NVIDIA H100 80GB HBM3", "float32") is None
    assert run_all.peak_flops("cpu", "bfloat16") is None
    with pytest.raises(ValueError, match="preset"):
        run_all.run("huge")
