"""Every figure of the dashboard and the reports, built in one place (plotly figures, numpy images)."""

from __future__ import annotations

import functools

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.data.datasets import CLASS_NAMES
from core.formatting import format_interval, format_p_value
from core.models import get_model_spec

# Importing streamlit makes its own template plotly's default; its colours are placeholders such as
# "#000033" that only Streamlit's front end resolves. Every figure names its template, so that a
# figure exported from the dashboard (the HTML report) looks as it does from the CLI.
TEMPLATE = "plotly_white"


def templated(build):
    """Give the plotly figure `build` returns this module's template and axes that make room for
    their labels."""

    @functools.wraps(build)
    def build_with_template(*args, **kwargs):
        figure = build(*args, **kwargs)
        figure.update_layout(template=TEMPLATE)
        figure.update_xaxes(automargin=True)
        figure.update_yaxes(automargin=True)
        return figure

    return build_with_template

CLASS_COLOURS = {"benign": "#4c9a8a", "malignant": "#b5483b"}
TRAIN_COLOUR, VALIDATION_COLOUR = "#7a3b2e", "#3b6ea5"
MASK_OUTLINE_COLOUR = (0, 230, 118)


@templated
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


@templated
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


def explanation_panels(explained, opacity: float = 0.5, colour_map: str = "jet",
                       shared_scale: bool = False, show_mask: bool = False) -> list[tuple[str, str, list[np.ndarray]]]:
    """(title, subtitle, [heatmap overlay, contour overlay]) per model."""
    # Here, not at the top: the comparison's figures need neither grad-cam nor OpenCV.
    from core.cams import CAM_METHODS, contour_overlay, overlay, shared_scale_maximum

    scale = shared_scale_maximum(explained.results) if shared_scale else None
    base = explained.image
    if show_mask and explained.mask is not None:
        base = outline_mask(base, explained.mask)
    panels = []
    for result in explained.results:
        heat = result.normalised(scale)
        called = "malignant" if result.predicted_class else "benign"
        subtitle = f"P(malignant) {result.probability:.3f} -> {called}"
        method = CAM_METHODS[result.method].display_name if result.method in CAM_METHODS else result.method
        subtitle += f" | {method}" + (f" on {result.layer}" if result.layer else "")
        if result.all_zero:
            subtitle += " | all-zero map"
        elif result.uniform:
            subtitle += " | uniform map"
        panels.append((get_model_spec(result.model).display_name, subtitle,
                       [overlay(base, heat, opacity, colour_map), contour_overlay(base, heat)]))
    return panels


MODEL_COLOURS = {"ResNet18": "#4c72b0", "ResNet50": "#dd8452", "DenseNet121": "#55a868", "EfficientNetB0": "#8172b3",
                 "Hybrid S-ResNet": "#c44e52"}


def model_colour(name: str, index: int = 0) -> str:
    palette = list(MODEL_COLOURS.values())
    return MODEL_COLOURS.get(name, palette[index % len(palette)])


@templated
def confusion_matrices_figure(entries: list[tuple[str, list[list[int]]]]) -> go.Figure:
    """Side-by-side confusion matrices (rows: true class, columns: predicted), counts and row %."""
    figure = make_subplots(rows=1, cols=max(len(entries), 1), subplot_titles=[name for name, _ in entries],
                           horizontal_spacing=0.04)
    labels = ["Benign", "Malignant"]
    for column, (_, matrix) in enumerate(entries, start=1):
        counts = np.asarray(matrix, dtype=float)
        row_share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        text = [[f"{int(counts[r, c])}<br>({row_share[r, c]:.0%})" for c in range(2)] for r in range(2)]
        figure.add_trace(go.Heatmap(z=row_share, x=labels, y=labels, text=text, texttemplate="%{text}",
                                    colorscale="Blues", zmin=0, zmax=1, showscale=False,
                                    hovertemplate="true %{y}<br>predicted %{x}<br>%{text}<extra></extra>"),
                         row=1, col=column)
        figure.update_yaxes(autorange="reversed", row=1, col=column, showticklabels=column == 1)
    figure.update_xaxes(title_text="predicted")
    figure.update_yaxes(title_text="true", row=1, col=1)
    figure.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10))
    return figure


@templated
def roc_figure(curves: list[tuple[str, np.ndarray, np.ndarray, float]]) -> go.Figure:
    """ROC curves of several models on one plot; entries are (name, fpr, tpr, auc)."""
    figure = go.Figure()
    for index, (name, fpr, tpr, auc) in enumerate(curves):
        figure.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUC {auc:.3f})",
                                    line=dict(color=model_colour(name, index))))
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(color="#999", dash="dot")))
    figure.update_layout(xaxis_title="1 - specificity (false positive rate)", yaxis_title="sensitivity",
                         height=420, margin=dict(l=10, r=10, t=30, b=10), title="ROC (test)",
                         legend=dict(x=0.45, y=0.05))
    return figure


