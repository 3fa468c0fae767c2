import streamlit as st

from pages.common import require_entrypoint

require_entrypoint()
st.title("Tune")
st.info("Not built yet: the paper's Optuna search over learning rate, weight decay and dropout.")
