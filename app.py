"""ResLens: `streamlit run app.py`. The home page: what is there (runs, checkpoints, data sets, GPU) and the
one-click next step. The other pages are the scripts in pages/ (Streamlit's pages folder)."""
from __future__ import annotations

import streamlit as st

from core import paths
from pages import common

common.setup("Home")

DEMO_CONFIG = "train/configs/demo.yaml"


def launch_demo() -> None:
    from train import jobs

    name = jobs.launch(paths.REPO_ROOT / DEMO_CONFIG)
    st.session_state["monitor_runs"] = [name]
    st.switch_page("pages/monitor.py")


def next_step(runs: list[dict], checkpoints: list) -> None:
    live = [r for r in runs if common.is_live(r)]
    st.subheader("Next step")
    if live:
        st.info(f"Run **{live[0]['name']}** is training now.")
        if st.button("Watch it train", type="primary", icon=":material/monitoring:"):
            st.session_state["monitor_runs"] = [live[0]["name"]]
            st.switch_page("pages/monitor.py")
    elif not checkpoints:
        st.info("Nothing has been trained yet. The demo pipeline trains a ResNet-50 on built-in synthetic "
                "shapes (no download, a few minutes on a CPU), then you can explain its predictions.")
        if st.button("Train the demo model", type="primary", icon=":material/play_arrow:"):
            launch_demo()
    else:
        st.success(f"{len(checkpoints)} checkpoint(s) ready. See where a model looks on any image.")
        left, right = st.columns(2)
        if left.button("Explain an image", type="primary", icon=":material/visibility:"):
            st.switch_page("pages/explain.py")
        if right.button("Train another model", icon=":material/model_training:"):
            st.switch_page("pages/train.py")


def runs_section(runs: list[dict]) -> None:
    st.subheader("Runs")
    if not runs:
        st.caption("No runs yet.")
        return
    common.runs_table(runs)


def body() -> None:
    st.title("ResLens")
    st.caption("Staged transfer learning of ResNet-50, and Grad-CAM to see where it looks.")
    runs = common.store().list_runs()
    checkpoints = common.find_checkpoints()
    data = common.dataset_presence()
    cols = st.columns(4)
    cols[0].metric("Runs", len(runs), help="Training runs in the run store.")
    cols[1].metric("Checkpoints", len(checkpoints), help=f"Model files under {paths.reslens_home()}.")
    cols[2].metric("Data sets present", f"{int(data['present'].sum())} of {len(data)}")
    cols[3].metric("Device", common.device_summary().split(" (")[0], help=common.device_summary())
    next_step(runs, checkpoints)
    runs_section(runs)
    st.subheader("Data sets")
    st.caption(f"Looked for under {paths.data_root()} (set RESLENS_DATA to change it).")
    common.table(data, column_config={"present": st.column_config.CheckboxColumn()})


common.run_page(body, "The home page")
