"""Entry point of the dashboard: `streamlit run streamlit_app.py`."""

import logging

import streamlit as st

from pages.common import ENTRYPOINT_RAN, access_sidebar, can_administer, has_trained_runs

# core/ logs what a server operator wants to see (model loads) on the server's console, once per process.
core_logger = logging.getLogger("core")
if not core_logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    core_logger.addHandler(handler)
    core_logger.setLevel(logging.INFO)

st.set_page_config(page_title="Skin lesion CAM dashboard", page_icon=":material/dermatology:", layout="wide")

# A newcomer on a server without trained runs opens on Start (what to do first); otherwise on Data, as before.
FIRST_VISIT = not has_trained_runs()
ADMIN_ONLY_PAGES = ("predict", "tune", "ablation")  # url paths of pages that queue work or read server paths
PAGES = [
    st.Page("pages/start.py", title="Start", icon=":material/flag:", default=FIRST_VISIT),
    st.Page("pages/data.py", title="Data", icon=":material/photo_library:", default=not FIRST_VISIT),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/explain.py", title="Explain", icon=":material/visibility:"),
    st.Page("pages/quiz.py", title="Quiz", icon=":material/quiz:"),
    st.Page("pages/predict.py", title="Predict", icon=":material/batch_prediction:"),
    st.Page("pages/audit.py", title="Audit", icon=":material/fact_check:"),
    st.Page("pages/tune.py", title="Tune", icon=":material/tune:"),
    st.Page("pages/ablation.py", title="Ablation", icon=":material/science:"),
]

st.session_state[ENTRYPOINT_RAN] = True


with st.sidebar:
    st.caption("Hybrid S-ResNet with Grad-CAM: benign vs malignant skin lesions, five CNNs, their explanations.")
    access_sidebar()

shown = PAGES if can_administer() else [page for page in PAGES if page.url_path not in ADMIN_ONLY_PAGES]
st.navigation(shown).run()
