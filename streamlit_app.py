"""Entry point of the dashboard: `streamlit run streamlit_app.py`."""

import logging

import streamlit as st

from pages.common import ENTRYPOINT_RAN

# core/ logs what a server operator wants to see (model loads) on the server's console, once per process.
core_logger = logging.getLogger("core")
if not core_logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    core_logger.addHandler(handler)
    core_logger.setLevel(logging.INFO)

st.set_page_config(page_title="Skin lesion CAM dashboard", page_icon=":material/dermatology:", layout="wide")

PAGES = [
    st.Page("pages/data.py", title="Data", icon=":material/photo_library:", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/explain.py", title="Explain", icon=":material/visibility:"),
    st.Page("pages/predict.py", title="Predict", icon=":material/batch_prediction:"),
    st.Page("pages/audit.py", title="Audit", icon=":material/fact_check:"),
    st.Page("pages/tune.py", title="Tune", icon=":material/tune:"),
    st.Page("pages/ablation.py", title="Ablation", icon=":material/science:"),
]

st.session_state[ENTRYPOINT_RAN] = True

with st.sidebar:
    st.caption("Hybrid S-ResNet with Grad-CAM: benign vs malignant skin lesions, five CNNs, their explanations.")

st.navigation(PAGES).run()