@templated
def precision_recall_figure(curves: list[tuple[str, np.ndarray, np.ndarray, float]],
                            prevalence: float | None = None) -> go.Figure:
    """Precision-recall curves; entries are (name, recall, precision, average precision)."""
    figure = go.Figure()
    for index, (name, recall, precision, average) in enumerate(curves):
        figure.add_trace(go.Scatter(x=recall, y=precision, mode="lines", name=f"{name} (AP {average:.3f})",
                                    line=dict(color=model_colour(name, index), shape="hv")))
    if prevalence is not None:
        figure.add_hline(y=prevalence, line=dict(color="#999", dash="dot"), annotation_text="prevalence")
    figure.update_layout(xaxis_title="recall (sensitivity)", yaxis_title="precision", height=420,
                         margin=dict(l=10, r=10, t=30, b=10), title="Precision-recall (test)",
                         yaxis_range=[0, 1.02], legend=dict(x=0.02, y=0.05))
    return figure


@templated
def metric_bars_figure(table, metrics: list[tuple[str, str]], title: str) -> go.Figure:
    """Grouped bars: one group per metric, one bar per model in the model's colour, with 95% interval
    error bars. `table` has columns Model, <title>, '<title> low', '<title> high'; metrics are (title, label)."""
    figure = go.Figure()
    labels = [label for _, label in metrics]
    for index, row in enumerate(table.to_dict("records")):
        values = np.array([row[column] for column, _ in metrics], dtype=float)
        error_high = np.array([row[f"{column} high"] for column, _ in metrics], dtype=float) - values
        error_low = values - np.array([row[f"{column} low"] for column, _ in metrics], dtype=float)
        figure.add_trace(go.Bar(name=row["Model"], x=labels, y=values,
                                text=[f"{v:.3f}" if np.isfinite(v) else "--" for v in values],
                                marker_color=model_colour(row["Model"], index), textposition="outside",
                                error_y=dict(type="data", array=error_high, arrayminus=error_low, visible=True,
                                             color="#444")))
    figure.update_layout(barmode="group", title=title, yaxis_range=[0, 1.1], height=380,
                         margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=1.08))
    return figure


@templated
def compared_training_curves_figure(histories: list[tuple[str, list[dict]]]) -> go.Figure:
    """Loss, accuracy and validation AUC per epoch of several runs: solid validation, dotted train."""
    figure = make_subplots(rows=1, cols=3, subplot_titles=("Loss", "Accuracy", "Validation AUC"))
    for index, (name, history) in enumerate(histories):
        colour = model_colour(name, index)
        epochs = [entry["epoch"] for entry in history]
        for column, key, dash, show in ((1, "train_loss", "dot", False), (1, "val_loss", "solid", True),
                                        (2, "train_acc", "dot", False), (2, "val_acc", "solid", False),
                                        (3, "val_auc", "solid", False)):
            figure.add_trace(go.Scatter(x=epochs, y=[entry[key] for entry in history], mode="lines+markers",
                                        name=name, legendgroup=name, showlegend=show,
                                        line=dict(color=colour, dash=dash)), row=1, col=column)
    figure.update_xaxes(title_text="epoch")
    figure.update_layout(height=330, margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.3),
                         title="Training curves (dotted: train, solid: validation)")
    return figure


@templated
def reliability_figure(entries: list[tuple[str, list[float], list[float], float]]) -> go.Figure:
    """Reliability diagram; entries are (name, mean predicted per bin, observed share, ECE)."""
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                                line=dict(color="#999", dash="dot")))
    for index, (name, predicted, observed, ece) in enumerate(entries):
        figure.add_trace(go.Scatter(x=predicted, y=observed, mode="lines+markers", name=f"{name} (ECE {ece:.3f})",
                                    line=dict(color=model_colour(name, index))))
    figure.update_layout(xaxis_title="mean predicted P(malignant)", yaxis_title="observed share malignant",
                         height=460, margin=dict(l=10, r=10, t=30, b=10), title="Calibration (test)",
                         xaxis_range=[0, 1], yaxis_range=[0, 1], legend=dict(orientation="h", y=-0.25))
    return figure


P_VALUE_COLOURS = [[0, "#c44e52"], [0.5, "#f3c6c0"], [0.5001, "#eeeeee"], [1, "#ffffff"]]  # red below 0.05


def p_value_matrix_figure(names: list[str], p_values: np.ndarray, title: str) -> go.Figure:
    """A symmetric matrix of pairwise p-values; cells below 0.05 stand out."""
    return pairwise_matrix_figure(names, p_values, title, zmin=0.0, zmax=0.1, colour_scale=P_VALUE_COLOURS,
                                  label="p = ", formatter=format_p_value)


