"""Entry point of the dashboard. Until the pages exist it lists the runs stored in checkpoints/."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.compare import comparison_table, default_comparison_runs
from core.models import get_model_spec
from core.runs import RunStore


def run_rows(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for run in runs:
        test = (run.get("metrics") or {}).get("test") or {}
        config = run.get("config") or {}
        rows.append({
            "Run": run["run_id"],
            "Model": get_model_spec(run["model"]).display_name,
            "Status": run.get("status"),
            "Dataset": (run.get("dataset") or {}).get("name"),
            "Image size": config.get("image_size"),
            "Epochs": config.get("epochs"),
            "Weights": run.get("weights"),
            "Test AUC": test.get("auc"),
            "Test accuracy": test.get("accuracy"),
            "Seconds": run.get("seconds"),
        })
    return pd.DataFrame(rows)


def main() -> None:
    st.set_page_config(page_title="Skin lesion CAM dashboard", page_icon=":material/dermatology:", layout="wide")
    st.title("Hybrid S-ResNet with Grad-CAM")
    st.caption("Skin-cancer classification (benign vs malignant) with five CNNs and their explanations.")
    store = RunStore()
    runs = store.list_runs()
    if not runs:
        st.info("No runs yet. Train the five models on the built-in synthetic set with "
                "`python -m core train --model all --data synthetic`.")
        return
    st.subheader(f"Runs in {store.root}/")
    four_decimals = {name: st.column_config.NumberColumn(format="%.4f") for name in ("Test AUC", "Test accuracy")}
    st.dataframe(run_rows(runs), hide_index=True, width="stretch", column_config=four_decimals)
    latest = default_comparison_runs(runs)
    if latest:
        st.subheader("Latest completed run of each model")
        table = comparison_table(latest)
        metric_format = {name: st.column_config.NumberColumn(format="%.4f") for name in table.columns[2:]}
        st.dataframe(table, hide_index=True, width="stretch", column_config=metric_format)


main()
