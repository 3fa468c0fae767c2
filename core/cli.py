"""python -m core {train,resume,tune,ablate,list,compare,evaluate,explain,audit,predict,check-data}: the engine
headless, for GPU servers and scripts. SIGTERM (a batch scheduler's time limit, `kill`) stops the current run
cleanly after its batch; it is stored as stopped and `python -m core resume RUN_ID` continues it. Under torchrun
(`torchrun --nproc-per-node N -m core train ...`) train and resume train one run on N processes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from core.config import FORMATS, MODEL_NAMES, PRECISIONS, PRESETS, PRUNERS, DataSpec, TrainConfig
from core.data.synthetic import CONFOUNDER_KINDS
from core.runs import RunStore, RunStoreError, default_runs_dir, is_ordinary_run, run_purpose
from core.training.callbacks import BatchProgress, EpochRecord, TrainingCallback

if TYPE_CHECKING:
    from core.evaluation.external import ExternalSet
    from core.training.distributed import DistributedContext

# Every command imports what it works with when it runs: `--help`, `list` and `hash-password` load neither
# torch nor grad-cam, and answer at once (tests/test_cli.py checks sys.modules).

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1

# Set by SIGTERM; every command that trains passes it on, so a stop ends the current run cleanly.
STOP = threading.Event()

# Flags that map one-to-one onto TrainConfig fields; None means "keep the preset's value".
HYPERPARAMETER_FLAGS = (
    ("--epochs", "epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "images per batch"),
    ("--lr", "lr", float, "AdamW learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--dropout", "dropout", float, "dropout in the Hybrid S-ResNet head"),
    ("--label-smoothing", "label_smoothing", float, "cross-entropy label smoothing"),
    ("--image-size", "image_size", int, "square input size in pixels (default: 224; 96 on the synthetic set)"),
    ("--split", "split", str, "train:test ratio such as 80:20, 70:30 or 60:40"),
    ("--val-fraction", "val_fraction", float, "share of the train part held out for model selection"),
    ("--seed", "seed", int, "seed of the split, the initialisation and the sampling"),
    ("--max-images", "max_images", int, "train on a stratified subset of this many images"),
    ("--threshold", "threshold", float, "decision threshold on P(malignant) for the metrics"),
    ("--weights-file", "weights_file", str, "local weights (.pt state_dict) instead of a download"),
)
SWITCH_FLAGS = (
    ("--no-augment", "augment", "no flip/rotation/colour-jitter augmentation"),
    ("--no-weighted-sampler", "weighted_sampler", "plain shuffling instead of class-balanced sampling"),
    ("--no-scheduler", "scheduler", "constant learning rate instead of cosine annealing"),
    ("--no-pretrained", "pretrained", "random initialisation instead of ImageNet weights"),
    ("--no-duplicate-grouping", "group_near_duplicates",
     "let near-duplicate images fall on both sides of the split (by default they stay together, as a lesion's do)"),
)


class ProgressBar(TrainingCallback):
    """A tqdm bar per run and one line per epoch, on stderr."""

    def __init__(self) -> None:
        self.bar = None

    def on_run_start(self, run: dict) -> None:
        print(f"run {run['run_id']}: {run['model']} on {run['dataset']['name']} "
              f"({run['config']['image_size']} px, weights: {run['weights']}, "
              f"{run['environment']['precision']} on {run['environment']['device_name']})", file=sys.stderr)

    def on_batch_end(self, progress: BatchProgress) -> None:
        from tqdm import tqdm

        total = progress.epochs * progress.batches
        if self.bar is None or self.bar.total != total:
            self._close()
            # No bar in logs (CI, nohup): the per-epoch lines say enough there.
            self.bar = tqdm(total=total, desc=progress.model, unit="batch", leave=False, dynamic_ncols=True,
                            disable=not sys.stderr.isatty())
        self.bar.n = (progress.epoch - 1) * progress.batches + progress.batch
        self.bar.set_postfix_str(f"epoch {progress.epoch}/{progress.epochs} loss {progress.loss:.3f} "
                                 f"{progress.images_per_second:.0f} img/s", refresh=True)

    def on_epoch_end(self, record: EpochRecord) -> None:
        line = (f"  epoch {record.epoch}: train loss {record.train_loss:.4f} acc {record.train_acc:.3f} | "
                f"val loss {record.val_loss:.4f} acc {record.val_acc:.3f} AUC {record.val_auc:.3f} | "
                f"{record.seconds:.1f} s")
        (self.bar.write if self.bar else print)(line, file=sys.stderr)

    def on_run_end(self, run: dict) -> None:
        self._close()
        test = (run.get("metrics") or {}).get("test") or {}
        summary = f"test AUC {test['auc']:.4f} acc {test['accuracy']:.4f}" if test.get("auc") is not None else ""
        problem = run.get("error") or run.get("message") or ""
        print(f"  -> {run['status']} in {run.get('seconds', 0):.0f} s {summary} {problem}".rstrip(), file=sys.stderr)

    def on_warning(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The data and hyperparameter flags shared by train, tune and ablate."""
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset path")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="dataset format")
    add_reading_flags(parser)
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                        help="starting values: quick (fast demo) or paper (224 px, the paper's optimum)")
    for flag, _, kind, text in HYPERPARAMETER_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    for flag, _, text in SWITCH_FLAGS:
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="auto times the options per model")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    add_synthetic_flags(parser)
    parser.add_argument("--runs-dir", default=str(default_runs_dir()), help="run store (default: checkpoints/)")