@templated
def pairwise_matrix_figure(names: list[str], matrix: np.ndarray, title: str, zmin: float = 0.0,
                           zmax: float = 1.0, colour_scale="Blues", digits: int = 2, label: str = "",
                           formatter=None) -> go.Figure:
    """A symmetric matrix of pairwise values (agreement between maps, p-values), annotated; the
    diagonal is left blank. `formatter` writes a value (default: `digits` decimals)."""
    count = len(names)
    formatter = formatter or (lambda value: f"{value:.{digits}f}" if np.isfinite(value) else "--")
    text = [["" if i == j else formatter(float(matrix[i, j])) for j in range(count)] for i in range(count)]
    figure = go.Figure(go.Heatmap(z=np.where(np.eye(count, dtype=bool), np.nan, matrix), x=names, y=names,
                                  text=text, texttemplate="%{text}", textfont=dict(size=11), zmin=zmin, zmax=zmax,
                                  colorscale=colour_scale,
                                  showscale=False, hovertemplate=f"%{{y}} vs %{{x}}: {label}%{{text}}<extra></extra>"))
    # Category axes with every name as a tick: plotly would otherwise thin out long names.
    figure.update_xaxes(type="category", tickmode="array", tickvals=names, ticktext=names, tickangle=-30)
    figure.update_yaxes(type="category", tickmode="array", tickvals=names, ticktext=names, autorange="reversed")
    figure.update_layout(title=title, height=360, margin=dict(l=10, r=10, t=40, b=10))
    return figure


# Altair, not plotly, for the per-image explorer: its selections come back to the page (st.altair_chart's
# on_select), and it stays light when redrawn on every filter change.
PICKED, BRUSH = "picked", "brush"  # the explorer's selection parameters, as the page reads them
TENTHS = [round(0.1 * step, 1) for step in range(11)]


def disagreement_scatter(table, model_x: str, model_y: str, threshold_x: float, threshold_y: float):
    """Each test image as a point: P(malignant) by one model against another, coloured by true class,
    with both models' thresholds; the off-diagonal quadrants are where the two disagree. Click (shift
    for more) or drag a box to pick images."""
    import altair as alt

    data = table[["image_id", "true class", "models disagree", model_x, model_y]].rename(
        columns={model_x: "x", model_y: "y"})
    picked = alt.selection_point(name=PICKED, fields=["image_id"], on="click")
    brush = alt.selection_interval(name=BRUSH, encodings=["x", "y"])
    points = alt.Chart(data).mark_point(filled=True, size=70).encode(
        x=alt.X("x:Q", title=f"P(malignant) by {model_x}", scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(values=TENTHS, format=".1f")),
        y=alt.Y("y:Q", title=f"P(malignant) by {model_y}", scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(values=TENTHS, format=".1f")),
        color=alt.Color("true class:N", scale=alt.Scale(domain=list(CLASS_COLOURS), range=list(CLASS_COLOURS.values())),
                        title="true class"),
        opacity=alt.condition(picked, alt.value(0.9), alt.value(0.25)),
        tooltip=["image_id", "true class", alt.Tooltip("x:Q", title=model_x, format=".3f"),
                 alt.Tooltip("y:Q", title=model_y, format=".3f"), "models disagree"],
    ).add_params(picked, brush)
    vertical = alt.Chart(data.head(1)).mark_rule(strokeDash=[4, 4], color="#777").encode(
        x=alt.X(datum=threshold_x, axis=alt.Axis(values=TENTHS, format=".1f")))
    horizontal = alt.Chart(data.head(1)).mark_rule(strokeDash=[4, 4], color="#777").encode(
        y=alt.Y(datum=threshold_y, axis=alt.Axis(values=TENTHS, format=".1f")))
    return (points + vertical + horizontal).properties(height=440, title=f"{model_x} vs {model_y} on each test "
                                                                          "image (dashed: their thresholds)")


def probability_spread_chart(table, models: list[str], thresholds: dict[str, float]):
    """The chosen test images, one row each (named with their true class), with every model's
    P(malignant) as a dot in the model's colour and a bar from the lowest to the highest: long bars
    are where the models disagree. Click a row's dots (shift for more) to pick images."""
    import altair as alt

    rows = table.assign(image=table["image_id"] + " (" + table["true class"] + ")")
    long = rows.melt(id_vars=["image_id", "image", "true class"], value_vars=models, var_name="model",
                     value_name="p")
    long["called"] = [("malignant" if p >= thresholds[m] else "benign") for p, m in zip(long["p"], long["model"])]
    picked = alt.selection_point(name=PICKED, fields=["image_id"], on="click")
    y = alt.Y("image:N", sort=rows["image"].tolist(), title=None, axis=alt.Axis(labelLimit=260))
    x_scale = alt.Scale(domain=[0, 1])
    bars = alt.Chart(long).mark_rule(color="#bbb", strokeWidth=3).encode(
        y=y, x=alt.X("min(p):Q", title="P(malignant)", scale=x_scale,
                                                          axis=alt.Axis(values=TENTHS, format=".1f")), x2="max(p):Q")
    dots = alt.Chart(long).mark_circle(size=80).encode(
        y=y, x=alt.X("p:Q", scale=x_scale),
        color=alt.Color("model:N", title=None, legend=alt.Legend(orient="top"),
                        scale=alt.Scale(domain=models, range=[model_colour(m, i) for i, m in enumerate(models)])),
        opacity=alt.condition(picked, alt.value(0.95), alt.value(0.3)),
        tooltip=["image_id", "true class", "model", alt.Tooltip("p:Q", format=".3f", title="P(malignant)"),
                 alt.Tooltip("called:N", title="call at its threshold")],
    ).add_params(picked)
    return (bars + dots).properties(height=alt.Step(20), title="P(malignant) of every model per image "
                                                               "(grey: their spread)")


