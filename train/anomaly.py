"""python -m train.anomaly --workdirs runs/digits_ae_anomaly,runs/digits_vae_anomaly,runs/digits_vqvae_anomaly --out runs/anomaly

Anomaly detection by reconstruction error, several runs side by side: each run must have been
trained without the same digits (its config's ':anomaly' word). Writes OUT/anomaly.json (AUROC,
mean error of normal and anomalous test images per run), OUT/anomaly_roc.png and
OUT/anomaly_reconstructions.png, and prints the table.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from train import common

flags.DEFINE_list("workdirs", None, "comma-separated run directories (any run with reconstruct)")
flags.DEFINE_string("out", None, "output directory for anomaly.json and the PNGs")
flags.mark_flags_as_required(["workdirs", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    import jaxgen
    from jaxgen.eval.anomaly import compare_runs

    runs = {os.path.basename(os.path.normpath(w)): jaxgen.load_run(w) for w in flags.FLAGS.workdirs}
    table = compare_runs(runs, flags.FLAGS.out)
    print(json.dumps(table, indent=2))
    print(f"wrote {os.path.join(flags.FLAGS.out, 'anomaly.json')} and PNGs")


if __name__ == "__main__":
    common.run(main)