def add_synthetic_flags(parser: argparse.ArgumentParser) -> None:
    """The options of the built-in synthetic set."""
    parser.add_argument("--synthetic-count", type=int, default=None, help="images in the synthetic set")
    parser.add_argument("--synthetic-image-size", type=int, default=None, help="size the synthetic set is drawn at")
    parser.add_argument("--synthetic-seed", type=int, default=None,
                        help="seed the synthetic set is drawn from (another seed: other images)")
    parser.add_argument("--confounder-fraction", type=float, default=None,
                        help="share of malignant synthetic images given a shortcut artifact")
    parser.add_argument("--confounder-kind", choices=CONFOUNDER_KINDS, default=None)
    parser.add_argument("--synthetic-lesion-spread", type=float, default=None,
                        help="lesion centres lie within this distance of the image's centre, 1 being the edge "
                             "(default 0.45; 0.15 draws the centred lesions of runs stored before it existed)")


def add_reading_flags(parser: argparse.ArgumentParser) -> None:
    """How a local dataset is read: label mapping, image, mask and column names."""
    parser.add_argument("--label-map", nargs="+", default=[], metavar="NAME=0|1",
                        help="map folder names, dx codes or label values to 0 (benign) / 1 (malignant)")
    parser.add_argument("--images-dir", help="image folder of a CSV/HAM10000 dataset (default: detected)")
    parser.add_argument("--masks-dir", help="lesion masks (<image_id>_segmentation.png)")
    parser.add_argument("--label-column", help="CSV label column (default: detected)")
    parser.add_argument("--image-column", help="CSV image-id or path column (default: detected)")