def labelled_grid(panels: list[tuple[str, str, list[np.ndarray]]], tile: int = 224) -> np.ndarray:
    """A figure as one RGB image: one column per panel (title, subtitle, images stacked downwards).
    Used for the Explain page's PNG download and `python -m core explain`."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        title_font, text_font = ImageFont.load_default(size=16), ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        title_font = text_font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # A subtitle's parts ("P(malignant) ... | HiResCAM on layer2, 12×12") wrap within the tile, never into the
    # next column; PIL's default font has no "×".
    subtitles = [_wrapped(measure, subtitle.replace("×", "x").split(" | "), text_font, tile)
                 for _, subtitle, _ in panels]
    rows = max(len(images) for _, _, images in panels)
    line, gap = 15, 6
    header = 28 + line * max(len(lines) for lines in subtitles) + 6
    canvas = Image.new("RGB", (len(panels) * (tile + gap) + gap, header + rows * (tile + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for column, ((title, _, images), lines) in enumerate(zip(panels, subtitles)):
        left = gap + column * (tile + gap)
        draw.text((left, 6), title, fill="black", font=title_font)
        for number, text in enumerate(lines):
            draw.text((left, 28 + number * line), text, fill="#444444", font=text_font)
        for row, image in enumerate(images):
            picture = Image.fromarray(image).resize((tile, tile), Image.Resampling.BILINEAR)
            canvas.paste(picture, (left, header + row * (tile + gap)))
    return np.asarray(canvas)


def _wrapped(draw, parts: list[str], font, width: int) -> list[str]:
    """Lines of at most `width` pixels: parts joined with " | " while they fit, words wrapped within a part."""
    lines: list[str] = []
    for part in parts:
        candidate = f"{lines[-1]} | {part}" if lines else part
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        current = ""
        for word in part.split(" "):
            attempt = f"{current} {word}".strip()
            if current and draw.textlength(attempt, font=font) > width:
                lines.append(current)
                current = word
            else:
                current = attempt
        lines.append(current)
    return lines


def image_table(column_titles: list[str], row_titles: list[str], rows: list[list[np.ndarray]],
                tile: int = 128, captions: list[list[str]] | None = None) -> np.ndarray:
    """A table of images as one RGB image: a title over each column, a label left of each row and an
    optional caption in a corner of each image (the audit's before/after grid: artefacts across, the
    image and each model's map down, each map captioned with the model's P(malignant))."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    gap, header, label = 4, 24, 130
    canvas = Image.new("RGB", (label + len(column_titles) * (tile + gap) + gap, header + len(rows) * (tile + gap)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(column_titles):
        draw.text((label + gap + column * (tile + gap), 5), title, fill="black", font=font)
    for row, (title, images) in enumerate(zip(row_titles, rows)):
        top = header + row * (tile + gap)
        for line, text in enumerate(title.split("\n")):
            draw.text((4, top + tile // 2 - 10 + 16 * line), text, fill="black" if line == 0 else "#555555", font=font)
        for column, image in enumerate(images):
            left = label + gap + column * (tile + gap)
            canvas.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.BILINEAR), (left, top))
            caption = captions[row][column] if captions else ""
            if caption:
                box = draw.textbbox((left + 3, top + 3), caption, font=font)
                draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill="white")
                draw.text((left + 3, top + 3), caption, fill="black", font=font)
    return np.asarray(canvas)


@templated
def localisation_bars_figure(rows: list[dict], lesion_area: float) -> go.Figure:
    """Mean CAM energy inside the lesion and pointing-game hit rate per model, with the lesion's
    area as the level a map blind to the lesion would reach."""
    names = [row["Model"] for row in rows]
    figure = go.Figure([
        go.Bar(name="CAM energy inside the lesion", x=names, y=[row["CAM energy inside the lesion"] for row in rows]),
        go.Bar(name="Pointing-game hit rate", x=names, y=[row["Pointing-game hit rate"] for row in rows]),
    ])
    # The line is named in the legend, not by an annotation on the plot, where it covered a bar.
    line = dict(color="#777", dash="dot")
    figure.add_hline(y=lesion_area, line=line)
    figure.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line,
                                name=f"lesion area {lesion_area:.0%} (a map blind to the lesion)"))
    figure.update_layout(barmode="group", yaxis_range=[0, 1.05], height=360, margin=dict(l=10, r=10, t=40, b=10),
                         title="Does each model look at the lesion? (malignant class)",
                         legend=dict(orientation="h", y=-0.15))
    return figure


@templated
def grid_heatmap_figure(rows: list[str], columns: list[str], values: np.ndarray, title: str) -> go.Figure:
    """A metric over a two-way grid (train:test split x epochs); empty cells are not run yet."""
    text = [[f"{value:.3f}" if np.isfinite(value) else "" for value in row] for row in values]
    figure = go.Figure(go.Heatmap(z=values, x=columns, y=rows, text=text, texttemplate="%{text}",
                                  colorscale="Viridis", colorbar=dict(title="")))
    figure.update_layout(title=title, height=320, margin=dict(l=10, r=10, t=40, b=10), xaxis_title="epochs",
                         yaxis_title="train:test", xaxis_type="category", yaxis_type="category")
    return figure


