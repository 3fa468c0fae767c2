"""Every figure of the dashboard and the reports, built in one place (plotly figures, numpy images)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.datasets import CLASS_NAMES

CLASS_COLOURS = {"benign": "#4c9a8a", "malignant": "#b5483b"}
TRAIN_COLOUR, VALIDATION_COLOUR = "#7a3b2e", "#3b6ea5"
MASK_OUTLINE_COLOUR = (0, 230, 118)


def class_counts_figure(class_counts: dict[str, dict[str, int]]) -> go.Figure:
    """Images per class and split, as grouped bars."""
    splits = list(class_counts)
    figure = go.Figure([
        go.Bar(name=name.capitalize(), x=splits, y=[class_counts[split][name] for split in splits],
               marker_color=CLASS_COLOURS[name], text=[class_counts[split][name] for split in splits],
               textposition="outside")
        for name in CLASS_NAMES
    ])
    figure.update_layout(barmode="group", height=320, margin=dict(l=10, r=10, t=30, b=10),
                         yaxis_title="images", legend=dict(orientation="h", y=1.12))
    return figure


def training_curves_figure(history: list[dict], title: str = "") -> go.Figure:
    """Loss and accuracy (train vs validation) and validation AUC per epoch."""
    figure = make_subplots(rows=1, cols=3, subplot_titles=("Loss", "Accuracy", "Validation AUC"))
    epochs = [entry["epoch"] for entry in history]

    def line(values, name, colour, column, dash=None, show_legend=True):
        figure.add_trace(go.Scatter(x=epochs, y=values, name=name, mode="lines+markers", legendgroup=name,
                                    showlegend=show_legend, line=dict(color=colour, dash=dash)), row=1, col=column)

    line([e["train_loss"] for e in history], "train", TRAIN_COLOUR, 1)
    line([e["val_loss"] for e in history], "validation", VALIDATION_COLOUR, 1)
    line([e["train_acc"] for e in history], "train", TRAIN_COLOUR, 2, show_legend=False)
    line([e["val_acc"] for e in history], "validation", VALIDATION_COLOUR, 2, show_legend=False)
    line([e["val_auc"] for e in history], "validation", VALIDATION_COLOUR, 3, show_legend=False)
    figure.update_xaxes(title_text="epoch", dtick=1 if len(epochs) <= 12 else None)
    figure.update_yaxes(range=[0, 1.02], row=1, col=2)
    figure.update_yaxes(range=[0, 1.02], row=1, col=3)
    figure.update_layout(height=300, margin=dict(l=10, r=10, t=50, b=10), title=title or None,
                         legend=dict(orientation="h", y=-0.25))
    return figure


def outline_mask(image: np.ndarray, mask: np.ndarray, colour=MASK_OUTLINE_COLOUR) -> np.ndarray:
    """The image with the border of a binary mask drawn on it (one pixel wide)."""
    mask = mask.astype(bool)
    interior = mask.copy()
    interior[1:, :] &= mask[:-1, :]
    interior[:-1, :] &= mask[1:, :]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    outlined = image.copy()
    outlined[mask & ~interior] = colour
    return outlined