def add_comparison_flags(parser: argparse.ArgumentParser) -> None:
    """The table and operating-point flags shared by compare and evaluate."""
    parser.add_argument("--format", choices=["table", "csv", "latex"], default="table",
                        help="table and latex show 'value [95%% CI]'; csv has separate low/high columns")
    parser.add_argument("--resamples", type=int, default=2000,
                        help="bootstrap resamples of the test images for the intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    operating_point = parser.add_mutually_exclusive_group()
    operating_point.add_argument("--threshold", type=float, metavar="P",
                                 help="judge every model at this threshold on P(malignant) (default: each run's own)")
    operating_point.add_argument("--sensitivity", type=float, metavar="S",
                                 help="judge each model at the highest threshold reaching sensitivity S on its "
                                      "validation predictions (the Compare page's 'sensitivity >= X')")
    parser.add_argument("--by", metavar="sex|age|localization|site|dx|ita|COLUMN", default=None,
                        help="instead of the table, metrics per subgroup of the test images: HAM10000's metadata, "
                             "skin tone by the Individual Typology Angle (ita), or any categorical column of the "
                             "dataset's CSV; one row per model and group, with n and positives")
    parser.add_argument("--runs-dir", default=str(default_runs_dir()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model or all five",
                                description="Train with the paper's recipe; every piece can be changed.")
    train.add_argument("--model", default="hybrid_sresnet", choices=[*MODEL_NAMES, "all"])
    add_training_flags(train)

    tune = commands.add_parser("tune", help="Optuna search over lr, weight decay and dropout",
                               description="Maximise validation AUC (never test) over the paper's search space; "
                                           "bad trials are pruned after an epoch. Run the same command on several "
                                           "machines with one --storage URL to share a study.")
    tune.add_argument("--model", default="hybrid_sresnet", choices=MODEL_NAMES)
    tune.add_argument("--study", default=None, help="study name (default: tune-<model>); an existing one continues")
    tune.add_argument("--trials", type=int, default=10, help="trials to add to the study")
    tune.add_argument("--storage", default=None,
                      help="SQLAlchemy URL, e.g. postgresql://user:pass@host/db (default: SQLite in the run store)")
    tune.add_argument("--pruner", default="median", choices=PRUNERS)
    add_training_flags(tune)

    ablate = commands.add_parser("ablate", help="the paper's ablation: components, or split x epochs grid",
                                 description="Each cell is an ordinary run on the same split and seed; re-running "
                                             "the same --study skips the cells already completed.")
    ablate.add_argument("--kind", default="components", choices=["components", "grid"])
    ablate.add_argument("--study", default=None, help="study name (default: ablation-<kind>)")
    ablate.add_argument("--splits", default="80:20,70:30,60:40", help="grid: train:test ratios, comma-separated")
    ablate.add_argument("--epochs-grid", default="25,50,75,100", help="grid: epoch counts, comma-separated")
    ablate.add_argument("--models", default="resnet18",
                        help=f"grid: models, comma-separated ({', '.join(MODEL_NAMES)}); each gets the whole grid")
    ablate.add_argument("--storage", default=None,
                        help="SQLAlchemy URL, e.g. postgresql://user:pass@host/db: machines running the same "
                             "command split the cells; results are kept in the database (default: this run store)")
    add_training_flags(ablate)

    resume = commands.add_parser("resume", help="continue stopped or killed runs from their last finished epoch",
                                 description="Same run folder, same config and data; the run ends as if it had "
                                             "never stopped. `python -m core list` marks the runs that can resume.")
    resume.add_argument("runs", nargs="+", metavar="RUN_ID")
    resume.add_argument("--runs-dir", default=str(default_runs_dir()))

    listing = commands.add_parser("list", help="list the stored runs", description="One line per run, newest first.")
    listing.add_argument("--runs-dir", default=str(default_runs_dir()))

    compare = commands.add_parser("compare", help="compare runs (the paper's Tables 1 and 2)",
                                  description="Train/test accuracy, precision, recall, F1, AUC, specificity, "
                                              "kappa and G-mean with 95% bootstrap intervals from the saved test "
                                              "predictions; default: the newest completed run of each model.")
    compare.add_argument("--runs", nargs="+", metavar="RUN_ID", help="run ids to compare")
    compare.add_argument("--report", metavar="PATH.html",
                         help="also write the Compare page (table, figures, tests) as one self-contained HTML file")
    compare.add_argument("--test-set", metavar="KEY|NAME", default=None,
                         help="judge on an external set the runs were evaluated on (python -m core evaluate) "
                              "instead of their own test part")
    add_comparison_flags(compare)

    evaluate = commands.add_parser(
        "evaluate", help="external validation: apply stored runs to another labelled dataset",
        description="Apply stored runs to every image of another labelled dataset (any supported format, "
                    "detected as for training), each at its own image size and normalisation. The predictions "
                    "are stored with each run and reused; the table is compare's, on that set. Thresholds chosen "
                    "by --sensitivity still come from each run's internal validation part.")
    evaluate.add_argument("runs", nargs="*", metavar="RUN_ID", help="default: the newest completed run of each model")
    evaluate.add_argument("--data", required=True, help="the external dataset: a path (or 'synthetic')")
    evaluate.add_argument("--data-format", default="auto", choices=["auto", *FORMATS],
                          help="the external dataset's format (default: detected)")
    add_reading_flags(evaluate)
    add_synthetic_flags(evaluate)
    add_comparison_flags(evaluate)
    explain = commands.add_parser("explain", help="CAMs of the five models on one image, as a PNG figure",
                                  description="The Explain page's figure, headless: heatmap and contour overlays "
                                              "of each run's CAM of one image.")
    explain.add_argument("--image", required=True, help="a JPEG or PNG file")
    explain.add_argument("--runs", nargs="+", metavar="RUN_ID", help="default: newest completed run of each model")
    explain.add_argument("--method", default=None,
                         help="gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, scorecam, ablationcam "
                              "(default: gradcam, or hirescam for runs trained below 128 px, as on the Explain page)")
    explain.add_argument("--target", default="predicted", choices=["predicted", "malignant", "benign"])
    explain.add_argument("--shared-scale", action="store_true", help="one colour scale for all maps")
    explain.add_argument("--out", default=".", help="folder for the PNG and a JSON summary")
    explain.add_argument("--runs-dir", default=str(default_runs_dir()))

    audit = commands.add_parser(
        "audit", help="can the maps be trusted? randomisation, artefact, localisation and faithfulness checks",
        description="The explanation audit of stored runs: the randomisation sanity check (Adebayo et al. 2018), "
                    "artefacts pasted beside benign lesions (ink, ruler, dark corners, gel bubble, hair), "
                    "localisation against lesion masks and deletion/insertion (Petsiuk et al. 2018). Results are "
                    "stored beside each run and reused; DIR gets audit.json, one CSV per check and PNG figures.")
    audit.add_argument("runs", nargs="*", metavar="RUN_ID", help="default: the newest completed run of each model")
    audit.add_argument("--images", type=int, default=50, help="test images per run (drawn with --seed)")
    audit.add_argument("--methods", default=None,
                       help="comma-separated: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, scorecam, "
                            "ablationcam, and edges (a control that ignores the model and must fail); default: the "
                            "Explain page's method for the runs (hirescam below 128 px, else gradcam)")
    audit.add_argument("--checks", default="randomisation,artefacts,localisation,faithfulness",
                       help="comma-separated subset of randomisation,artefacts,localisation,faithfulness")
    audit.add_argument("--steps", type=int, default=4, help="randomisation steps from the head to the whole network")
    audit.add_argument("--baseline", default="blur", choices=["blur", "mean", "zero"],
                       help="what deletion and insertion replace pixels with")
    audit.add_argument("--road", action="store_true",
                       help="add ROAD (Rong et al. 2022) to faithfulness: about 1 s per image and model on 2 cores")
    audit.add_argument("--masks-dir", default=None,
                       help="lesion masks <image_id>_segmentation.png, <image_id>_mask.png or <image_id>_<suffix>.png "
                            "(default: the dataset's own masks, if any)")
    audit.add_argument("--seed", type=int, default=0, help="seed of the image draw, artefacts and intervals")
    audit.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="where the models run (results agree within bf16 noise; tests/test_cuda.py)")
    audit.add_argument("--out", required=True, metavar="DIR", help="folder for audit.json, CSVs and figures")
    audit.add_argument("--runs-dir", default=str(default_runs_dir()))

    predict = commands.add_parser(
        "predict", help="P(malignant), decision and out-of-distribution flag for a folder of images (no labels)",
        description="Apply stored runs to every image under a folder, each run at its own image size: P(malignant), "
                    "the decision at the run's own threshold, and an out-of-distribution score (Mahalanobis "
                    "distance of each stage's features to the run's training images; flagged beyond the 95th "
                    "percentile of its validation images). Writes one CSV row per image and run; stdout gets a "
                    "short table.")
    predict.add_argument("runs", nargs="*", metavar="RUN_ID", help="default: the newest completed run of each model")
    predict.add_argument("--images", required=True, metavar="DIR", help="folder of JPEG/PNG images (sub-folders too)")
    predict.add_argument("--out", required=True, metavar="PATH.csv", help="the CSV of predictions")
    predict.add_argument("--cams", metavar="DIR", help="also write one PNG per image with every run's map")
    predict.add_argument("--method", default=None,
                         help="the CAM method of --cams (default: gradcam, or hirescam for runs trained below 128 px)")
    predict.add_argument("--runs-dir", default=str(default_runs_dir()))
    add_check_data_parser(commands)
    commands.add_parser(
        "hash-password", help="make the admin password hash of a classroom deployment",
        description="Reads a password (asked twice on a terminal, else the first line of stdin) and prints its "
                    "salted scrypt hash, for admin_password_hash in .streamlit/secrets.toml or the "
                    "SKIN_ADMIN_PASSWORD_HASH environment variable. The password itself is stored nowhere.")
    return parser


# The split settings check-data takes from training's flags: it shows the split a training run would get.
CHECK_DATA_FIELDS = ("image_size", "split", "val_fraction", "seed", "max_images", "group_near_duplicates")


def add_check_data_parser(commands) -> None:
    from core.data.duplicates import DEFAULT_THRESHOLD, HASH_BITS

    check = commands.add_parser(
        "check-data", help="near-duplicate images (resized, recompressed, slightly cropped) across the split",
        description="List pairs of near-duplicate images, one pair per line, with the split and label of each "
                    "image; pairs with different labels are flagged. Perceptual hashes (imagehash: pHash, dHash, "
                    "vertical dHash on the whole image and five 3% crops) are stored with the decoded image cache. "
                    "The split is the one training would make with the same flags.")
    check.add_argument("data", metavar="PATH", help="the dataset: a path, or 'synthetic'")
    check.add_argument("--format", choices=["table", "csv"], default="table", help="how the pairs are printed")
    check.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, metavar="BITS",
                       help=f"largest Hamming distance (of {HASH_BITS} bits) of a near-duplicate pair "
                            f"(default {DEFAULT_THRESHOLD}); the split always groups at the default")
    check.add_argument("--data-format", default="auto", choices=["auto", *FORMATS], help="dataset format")
    for flag, field, kind, text in HYPERPARAMETER_FLAGS:
        if field in CHECK_DATA_FIELDS:
            check.add_argument(flag, type=kind, default=None, help=text)
    for flag, field, text in SWITCH_FLAGS:
        if field in CHECK_DATA_FIELDS:
            check.add_argument(flag, action="store_true", help=text)
    add_reading_flags(check)
    add_synthetic_flags(check)
    check.add_argument("--runs-dir", default=str(default_runs_dir()), help="run store whose cache holds the images")


