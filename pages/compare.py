import streamlit as st

from pages.common import require_entrypoint

require_entrypoint()
st.title("Compare")
st.info("Not built yet: confusion matrices, ROC, sensitivity/specificity, kappa/G-mean with confidence intervals. "
        "Meanwhile `python -m core compare` prints the comparison table.")