@templated
def colour_bar_figure(colours: list[str], maximum: float | None, title: str) -> go.Figure:
    """A thin horizontal colour bar for the CAM overlays: 0 to `maximum` (a shared scale's top, in the
    maps' own units), or 0 to 'max' when each map is scaled to its own maximum (`maximum` None)."""
    top = maximum if maximum is not None and maximum > 0 else 1.0
    values = np.linspace(0, top, len(colours))
    scale = [[index / (len(colours) - 1), colour] for index, colour in enumerate(colours)]
    figure = go.Figure(go.Heatmap(z=[values], x=values, colorscale=scale, zmin=0, zmax=top, showscale=False,
                                  hovertemplate="%{z:.3g}<extra></extra>"))
    top_label = f"{maximum:.3g}" if maximum is not None else "max"
    figure.update_xaxes(tickmode="array", tickvals=[0, top], ticktext=["0", top_label], showgrid=False)
    figure.update_yaxes(visible=False)
    # Room below for the tick labels and at the sides for the half of them that overhangs the bar's ends.
    figure.update_layout(height=100, margin=dict(l=28, r=28, t=28, b=28), title=dict(text=title, font=dict(size=13)))
    return figure


# The explanation audit. Tables come from core.audit.outputs; the plotly figures are the page's and the
# HTML report's, the matplotlib ones (`*_png`) the CLI's files, drawn from the same tables.
AUDIT_METHOD_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


@templated
def randomisation_figure(table, fail_threshold: float = 0.5) -> go.Figure:
    """Similarity of the maps to the trained model's against randomisation depth: one panel per model,
    one line per method (Spearman, with its interval), and the level above which a method fails."""
    models = list(dict.fromkeys(table["Model"]))
    figure = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True,
                           horizontal_spacing=0.03)
    methods = list(dict.fromkeys(table["Method"]))
    for column, model in enumerate(models, start=1):
        for index, method in enumerate(methods):
            rows = table[(table["Model"] == model) & (table["Method"] == method)].sort_values("step")
            if rows.empty:
                continue
            figure.add_trace(go.Scatter(
                x=rows["step"], y=rows["spearman"], mode="lines+markers", name=method, legendgroup=method,
                showlegend=column == 1, line=dict(color=AUDIT_COLOURS[index % len(AUDIT_COLOURS)]),
                error_y=dict(type="data", symmetric=False, array=rows["spearman_high"] - rows["spearman"],
                             arrayminus=rows["spearman"] - rows["spearman_low"]),
                customdata=np.stack([rows["randomised"], rows["ssim"]], axis=1),
                hovertemplate="randomised: %{customdata[0]}<br>Spearman %{y:.2f}, SSIM %{customdata[1]:.2f}"
                              "<extra>" + method + "</extra>"), row=1, col=column)
        figure.add_hline(y=fail_threshold, line=dict(color="#b5483b", dash="dot"), row=1, col=column)
        figure.update_xaxes(tickmode="array", tickvals=list(range(int(table["step"].max()) + 1)), row=1, col=column)
    figure.update_yaxes(range=[-1.05, 1.05], title_text="Spearman with trained maps", row=1, col=1)
    # One axis title under the middle panel: repeated under narrow panels they run into each other.
    figure.update_xaxes(title_text="randomisation step (0 = trained)", row=1, col=(len(models) + 1) // 2)
    figure.update_layout(height=360, margin=dict(l=10, r=10, t=60, b=10), legend=dict(orientation="h", y=-0.25),
                         title=f"Randomisation sanity check (a method above {fail_threshold} after the whole "
                               "network is randomised fails)")
    return figure


AUDIT_COLOURS = ("#3b6ea5", "#b5483b", "#4c9a8a", "#a57a3b", "#6a4ca5", "#777777", "#c06090", "#2e7a3b", "#000000")


@templated
def artefact_heatmap_figure(table) -> go.Figure:
    """Models x artefacts: the mean change in P(malignant) of benign images when the artefact is pasted
    beside the lesion, with its 95% interval (red: the artefact pushes towards malignant)."""
    models = list(dict.fromkeys(table["Model"]))
    kinds = list(dict.fromkeys(table["Artefact"]))
    cell = {(row.Model, row.Artefact): row for row in table.itertuples()}
    values = np.array([[cell[(m, k)].mean_change if (m, k) in cell else np.nan for k in kinds] for m in models])
    text = [[format_interval(cell[(m, k)].mean_change, cell[(m, k)].low, cell[(m, k)].high, 2, signed=True)
             .replace(" [", "<br>[")
             if (m, k) in cell else "" for k in kinds] for m in models]
    top = max(0.05, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.05)
    figure = go.Figure(go.Heatmap(z=values, x=kinds, y=models, text=text, texttemplate="%{text}",
                                  colorscale="RdBu_r", zmin=-top, zmax=top, colorbar=dict(title="ΔP")))
    figure.update_xaxes(type="category", tickmode="array", tickvals=kinds, ticktext=kinds)
    figure.update_yaxes(type="category", tickmode="array", tickvals=models, ticktext=models, autorange="reversed")
    figure.update_layout(height=120 + 60 * len(models), margin=dict(l=10, r=10, t=50, b=10),
                         title="Change in P(malignant) of benign images with the artefact [95% CI]")
    return figure


def _interval_bars(table, measure: str) -> dict:
    """Plotly error bars from a table's `<measure>_low` and `<measure>_high` columns."""
    return dict(type="data", symmetric=False, array=table[f"{measure}_high"] - table[measure],
                arrayminus=table[measure] - table[f"{measure}_low"])


@templated
def faithfulness_figure(table) -> go.Figure:
    """Deletion (lower is better) and insertion (higher is better) areas per model and method, with intervals."""
    labels = [f"{row.Model}<br>{row.Method}" for row in table.itertuples()]
    figure = go.Figure()
    for name, colour in (("deletion", "#b5483b"), ("insertion", "#3b6ea5")):
        figure.add_trace(go.Bar(name=f"{name} AUC", x=labels, y=table[name], marker_color=colour,
                                error_y=_interval_bars(table, name)))
    figure.update_xaxes(tickangle=0)
    figure.update_layout(barmode="group", yaxis_range=[0, 1.05], height=380, margin=dict(l=10, r=10, t=50, b=10),
                         title="Faithfulness: deletion (lower is better) and insertion (higher is better)",
                         legend=dict(orientation="h", y=-0.28))
    return figure


@templated
def audit_localisation_figure(table) -> go.Figure:
    """Energy inside the lesion, pointing game, relevance rank and top-k IoU per model and method, with
    intervals, and the lesion's own area share (what a map blind to the lesion scores on energy)."""
    labels = [f"{row.Model}<br>{row.Method}" for row in table.itertuples()]
    figure = go.Figure()
    for index, (measure, title) in enumerate(LOCALISATION_TITLES.items()):
        figure.add_trace(go.Bar(name=title, x=labels, y=table[measure], marker_color=AUDIT_COLOURS[index],
                                error_y=_interval_bars(table, measure)))
    line = dict(color="#777", dash="dot")
    area = float(table["lesion_area"].mean())
    figure.add_hline(y=area, line=line)
    figure.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line,
                                name=f"lesion area {area:.0%} (a map blind to the lesion)"))
    figure.update_xaxes(tickangle=0)
    figure.update_layout(barmode="group", yaxis_range=[0, 1.05], height=400, margin=dict(l=10, r=10, t=50, b=10),
                         title="Localisation against the lesion masks (malignant-class maps)",
                         legend=dict(orientation="h", y=-0.28))
    return figure