def config_from_args(args: argparse.Namespace, model: str) -> TrainConfig:
    values = {field: getattr(args, field) for _, field, _, _ in HYPERPARAMETER_FLAGS
              if getattr(args, field) is not None}
    values.update({field: False for flag, field, _ in SWITCH_FLAGS if getattr(args, field_name(flag))})
    for name in ("precision", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return dataclasses.replace(PRESETS[args.preset], model=model, **values)


def field_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def data_spec_from_args(args: argparse.Namespace) -> DataSpec:
    label_map = {}
    for item in args.label_map:
        name, _, value = item.partition("=")
        if value not in ("0", "1"):
            raise ValueError(f"--label-map wants NAME=0 or NAME=1, got {item!r}")
        label_map[name] = int(value)
    # evaluate's --format is the table's; its dataset format is --data-format.
    data_format = args.data_format if hasattr(args, "data_format") else args.format
    values = {"source": args.data, "format": data_format, "label_map": label_map, "images_dir": args.images_dir,
              "masks_dir": args.masks_dir, "label_column": args.label_column, "image_column": args.image_column}
    for option in ("synthetic_count", "synthetic_image_size", "synthetic_seed", "confounder_fraction",
                   "confounder_kind", "synthetic_lesion_spread"):
        if getattr(args, option, None) is not None:
            values[option] = getattr(args, option)
    if args.data == "synthetic":
        values["format"] = "synthetic"
    return DataSpec(**values)


def command_train(args: argparse.Namespace, context: DistributedContext) -> int:
    from core.data.datasets import prepare_data
    from core.training.loop import run_training

    models = list(MODEL_NAMES) if args.model == "all" else [args.model]
    configs = [config_from_args(args, model) for model in models]
    spec = data_spec_from_args(args)
    store = RunStore(args.runs_dir)
    started = time.perf_counter()
    print(f"preparing {'the synthetic set' if spec.is_synthetic else spec.source} ...", file=sys.stderr)
    # Under torchrun every process prepares the data; a failure on any of them stops all before a run is created.
    with decoding_bar(disable=not context.is_main) as report:
        data = context.agree(lambda: prepare_data(spec, configs[0], store.cache_dir, report), local_main_first=True)
    for image_id, reason in data.skipped[:5]:
        print(f"warning: skipped {image_id}: {reason}", file=sys.stderr)
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable or missing image(s) of "
              f"{len(data.skipped) + len(data.table)}", file=sys.stderr)
    counts = data.class_counts()
    print("split: " + ", ".join(f"{split} {c['benign']} benign / {c['malignant']} malignant"
                                for split, c in counts.items()) + f" ({time.perf_counter() - started:.1f} s)",
          file=sys.stderr)
    statuses = []
    for config in configs:
        if context.should_stop(STOP):
            break
        run = run_training(config, data, store, ProgressBar(), STOP, context=context)
        statuses.append(run["status"])
        print(run["run_id"])
    print(f"{len(statuses)} run(s) in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{m} {s}" for m, s in zip(models, statuses)), file=sys.stderr)
    return 0 if len(statuses) == len(configs) and all(s == "completed" for s in statuses) else EXIT_RUN_FAILED


