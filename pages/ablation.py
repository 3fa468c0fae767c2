import streamlit as st

from pages.common import require_entrypoint

require_entrypoint()
st.title("Ablation")
st.info("Not built yet: the paper's component ablation and the split x epochs grid.")