LOCALISATION_TITLES = {"energy_inside": "energy inside the lesion", "pointing_game": "pointing game",
                       "relevance_rank": "relevance rank accuracy", "top_iou": "top-k% IoU with the mask"}


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def randomisation_png(table, path, fail_threshold: float = 0.5) -> None:
    plt = _matplotlib()
    models = list(dict.fromkeys(table["Model"]))
    figure, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.2), sharey=True, squeeze=False)
    for axis, model in zip(axes[0], models):
        for index, method in enumerate(dict.fromkeys(table["Method"])):
            rows = table[(table["Model"] == model) & (table["Method"] == method)].sort_values("step")
            axis.errorbar(rows["step"], rows["spearman"], yerr=[rows["spearman"] - rows["spearman_low"],
                                                                rows["spearman_high"] - rows["spearman"]],
                          marker="o", capsize=3, label=method, color=AUDIT_COLOURS[index % len(AUDIT_COLOURS)])
        axis.axhline(fail_threshold, color="#b5483b", linestyle=":")
        axis.set_title(model)
        axis.set_xlabel("randomisation step")
        axis.set_ylim(-1.05, 1.05)
    axes[0][0].set_ylabel("Spearman with trained maps")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def artefact_heatmap_png(table, path) -> None:
    plt = _matplotlib()
    models = list(dict.fromkeys(table["Model"]))
    kinds = list(dict.fromkeys(table["Artefact"]))
    cell = {(row.Model, row.Artefact): row for row in table.itertuples()}
    values = np.array([[cell[(m, k)].mean_change if (m, k) in cell else np.nan for k in kinds] for m in models])
    top = max(0.05, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.05)
    figure, axis = plt.subplots(figsize=(1.6 * len(kinds) + 2.5, 0.7 * len(models) + 1.5))
    image = axis.imshow(values, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
    for i, model in enumerate(models):
        for j, kind in enumerate(kinds):
            if (model, kind) in cell:
                row = cell[(model, kind)]
                axis.text(j, i, f"{row.mean_change:+.2f}\n[{row.low:+.2f}, {row.high:+.2f}]", ha="center",
                          va="center", fontsize=8)
    axis.set_xticks(range(len(kinds)), kinds)
    axis.set_yticks(range(len(models)), models)
    axis.set_title("Change in P(malignant) of benign images [95% CI]")
    figure.colorbar(image, ax=axis, label="ΔP")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def grouped_bars_png(table, measures: dict[str, str], path, title: str, reference: float | None = None) -> None:
    """Bars per model and method for each measure, with interval whiskers (`<measure>_low/_high` columns)."""
    plt = _matplotlib()
    labels = [f"{row.Model}\n{row.Method}" for row in table.itertuples()]
    width = 0.8 / len(measures)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 2), 3.6))
    for index, (measure, name) in enumerate(measures.items()):
        positions = np.arange(len(labels)) + (index - (len(measures) - 1) / 2) * width
        values = table[measure].to_numpy(dtype=float)
        errors = [values - table[f"{measure}_low"].to_numpy(dtype=float),
                  table[f"{measure}_high"].to_numpy(dtype=float) - values]
        axis.bar(positions, values, width, yerr=errors, capsize=2, label=name,
                 color=AUDIT_COLOURS[index % len(AUDIT_COLOURS)])
    if reference is not None and np.isfinite(reference):
        axis.axhline(reference, color="#777", linestyle=":", label=f"lesion area {reference:.0%}")
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@templated
def auc_shift_figure(rows: list[dict]) -> go.Figure:
    """AUC with 95% intervals per model on the internal test part and on an external set; rows have
    model, internal, internal_low, internal_high, external, external_low, external_high."""
    figure = go.Figure()
    models = [row["model"] for row in rows]
    for part, colour, symbol in (("internal", "#4c72b0", "circle"), ("external", "#dd8452", "diamond")):
        values = np.array([row[part] for row in rows], dtype=float)
        lows = np.array([row[f"{part}_low"] for row in rows], dtype=float)
        highs = np.array([row[f"{part}_high"] for row in rows], dtype=float)
        figure.add_trace(go.Scatter(
            x=values, y=models, mode="markers", name=f"{part} test", marker=dict(color=colour, size=11, symbol=symbol),
            error_x=dict(type="data", symmetric=False, array=np.nan_to_num(highs - values),
                         arrayminus=np.nan_to_num(values - lows), color=colour, thickness=1.5),
            hovertemplate=f"%{{y}} {part}: AUC %{{x:.3f}}<extra></extra>"))
    figure.add_vline(x=0.5, line=dict(color="#999", dash="dot"), annotation_text="chance",
                     annotation_position="top right")
    figure.update_layout(title="AUC with 95% CI: internal test part vs external set", xaxis_title="AUC",
                         xaxis_range=[0.3, 1.0], height=200 + 60 * len(rows), margin=dict(l=10, r=10, t=60, b=10),
                         legend=dict(orientation="h", y=-0.35), yaxis=dict(autorange="reversed"))
    return figure