def command_resume(args: argparse.Namespace, context: DistributedContext) -> int:
    from core.training.loop import resume_training

    store = RunStore(args.runs_dir)
    statuses = []
    for run_id in args.runs:
        if context.should_stop(STOP):
            break
        run = resume_training(run_id, store, ProgressBar(), STOP, context=context)
        statuses.append(run["status"])
        print(run["run_id"])
    return 0 if len(statuses) == len(args.runs) and all(s == "completed" for s in statuses) else EXIT_RUN_FAILED


def command_tune(args: argparse.Namespace) -> int:
    import optuna

    from core.data.datasets import prepare_data
    from core.training.study_storage import open_storage, wait_for_trials_elsewhere
    from core.training.tuning import default_storage, run_study, trials_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial below says enough
    config = config_from_args(args, args.model)
    spec = data_spec_from_args(args)
    store = RunStore(args.runs_dir)
    study_name = args.study or f"tune-{args.model}"
    storage = open_storage(args.storage or default_storage(store))  # an unreachable one fails before data is read
    data = prepare_data(spec, config, store.cache_dir)

    def report(study, trial) -> None:
        value = f"{trial.value:.4f}" if trial.value is not None else "--"
        print(f"trial {trial.number}: {trial.state.name.lower()} val AUC {value} "
              + " ".join(f"{k}={v:.3g}" for k, v in trial.params.items()), file=sys.stderr)

    started = datetime.datetime.now()
    study = run_study(data, config, store, study_name, args.trials, storage, args.pruner, stop=STOP,
                      on_trial_end=report)
    # Trials other workers of a shared study are still running may become the best: every worker reports
    # the same study once they end.
    wait_for_trials_elsewhere(study, started, STOP, on_wait=lambda numbers: print(
        f"waiting for trial(s) {', '.join(map(str, numbers))} running elsewhere" if numbers
        else "waiting for the trials other workers have yet to start", file=sys.stderr))
    table = trials_table(study)
    print(table.to_string(index=False))
    completed = [t for t in study.trials if t.value is not None and t.state.name == "COMPLETE"]
    if completed:
        best = study.best_trial
        print(f"best trial {best.number}: val AUC {best.value:.4f} " +
              " ".join(f"{k}={v:.3g}" for k, v in best.params.items()), file=sys.stderr)
    return 0


def command_ablate(args: argparse.Namespace) -> int:
    from core.evaluation.compare import comparison_table, format_table
    from core.training.ablation import component_cells, grid_cells, run_ablation

    base = config_from_args(args, "resnet18")
    spec = data_spec_from_args(args)
    store = RunStore(args.runs_dir)
    if args.kind == "components":
        cells = component_cells(base)
    else:
        try:
            epochs = [int(value) for value in args.epochs_grid.split(",")]
        except ValueError:
            raise ValueError(f"--epochs-grid wants numbers like 25,50, got {args.epochs_grid!r}") from None
        models = [value.strip() for value in args.models.split(",") if value.strip()]
        unknown = [model for model in models if model not in MODEL_NAMES]
        if unknown or not models:
            raise ValueError(f"--models wants names from {', '.join(MODEL_NAMES)}, got {args.models!r}")
        cells = grid_cells(base, [value.strip() for value in args.splits.split(",")], epochs, models)
    study = args.study or f"ablation-{args.kind}"

    def report(cell, run) -> None:
        test = ((run or {}).get("metrics") or {}).get("test") or {}
        auc = f"{test['auc']:.4f}" if test.get("auc") is not None else "--"
        print(f"{cell.key}: {(run or {}).get('status', 'not run')} test AUC {auc}", file=sys.stderr)

    if args.storage:
        return ablate_shared(args.storage, spec, cells, store, study, report)
    done = run_ablation(spec, cells, store, study, stop=STOP, on_cell=report)
    runs = [done[cell.key] for cell in cells if cell.key in done]
    if runs:
        table = comparison_table(runs, store)
        table.insert(0, "Cell", [cell.key for cell in cells if cell.key in done])
        print(format_table(table.drop(columns=["Model"]).rename(columns={"Cell": "Model"}), "table"))
    return 0 if len(done) == len(cells) else EXIT_RUN_FAILED


def ablate_shared(url: str, spec: DataSpec, cells: list, store: RunStore, study: str, report) -> int:
    """`ablate --storage URL`: this machine's share of the cells, then the whole grid from the database."""
    import optuna

    from core.evaluation.compare import format_table
    from core.training.shared_ablation import run_shared_ablation
    from core.training.study_storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shared = run_shared_ablation(spec, cells, store, study, open_storage(url), stop=STOP, on_cell=report,
                                 on_wait=lambda keys: print(f"waiting for {', '.join(keys)} (running elsewhere)",
                                                            file=sys.stderr))
    if len(shared.table):
        print(format_table(shared.table.assign(Run=shared.table["Run"] + " on " + shared.table["Machine"]), "table"))
    missing = [cell.key for cell in cells if cell.key not in shared.completed]
    if missing:
        print(f"{len(shared.completed)} of {len(cells)} cells completed; not completed: {', '.join(missing)}",
              file=sys.stderr)
    return EXIT_RUN_FAILED if missing else 0


