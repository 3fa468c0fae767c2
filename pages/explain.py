import streamlit as st

from pages.common import require_entrypoint

require_entrypoint()
st.title("Explain")
st.info("Not built yet: Grad-CAM heatmaps of all five models side by side.")
