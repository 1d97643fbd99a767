"""ResLens: `streamlit run app.py`. The router: page config and the list of pages (each in pages/)."""
from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="ResLens", page_icon="🔎", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/monitor.py", title="Monitor", icon=":material/monitoring:"),
    st.Page("pages/classes.py", title="Classes", icon=":material/category:"),
    st.Page("pages/explain.py", title="Explain", icon=":material/visibility:"),
]

st.navigation(PAGES).run()