def command_list(args: argparse.Namespace) -> int:
    runs = RunStore(args.runs_dir).list_runs()
    if not runs:
        print(f"no runs in {args.runs_dir}", file=sys.stderr)
        return 0
    for run in runs:
        test = (run.get("metrics") or {}).get("test") or {}
        auc = f"{test['auc']:.4f}" if test.get("auc") is not None else "--"
        accuracy = f"{test['accuracy']:.4f}" if test.get("accuracy") is not None else "--"
        config, dataset = run.get("config", {}), run.get("dataset", {})
        status = run["status"] + ("*" if run.get("resumable") else "")
        print(f"{run['run_id']:<44} {run['model']:<16} {status:<10} test AUC {auc} acc {accuracy} "
              f"{dataset.get('name', '?')} {config.get('image_size', '?')}px {config.get('epochs', '?')} ep "
              f"{run.get('weights', '?')}" + ("" if is_ordinary_run(run) else f" [{run_purpose(run)}]"))
    if any(run.get("resumable") for run in runs):
        sys.stdout.flush()
        print("* can be continued with `python -m core resume RUN_ID`", file=sys.stderr)
    return 0


def chosen_runs(store: RunStore, run_ids: list[str] | None, runs_dir: str) -> list[dict]:
    """The named runs (ValueError naming the missing ones), or the newest completed run of each model."""
    from core.evaluation.compare import default_comparison_runs

    if not run_ids:
        return default_comparison_runs(store.list_runs())
    runs = [store.load(run_id) for run_id in run_ids]
    missing = [run_id for run_id, run in zip(run_ids, runs) if run is None]
    if missing:
        raise ValueError(f"no run(s) {', '.join(missing)} in {runs_dir}")
    return runs


def check_operating_point(args: argparse.Namespace) -> None:
    for value, name in ((args.threshold, "--threshold"), (args.sensitivity, "--sensitivity")):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"{name} must be between 0 and 1, not {value}")


def chosen_test_set(store: RunStore, runs: list[dict], wanted: str | None) -> ExternalSet | None:
    """The external set named by key or name that every run was evaluated on (None: their own test part)."""
    from core.evaluation.external import INTERNAL_TEST, common_external_sets

    if not wanted or wanted == INTERNAL_TEST:
        return None
    available = common_external_sets(store, runs)
    for external in available:
        if wanted in (external.key, external.name):
            return external
    offered = ", ".join(f"{item.name} ({item.key})" for item in available) or "none"
    raise ValueError(f"the runs have not all been evaluated on {wanted!r} (sets they all have: {offered}); "
                     "run `python -m core evaluate --data PATH` first")


def command_compare(args: argparse.Namespace) -> int:
    from core.evaluation.compare import build_comparison, tested_on_same_images

    store = RunStore(args.runs_dir)
    runs = chosen_runs(store, args.runs, args.runs_dir)
    if not runs:
        print(f"no completed runs in {args.runs_dir}; train some with `python -m core train`", file=sys.stderr)
        return 0
    external = chosen_test_set(store, runs, args.test_set)
    if external is None and len(runs) > 1 and not tested_on_same_images(runs):
        print("warning: these runs were tested on different images; the comparison is not paired",
              file=sys.stderr)
    check_operating_point(args)
    comparison = build_comparison(store, runs, args.threshold, args.sensitivity, args.resamples, args.seed,
                                  test_set=external.key if external else None)
    print(f"operating point: {comparison.operating_point}", file=sys.stderr)
    if external is not None:
        print(f"test set: {external.describe()}", file=sys.stderr)
    print_table(comparison, args, store)
    if args.report:
        from core.report import write_html_report

        try:
            path = write_html_report(comparison, args.report)
        except OSError as error:
            raise ValueError(f"cannot write the report {args.report}: {error.strerror or error}") from None
        print(f"report written to {path}", file=sys.stderr)
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    from core.evaluation.compare import build_comparison
    from core.evaluation.external import evaluate_runs

    store = RunStore(args.runs_dir)
    runs = chosen_runs(store, args.runs, args.runs_dir)
    if not runs:
        raise ValueError(f"no completed runs in {args.runs_dir}; train some with `python -m core train`")
    check_operating_point(args)
    spec = data_spec_from_args(args)
    print(f"evaluating {len(runs)} run(s) on {spec.source} ...", file=sys.stderr)

    def report(done: int, total: int, text: str) -> None:
        if done < total:
            print(f"  {text}", file=sys.stderr)

    outcome = evaluate_runs(store, runs, spec, report, STOP)
    for image_id, reason in outcome.skipped[:5]:
        print(f"warning: skipped {image_id}: {reason}", file=sys.stderr)
    if outcome.skipped:
        print(f"warning: skipped {len(outcome.skipped)} unreadable or missing image(s)", file=sys.stderr)
    for warning in dict.fromkeys(outcome.warnings):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"test set: {outcome.external.describe()} · {len(outcome.computed)} run(s) evaluated, "
          f"{len(outcome.reused)} reused from the run store, in {outcome.seconds:.1f} s", file=sys.stderr)
    comparison = build_comparison(store, runs, args.threshold, args.sensitivity, args.resamples, args.seed,
                                  test_set=outcome.external.key)
    print(f"operating point: {comparison.operating_point}", file=sys.stderr)
    print_table(comparison, args, store)
    return 0


