"""ResLens core: data, models, checkpoints, the run store and Grad-CAM. No Streamlit here."""