@templated
def calibration_shift_figure(internal: list[tuple[str, list[float], list[float], float]],
                             external: list[tuple[str, list[float], list[float], float]],
                             external_name: str = "external") -> go.Figure:
    """Reliability diagrams side by side: each model on its internal test part (left) and on an external
    set (right); entries as for reliability_figure."""
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                           subplot_titles=("internal test part", f"external: {external_name}"))
    for column, entries in ((1, internal), (2, external)):
        figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#999", dash="dot"),
                                    name="perfect calibration", showlegend=column == 1), row=1, col=column)
        for index, (name, predicted, observed, ece) in enumerate(entries):
            figure.add_trace(go.Scatter(x=predicted, y=observed, mode="lines+markers", legendgroup=name,
                                        name=name, showlegend=column == 1, line=dict(color=model_colour(name, index)),
                                        hovertemplate=f"{name} (ECE {ece:.3f})<br>predicted %{{x:.2f}}, "
                                                      "observed %{y:.2f}<extra></extra>"), row=1, col=column)
    figure.update_xaxes(range=[0, 1], title_text="mean predicted P(malignant)")
    figure.update_yaxes(range=[0, 1], title_text="observed share malignant", row=1, col=1)
    figure.update_layout(title="Calibration: internal vs external", height=460, margin=dict(l=10, r=10, t=60, b=10),
                         legend=dict(orientation="h", y=-0.25))
    return figure


# Metric columns of core.evaluation.subgroups.subgroup_table drawn side by side in the forest plot.
SUBGROUP_FOREST_METRICS = ("AUC", "Sensitivity")
WHOLE_SET_GROUP = "All"  # the name of each model's whole-test-set row there (subgroups.ALL)