def print_table(comparison, args: argparse.Namespace, store: RunStore) -> None:
    """compare's table on stdout, or with --by the subgroup table (one CSV at a time, so that
    `--format csv > file` stays one clean CSV)."""
    from core.evaluation.compare import format_table, paper_table

    if not args.by:
        print(format_table(paper_table(comparison), args.format))
        return
    from core.evaluation.subgroups import comparison_subgroups, format_subgroup_table

    table = comparison_subgroups(comparison, args.by, store.cache_dir, args.resamples, args.seed)
    print(format_subgroup_table(table, args.format))


def command_explain(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from PIL import Image

    from core.cams import CAM_METHODS, default_run_method, explain_image, explainer_for_run
    from core.data.images import ImageError, decode_image
    from core.evaluation.compare import default_comparison_runs
    from core.figures import explanation_panels, labelled_grid

    if args.method is not None and args.method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {args.method!r} (choose from {', '.join(CAM_METHODS)})")
    store = RunStore(args.runs_dir)
    runs = [store.load(run_id) for run_id in args.runs] if args.runs else default_comparison_runs(store.list_runs())
    if not runs or any(run is None for run in runs):
        raise ValueError(f"no such run(s) in {args.runs_dir}" if args.runs else f"no completed runs in {args.runs_dir}")
    args.method = args.method or default_run_method(runs)
    try:
        image = decode_image(args.image, 224)
    except ImageError as error:
        raise ValueError(f"cannot read {args.image}: {error}") from None
    # Each run's own layer and precision, as on the Explain page.
    explainers = [(explainer_for_run(run, store.model_path(run["run_id"])), int(run["config"]["image_size"]))
                  for run in runs]
    target = {"predicted": "predicted", "malignant": 1, "benign": 0}[args.target]
    explained = explain_image(explainers, image, args.method, target)
    figure = labelled_grid(explanation_panels(explained, shared_scale=args.shared_scale))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(args.image).stem}-{args.method}"
    Image.fromarray(figure).save(out / f"{stem}.png")
    summary = [{"run_id": run["run_id"], "model": run["model"], "prob_malignant": result.probability,
                "target_class": result.target_class, "all_zero": result.all_zero, "method": result.method,
                "layer": result.layer}
               for run, result in zip(runs, explained.results)]
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    print(out / f"{stem}.png")
    return 0


def command_audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.audit.outputs import write_audit_outputs
    from core.audit.runner import AuditSettings, check_runs, run_audit
    from core.cams import default_run_method
    from core.evaluation.compare import default_comparison_runs

    store = RunStore(args.runs_dir)
    runs = check_runs(store, args.runs) if args.runs else default_comparison_runs(store.list_runs())
    if not runs:
        raise ValueError(f"no completed runs in {args.runs_dir}; train some with `python -m core train`")
    methods = _comma_list(args.methods) if args.methods else [default_run_method(runs)]
    settings = AuditSettings(methods=tuple(methods), checks=tuple(_comma_list(args.checks)),
                             images=args.images, seed=args.seed, steps=args.steps, baseline=args.baseline,
                             masks_dir=args.masks_dir, road=args.road)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device on this machine")
    with tqdm(total=1, desc="audit", unit="step", file=sys.stderr) as bar:
        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        audit = run_audit(store, runs, settings, report, STOP, device=args.device)
    for note in audit.notes:
        print(f"note: {note}", file=sys.stderr)
    paths = write_audit_outputs(audit, args.out)
    print(f"{audit.computed} results computed, {audit.reused} reused from the run store, in {audit.seconds:.0f} s",
          file=sys.stderr)
    print(paths[0])
    return 0


def command_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from core.data.datasets import check_allowed
    from core.evaluation.compare import default_comparison_runs
    from core.evaluation.predict import image_files, predict_images, write_cam_figures

    store = RunStore(args.runs_dir)
    runs = check_runs_exist(store, args.runs) if args.runs else default_comparison_runs(store.list_runs())
    if not runs:
        raise ValueError(f"no completed runs in {args.runs_dir}; train some with `python -m core train`")
    check_allowed(args.images)
    paths = image_files(args.images)
    print(f"{len(paths)} image file(s), {len(runs)} run(s)", file=sys.stderr)
    with tqdm(total=1, desc="predict", unit="step", file=sys.stderr) as bar:
        def report(done: int, total: int, text: str) -> None:
            bar.total = total
            bar.update(done - bar.n)
            bar.set_postfix_str(text, refresh=False)

        try:
            result = predict_images(runs, store, paths, report, STOP)
        except InterruptedError:
            print("prediction stopped; nothing was written", file=sys.stderr)
            return 130
    for note in result.notes:
        print(f"warning: {note}", file=sys.stderr)
    for name, reason in result.skipped[:5]:
        print(f"warning: skipped {name}: {reason}", file=sys.stderr)
    if result.skipped:
        print(f"warning: skipped {len(result.skipped)} unreadable image(s) of {len(paths)}", file=sys.stderr)
    for warning in result.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    if not result.images:
        raise ValueError(f"no readable images in {args.images}")
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.table.to_csv(out, index=False)
    except OSError as error:
        raise ValueError(f"cannot write {out}: {error.strerror or error}") from None
    print(f"{len(result.table)} prediction(s) written to {out}", file=sys.stderr)
    if args.cams:
        figures = write_cam_figures(runs, store, paths, args.cams, args.method, result, stop=STOP)
        print(f"{len(figures)} CAM figure(s) written to {args.cams}", file=sys.stderr)
    sys.stderr.flush()
    print(prediction_lines(result.table))
    return 0


