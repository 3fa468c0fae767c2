"""The one configuration of a training run, and the dataset it runs on.

`TrainConfig` is what the CLI parses into, what the Train page fills in and what is saved in run.json.
Its defaults are the fast demo ("quick" preset); `PAPER_PRESET` holds the paper's values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from core.data.synthetic import CENTRED_LESION_SPREAD, LESION_SPREAD

MODEL_NAMES = ("resnet18", "resnet50", "densenet121", "efficientnet_b0", "hybrid_sresnet")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
# Dataset formats (DataSpec.format, besides auto) and the pruners of a tuning study: choices the CLI and the
# pages offer, named here so that offering them loads neither the data readers nor Optuna.
FORMATS = ("synthetic", "imagefolder", "ham10000", "csv")
PRUNERS = ("median", "percentile", "hyperband", "none")

# The paper's image size; real datasets train at this size unless told otherwise.
PAPER_IMAGE_SIZE = 224
# The demo's size: small enough that all five models train on a 2-core CPU in minutes.
SYNTHETIC_TRAIN_SIZE = 96
# The quick demo's AdamW learning rate per model where none is set. EfficientNet-B0 needs a larger step to
# learn the demo set in 5 epochs: test AUC 0.86 at 1e-3, 0.95 at 3e-3 (docs/PERFORMANCE.md).
QUICK_LEARNING_RATE = 1e-3
QUICK_MODEL_LEARNING_RATES = {"efficientnet_b0": 3e-3}


@dataclass(frozen=True)
class DataSpec:
    """Which dataset to load: the built-in synthetic set or a local path, and how to read it."""

    source: str = "synthetic"  # "synthetic" or a local path
    format: str = "auto"  # auto, synthetic, imagefolder, ham10000, csv
    # Label mapping for folder names / HAM10000 dx codes / CSV label values, e.g. {"mel": 1, "nv": 0}.
    # Empty means the built-in mapping of the format.
    label_map: dict[str, int] = field(default_factory=dict)
    label_column: str | None = None  # csv: None means detect (melanoma, label, target, ...)
    image_column: str | None = None  # csv: None means detect (image_id, image, path, ...)
    images_dir: str | None = None  # csv/ham10000: None means detect next to the CSV
    masks_dir: str | None = None  # optional lesion masks (ISIC ..._segmentation.png)
    # Options of the synthetic set.
    synthetic_count: int = 1000
    synthetic_image_size: int = 128
    synthetic_seed: int = 0
    synthetic_malignant_fraction: float = 0.35
    confounder_fraction: float = 0.0  # share of malignant images given a shortcut artifact
    confounder_kind: str = "ink"  # ink or ruler
    # Lesion centres lie anywhere within this distance of the image's centre (1 is the edge): core.data.synthetic
    synthetic_lesion_spread: float = LESION_SPREAD

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic" or self.format == "synthetic"

    def synthetic_options(self) -> dict[str, Any]:
        """The synthetic set's options, as core.data.synthetic.generate_synthetic takes them."""
        return {"count": self.synthetic_count, "image_size": self.synthetic_image_size, "seed": self.synthetic_seed,
                "malignant_fraction": self.synthetic_malignant_fraction,
                "confounder_fraction": self.confounder_fraction, "confounder_kind": self.confounder_kind,
                "lesion_spread": self.synthetic_lesion_spread}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataSpec:
        """A spec as a run recorded it. Runs stored before lesions were placed anywhere drew them within 0.15
        of the centre: reloading their data (to resume, explain or audit them) must give the same images."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {"synthetic_lesion_spread": CENTRED_LESION_SPREAD, **values}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of one training run. Defaults are the quick demo on the paper's recipe."""

    model: str = "hybrid_sresnet"
    epochs: int = 5
    batch_size: int = 32
    lr: float | None = None  # None: the model's quick-demo rate (QUICK_MODEL_LEARNING_RATES, else 1e-3)
    weight_decay: float = 1e-4
    dropout: float = 0.379  # Hybrid S-ResNet head only (the paper's Optuna optimum)
    label_smoothing: float = 0.1
    image_size: int | None = None  # None: 224 for real data, SYNTHETIC_TRAIN_SIZE for the demo
    split: str = "80:20"  # train:test
    val_fraction: float = 0.15  # share of the train part held out for model selection
    seed: int = 42
    max_images: int | None = None  # stratified subset, for quick looks at big datasets
    group_near_duplicates: bool = True  # near-duplicate images stay on one side of the split, as a lesion's do
    augment: bool = True
    weighted_sampler: bool = True
    scheduler: bool = True  # cosine annealing over all epochs
    pretrained: bool = True  # ImageNet weights through torchvision's weights API
    weights_file: str | None = None  # local weights instead of a download (air-gapped sites)
    precision: str = "auto"  # auto times fp32 vs bf16+channels_last per model and device
    device: str = "auto"
    threshold: float = 0.5  # decision threshold for P(malignant)

    def __post_init__(self) -> None:
        problems = validate_config(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def test_fraction(self) -> float:
        return parse_split(self.split)

    @property
    def learning_rate(self) -> float:
        """lr, or the model's quick-demo rate where it is left automatic."""
        return self.lr if self.lr is not None else QUICK_MODEL_LEARNING_RATES.get(self.model, QUICK_LEARNING_RATE)

    def resolved(self, data: DataSpec) -> TrainConfig:
        """The config with every automatic choice filled in: the image size for the dataset, the learning rate
        for the model."""
        size = self.image_size or (SYNTHETIC_TRAIN_SIZE if data.is_synthetic else PAPER_IMAGE_SIZE)
        return dataclasses.replace(self, image_size=size, lr=self.learning_rate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        # Runs stored before near-duplicate grouping existed were split without it; reloading their data
        # (to resume, explain or audit them) must give the same split.
        values = {"group_near_duplicates": False, **values}
        return cls(**{k: v for k, v in values.items() if k in known})


def parse_split(split: str) -> float:
    """'80:20' -> 0.2, the test fraction. Raises ValueError on anything else."""
    try:
        train_part, test_part = (float(x) for x in str(split).split(":"))
    except ValueError:
        raise ValueError(f"split must look like 80:20, got {split!r}") from None
    if train_part <= 0 or test_part <= 0:
        raise ValueError(f"split must have two positive parts, got {split!r}")
    return test_part / (train_part + test_part)


def validate_config(config: TrainConfig) -> list[str]:
    problems = []
    if config.model not in MODEL_NAMES:
        problems.append(f"unknown model {config.model!r} (choose from {', '.join(MODEL_NAMES)})")
    if config.epochs < 1:
        problems.append("epochs must be at least 1")
    if config.batch_size < 2:
        problems.append("batch size must be at least 2 (batch norm needs two images)")
    if config.lr is not None and not config.lr > 0:
        problems.append("learning rate must be positive")
    if config.weight_decay < 0:
        problems.append("weight decay must be zero or positive")
    if not 0 <= config.dropout < 1:
        problems.append("dropout must be in [0, 1)")
    if not 0 <= config.label_smoothing < 1:
        problems.append("label smoothing must be in [0, 1)")
    if config.image_size is not None and not 16 <= config.image_size <= 1024:
        problems.append("image size must be between 16 and 1024 pixels")
    if not 0 < config.val_fraction < 1:
        problems.append("validation fraction must be in (0, 1)")
    if config.max_images is not None and config.max_images < 8:
        problems.append("max images must be at least 8")
    if config.precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}")
    if config.device not in DEVICES:
        problems.append(f"device must be one of {', '.join(DEVICES)}")
    if not 0 < config.threshold < 1:
        problems.append("threshold must be in (0, 1)")
    try:
        parse_split(config.split)
    except ValueError as error:
        problems.append(str(error))
    return problems


QUICK_PRESET = TrainConfig()

# The paper's values: 224 px, ImageNet weights, and the Optuna optimum (lr, weight decay, dropout).
PAPER_PRESET = TrainConfig(
    epochs=25,
    batch_size=32,
    lr=2.52e-4,
    weight_decay=1.99e-6,
    dropout=0.379,
    label_smoothing=0.1,
    image_size=PAPER_IMAGE_SIZE,
)

PRESETS = {"quick": QUICK_PRESET, "paper": PAPER_PRESET}