@templated
def subgroup_forest_figure(table, title: str = "") -> go.Figure:
    """A forest plot of a subgroup table (core.evaluation.subgroups.subgroup_table): one row per group, the
    whole test set ('All') on top, a marker per model with its 95% interval, AUC and sensitivity side by side,
    a dotted line per model at its whole-set value, and groups too small to judge drawn as faded open markers."""
    groups = list(dict.fromkeys(table["Group"]))
    models = list(dict.fromkeys(table["Model"]))
    position = {group: index for index, group in enumerate(groups)}
    # Models side by side within a group's row, so their intervals do not hide one another.
    spread = 0.6 / max(len(models) - 1, 1) if len(models) > 1 else 0.0
    figure = make_subplots(rows=1, cols=len(SUBGROUP_FOREST_METRICS), shared_yaxes=True, horizontal_spacing=0.04,
                           subplot_titles=[f"{metric} [95% CI]" for metric in SUBGROUP_FOREST_METRICS])
    for model_index, model in enumerate(models):
        rows = table[table["Model"] == model]
        colour = model_colour(model, model_index)
        offset = (model_index - (len(models) - 1) / 2) * spread
        whole = rows[rows["Group"] == WHOLE_SET_GROUP]
        for column, metric in enumerate(SUBGROUP_FOREST_METRICS, start=1):
            for small in (False, True):
                part = rows[rows["too_small"] == small]
                if part.empty:
                    continue
                figure.add_trace(go.Scatter(
                    x=part[metric], y=[position[group] + offset for group in part["Group"]], mode="markers",
                    name=model, legendgroup=model,
                    showlegend=bool(column == 1 and (not small or rows["too_small"].all())),
                    opacity=0.35 if small else 1.0,
                    marker=dict(color=colour, size=8, symbol="circle-open" if small else "circle"),
                    error_x=dict(type="data", symmetric=False, array=part[f"{metric} high"] - part[metric],
                                 arrayminus=part[metric] - part[f"{metric} low"], color=colour, thickness=1.5),
                    customdata=np.stack([part["Group"], part["n"], part["positives"], part[f"{metric} low"],
                                         part[f"{metric} high"], part[f"{metric} gap"]], axis=1),
                    hovertemplate=(f"%{{customdata[0]}}: {metric} %{{x:.3f}} [%{{customdata[3]:.3f}}, "
                                   "%{customdata[4]:.3f}]<br>n=%{customdata[1]}, malignant %{customdata[2]}<br>"
                                   "gap to all %{customdata[5]:+.3f}" + ("<br>too small to judge" if small else "")
                                   + f"<extra>{model}</extra>")), row=1, col=column)
            reference = float(whole[metric].iloc[0]) if len(whole) else float("nan")
            if np.isfinite(reference):
                figure.add_vline(x=reference, line=dict(color=colour, dash="dot", width=1), row=1, col=column)
    figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="faded: too few malignant or benign "
                                "images to judge", marker=dict(color="#999999", size=8, symbol="circle-open")))
    figure.update_xaxes(range=[-0.02, 1.02])
    figure.update_yaxes(tickmode="array", tickvals=list(range(len(groups))), autorange="reversed",
                        ticktext=[_subgroup_label(table, group) for group in groups], row=1, col=1)
    figure.update_layout(height=max(280, 120 + len(groups) * (24 + 8 * len(models))),
                         margin=dict(l=10, r=10, t=60, b=10), legend=dict(orientation="h", y=-0.12),
                         title=title or "AUC and sensitivity per subgroup (dotted: each model on the whole test set)")
    return figure


def _subgroup_label(table, group: str) -> str:
    """A group's tick label, with its image counts when every model saw the same images of it."""
    rows = table[table["Group"] == group]
    counts = set(zip(rows["n"], rows["positives"]))
    if len(counts) != 1:
        return str(group)
    count, positives = counts.pop()
    small = ", too small" if rows["too_small"].all() else ""
    return f"{group}<br><sup>n={count}, {positives} malignant{small}</sup>"


STUDENT_MARK_COLOUR = (0, 229, 255)  # cyan: apart from the green lesion outline and the maps' jet colours


def marks_overlay(image: np.ndarray, marks: list, mask: np.ndarray | None = None, colour=STUDENT_MARK_COLOUR,
                  opacity: float = 1.0) -> np.ndarray:
    """The image with students' marks drawn on it (click points as dots, boxes as rectangles), and the lesion
    outline when a mask is given. `marks` are `core.quiz.scoring.Marks` in image fractions; with many students'
    marks a lower `opacity` shows where they crowd."""
    from PIL import Image, ImageDraw

    base = outline_mask(image, mask) if mask is not None else image
    height, width = base.shape[:2]
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    alpha = int(round(255 * opacity))
    radius, line = max(3, width // 45), max(2, width // 120)
    for mark in marks:
        if mark.box is not None:
            x0, y0, x1, y1 = mark.box
            draw.rectangle((x0 * width, y0 * height, x1 * width, y1 * height), outline=(*colour, alpha), width=line)
        for x, y in mark.points:
            centre = (x * width, y * height)
            draw.ellipse((centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius),
                         fill=(*colour, alpha), outline=(0, 0, 0, alpha))
    return np.asarray(Image.alpha_composite(Image.fromarray(base).convert("RGBA"), layer).convert("RGB"))


@templated
def quiz_answerers_figure(rows: list[dict]) -> go.Figure:
    """The class against the models on the same answered images: share right and pointing hit rate (the
    students' main mark, each model's map peak, inside the lesion) per answerer."""
    names = [row["Who"] for row in rows]
    figure = go.Figure([
        go.Bar(name="Right", x=names, y=[row["Right"] for row in rows], marker_color="#4c72b0"),
        go.Bar(name="Pointing hit rate (inside the lesion)", x=names, y=[row["Pointing hit rate"] for row in rows],
               marker_color="#55a868"),
    ])
    figure.update_layout(barmode="group", yaxis_range=[0, 1.05], height=340, margin=dict(l=10, r=10, t=40, b=10),
                         title="The class and the models on the same images", legend=dict(orientation="h", y=-0.2))
    return figure