def check_runs_exist(store: RunStore, run_ids: list[str]) -> list[dict]:
    runs = [store.load(run_id) for run_id in run_ids]
    missing = [run_id for run_id, run in zip(run_ids, runs) if run is None]
    if missing:
        raise ValueError(f"no run(s) {', '.join(missing)} in {store.root}")
    return runs


def prediction_lines(table) -> str:
    """The short table on stdout: image, model, P(malignant), decision, OOD flag."""
    flags = table["out_of_distribution"].map({True: "OOD", False: ""}).where(table["ood_score"].notna(), "no score")
    shown = table.assign(P=table["prob_malignant"].map("{:.3f}".format), OOD=flags)
    return shown[["image", "model", "P", "decision", "OOD"]].to_string(index=False)


@contextlib.contextmanager
def decoding_bar(disable: bool = False):
    """A progress bar on stderr (when it is a terminal) for decoding a dataset into the image cache; yields
    the progress(done, total) callback that prepare_data takes. Nothing shows when the cache is reused."""
    from tqdm import tqdm

    with tqdm(desc="decoding and hashing", unit="image", file=sys.stderr,
              disable=disable or not sys.stderr.isatty()) as bar:
        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield report


def command_check_data(args: argparse.Namespace) -> int:
    from core.data.datasets import CLASS_NAMES, prepare_data
    from core.data.duplicates import HASH_BITS

    values = {field: getattr(args, field) for field in CHECK_DATA_FIELDS
              if field != "group_near_duplicates" and getattr(args, field) is not None}
    config = TrainConfig(group_near_duplicates=not args.no_duplicate_grouping, **values)
    spec = data_spec_from_args(args)
    print(f"reading {'the synthetic set' if spec.is_synthetic else spec.source} ...", file=sys.stderr)
    with decoding_bar() as report:
        data = prepare_data(spec, config, RunStore(args.runs_dir).cache_dir, report)
    for image_id, reason in data.skipped[:5]:
        print(f"warning: skipped {image_id}: {reason}", file=sys.stderr)
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable or missing image(s)", file=sys.stderr)
    pairs = data.near_duplicate_pairs(args.threshold)
    print(f"{len(pairs)} near-duplicate pair(s) among {len(data.table)} images (Hamming distance <= {args.threshold} "
          f"of {HASH_BITS} bits): {int(pairs['crosses_splits'].sum())} across the split, "
          f"{int(pairs['conflicting_labels'].sum())} with conflicting labels; the split "
          + ("keeps near-duplicates together (--no-duplicate-grouping to stop)" if data.duplicates_grouped
             else "does not group near-duplicates"), file=sys.stderr)
    if args.format == "csv":
        print(pairs.to_csv(index=False), end="")
    elif len(pairs):
        shown = pairs.assign(label_a=pairs["label_a"].map(CLASS_NAMES.__getitem__),
                             label_b=pairs["label_b"].map(CLASS_NAMES.__getitem__),
                             conflicting_labels=pairs["conflicting_labels"].map({True: "CONFLICT", False: ""}),
                             crosses_splits=pairs["crosses_splits"].map({True: "yes", False: "no"}))
        print(shown.to_string(index=False))
    return 0


def command_hash_password(args: argparse.Namespace) -> int:
    import getpass

    from core.access import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Admin password: ")
        if getpass.getpass("Again: ") != password:
            raise ValueError("the two passwords differ")
    else:  # piped: `printf %s "$PASSWORD" | python -m core hash-password`
        password = sys.stdin.readline().rstrip("\r\n")
    print(hash_password(password))  # hash_password refuses an empty one (ValueError: one line, exit 2)
    return 0


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": command_train, "resume": command_resume, "tune": command_tune, "ablate": command_ablate,
                "list": command_list, "compare": command_compare, "evaluate": command_evaluate,
                "explain": command_explain, "audit": command_audit, "predict": command_predict,
                "check-data": command_check_data, "hash-password": command_hash_password}
    STOP.clear()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set()) if in_main_thread else None
    try:
        if args.command in ("train", "resume"):
            from core.training.distributed import joined_processes

            with joined_processes() as context:  # torchrun's processes as one run; else this process alone
                return commands[args.command](args, context)
        if "WORLD_SIZE" in os.environ:  # only then can torchrun have started us: spare every other call torch
            from core.training.distributed import launched_by_torchrun

            if launched_by_torchrun():
                raise ValueError(f"only train and resume run under torchrun, not {args.command}")
        return commands[args.command](args)
    except (RunStoreError, ValueError) as error:  # a DatasetError is a ValueError
        # One write of the whole line: torchrun's processes share one stderr, where print's separate write of
        # the newline lets another process's error land in the middle of this line.
        sys.stderr.write(f"error: {error}\n")
        sys.stderr.flush()
        return EXIT_BAD_INPUT
    except InterruptedError:
        print("stopped; the results finished so far are stored with their runs", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; the current run is stored as stopped (python -m core resume RUN_ID continues it)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`... | head`): not an error of ours. Python would otherwise complain
        # again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
