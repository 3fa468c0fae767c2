"""The engine of the skin-cancer explainability dashboard: datasets, models, training, metrics, run store.

Nothing in core/ imports streamlit; the dashboard pages and the CLI (`python -m core`) both call it.
"""
