"""Benchmark: where each layer's and method's maps look, for the runs of a store with lesion masks (the demo).

Issue 15 asks each model's maps on the malignant test images to pass the pointing game on 80% of them and to
put at least twice the lesion's area share of their energy inside it. This prints both for every completed
run, for the registry's layer at the run's size and for the other stages it was chosen against
(`CANDIDATE_LAYERS`), with each method asked for, next to what a blind map (a Gaussian at the centre) scores on
the same masks.

    python bench/cam_layers.py --runs-dir DIR [--methods hirescam gradcam layercam] [--models resnet50 efficientnet_b0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.demo_training import GOAL_ENERGY_RATIO, GOAL_POINTING, blind_centre_map  # noqa: E402
from core.cams import CamExplainer, batch_measures, energy_inside, pointing_game_hit  # noqa: E402
from core.models import cam_layer_name, get_model_spec  # noqa: E402
from core.runs import RunStore  # noqa: E402
from core.stored_run import load_run_data, load_trained_model, run_image_size, run_precision  # noqa: E402

# The stages the registry's small-input layer (stride 8) was chosen against: the stride-16 stage it hooked
# before, and EfficientNet-B0's stride-4 stage.
CANDIDATE_LAYERS = {
    "resnet18": ["layer3"],
    "resnet50": ["layer3"],
    "densenet121": ["features.denseblock3"],
    "efficientnet_b0": ["features.5", "features.2"],
    "hybrid_sresnet": ["backbone.layer3"],
}


def malignant_test_rows(data) -> np.ndarray:
    rows = data.indices("test")
    return rows[data.table["label"].to_numpy()[rows] == 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--methods", nargs="+", default=["hirescam", "gradcam", "layercam"])
    parser.add_argument("--models", nargs="+", help="only these models (default: every completed run)")
    args = parser.parse_args()
    store = RunStore(Path(args.runs_dir))
    print(f"goal: pointing >= {GOAL_POINTING}, energy inside >= {GOAL_ENERGY_RATIO:.0f}x the lesion's area share")
    print(f"{'model':<16} {'test AUC':>8} {'layer':<32} {'method':<10} {'n':>4} {'pointing':>9} {'energy':>7} "
          f"{'area':>5} {'ratio':>6}")
    masks = None
    for run in sorted(store.list_runs(), key=lambda run: run["created_at"]):
        if run.get("status") != "completed" or (args.models and run["model"] not in args.models):
            continue
        data = load_run_data(run, store)
        if data.masks is None:
            print(f"{run['model']:<16} no lesion masks in run {run['run_id']}'s dataset")
            continue
        rows = malignant_test_rows(data)
        size = run_image_size(run)
        model = load_trained_model(run, store.model_path(run["run_id"]))
        registry_layer = cam_layer_name(get_model_spec(run["model"]), size)
        for layer in [None, *CANDIDATE_LAYERS.get(run["model"], [])]:
            explainer = CamExplainer(model, run["model"], run_precision(run), size, layer)
            for method in args.methods:
                result = batch_measures([(explainer, size)], [run["model"]], data.images[rows], data.masks[rows],
                                        method=method)
                row, area = result["rows"][0], result["lesion_area"]
                pointing, energy = row["Pointing-game hit rate"], row["CAM energy inside the lesion"]
                print(f"{run['model']:<16} {run['metrics']['test']['auc']:>8.3f} "
                      f"{layer or registry_layer + ' (registry)':<32} {method:<10} {len(rows):>4} {pointing:>9.2f} "
                      f"{energy:>7.2f} {area:>5.2f} {energy / area:>6.2f}", flush=True)
        masks = data.masks[rows]
    if masks is None:
        print(f"no completed run with lesion masks in {args.runs_dir} (train the demo: python -m core train "
              "--model all --data synthetic --runs-dir DIR)")
        return 1
    print_blind_map(masks)  # the last run's masks: the demo's runs share one dataset
    return 0


def print_blind_map(masks: np.ndarray) -> None:
    blind = blind_centre_map(masks.shape[1])
    pointing = float(np.mean([pointing_game_hit(blind, mask) for mask in masks]))
    energy = float(np.mean([energy_inside(blind, mask) for mask in masks]))
    area = float(masks.mean())
    print(f"{'(a blind map)':<16} {'':>8} {'Gaussian at the centre':<32} {'':<10} {len(masks):>4} {pointing:>9.2f} "
          f"{energy:>7.2f} {area:>5.2f} {energy / area:>6.2f}")


if __name__ == "__main__":
    sys.exit(main())
