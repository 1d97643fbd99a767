"""Explain: where does the model look? Upload images (or pick built-in samples), pick a checkpoint, layers,
method and class; see the top-5 predictions and the overlays, and download them as PNG."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from core import charts
from core.images import SUPPORTED_EXTENSIONS
from pages import cam, common

common.setup("Explain")

TOP1 = "the top-1 prediction"


@dataclass(frozen=True)
class Picked:
    """One image to explain: a display name and its bytes (an upload or a built-in sample)."""

    name: str
    data: bytes


@st.cache_data(show_spinner=False)
def samples() -> list[Any]:
    from core.samples import builtin_samples

    return builtin_samples("shapes-lt") + builtin_samples("shapes")


def pick_checkpoint() -> Path | None:
    found = common.find_checkpoints()
    if not found:
        st.info("No checkpoint yet. Train the demo model from the Home page (a few minutes, offline), "
                "then come back.")
        if st.button("Go to Home", icon=":material/home:"):
            st.switch_page("app.py")
        return None
    labels = {path: common.checkpoint_label(path) for path in found}  # read once: the store changes as runs train
    return st.selectbox("Checkpoint", found, format_func=labels.__getitem__, key="explain_checkpoint",
                        help="Any checkpoint under the ResLens home folder, newest first.")


def pick_images() -> list[Picked]:
    uploads = st.file_uploader("Drop images here", type=list(SUPPORTED_EXTENSIONS), accept_multiple_files=True,
                               help="JPEG, PNG, WebP, BMP, GIF or TIFF; each is explained on its own.")
    if uploads:
        return [Picked(u.name, u.getvalue()) for u in uploads]
    options = samples()
    chosen = st.multiselect("...or explain built-in samples", range(len(options)), default=list(range(min(3, len(options)))),
                            format_func=lambda i: options[i].label)
    return [Picked(options[i].filename, options[i].png) for i in chosen]


def layer_label(info: Any) -> str:
    """'layer3.5.conv2 (conv, 14x14)', or 'layer4: whole stage (7x7)'."""
    if info.name == info.stage:
        return f"{info.name}: whole stage ({info.resolution})"
    return f"{info.name} ({info.kind}, {info.resolution})"


def pick_layers(layers: list[Any]) -> tuple[str, ...]:
    """One multiselect per stage (stem, layer1..layer4), each layer with its map resolution; forward order."""
    from core.gradcam import layers_by_stage, recommended_layer

    st.markdown("**Layers** (side by side)", help="Grouped by stage, in forward order, with each map's "
                "resolution. Deep layers: coarse but class-specific; shallow ones: sharp but noisy "
                "(try LayerCAM there).")
    groups = layers_by_stage(layers)
    default = recommended_layer(layers)
    chosen: set[str] = set()
    for stage, infos in groups.items():
        sizes = sorted({i.resolution for i in infos}, key=lambda r: -int(r.split("x")[0]))
        label = f"{stage} ({' … '.join(dict.fromkeys([sizes[0], sizes[-1]]))})"
        by_name = {i.name: i for i in infos}
        chosen |= set(st.multiselect(label, list(by_name), default=[default] if default in by_name else [],
                                     format_func=lambda n, b=by_name: layer_label(b[n]), key=f"layers-{stage}"))
    return tuple(info.name for info in layers if info.name in chosen)


def controls(checkpoint: Path, class_names: list[str]) -> dict[str, Any]:
    """The sidebar: method, layers (by stage, with map resolution), class, colormap and opacity."""
    from core.overlay import COLORMAPS

    layers = cam.layer_choices(checkpoint)
    with st.sidebar:
        st.header("Explanation")
        method = st.selectbox("Method", list(cam.METHODS), help="Grad-CAM: evidence for the class. Grad-CAM++ "
                              "and LayerCAM: sharper at shallow layers. Counterfactual: what speaks against it.")
        target = st.selectbox("Explain the class", [TOP1] + sorted(class_names))
        colormap = st.selectbox("Colormap", list(COLORMAPS), index=list(COLORMAPS).index("jet")
                                if "jet" in COLORMAPS else 0)
        opacity = st.slider("Opacity", 0.0, 1.0, 0.5, 0.05)
        chosen = pick_layers(layers)
    return {"method": cam.METHODS[method], "method_label": method, "layers": chosen, "target": target,
            "colormap": colormap, "opacity": opacity, "layer_info": {info.name: info for info in layers}}


def explain_one(index: int, checkpoint: Path, picked: Picked, class_names: list[str],
                options: dict[str, Any]) -> None:
    image = cam.image_of(picked.data, picked.name)
    probs = cam.predict(checkpoint, picked.data, picked.name)
    target = int(probs.argmax()) if options["target"] == TOP1 else class_names.index(options["target"])
    left, right = st.columns([3, 2])
    left.dataframe(charts.probabilities_frame(probs, class_names, k=5), hide_index=True, width="stretch",
                   column_config={"probability": st.column_config.ProgressColumn(format="percent", min_value=0,
                                                                                 max_value=1)})
    right.markdown(f"Explaining **{class_names[target]}** ({probs[target]:.1%}) with {options['method_label']}.")
    if not options["layers"]:
        right.caption("Choose at least one layer in the sidebar.")
    cells = grid(1 + len(options["layers"]))
    cells[0].image(image, caption=f"{picked.name} ({image.width}x{image.height})", width="stretch")
    if not options["layers"]:
        return
    maps = cam.maps(checkpoint, picked.data, picked.name, options["layers"], options["method"], target)
    label = "against the class" if options["method"] == "counterfactual" else "importance"
    for cell, layer in zip(cells[1:], options["layers"]):
        png = cam.overlay_png(checkpoint, image, maps[layer], options["colormap"], options["opacity"], label)
        info = options["layer_info"][layer]
        cell.image(png, caption=f"{layer} ({info.resolution})", width="stretch")
        cell.download_button("Download PNG", png, file_name=f"{Path(picked.name).stem}_{layer}.png",
                             mime="image/png", key=f"dl-{index}-{layer}", icon=":material/download:")


def grid(n: int, per_row: int = 3) -> list[Any]:
    """``n`` cells in rows of ``per_row`` equal columns (the original first, then one per layer)."""
    cells: list[Any] = []
    while len(cells) < n:
        cells += st.columns(per_row)
    return cells[:n]


def body() -> None:
    st.title("Explain")
    st.caption("Where does the model look? Grad-CAM highlights the regions that raise the chosen class's score.")
    checkpoint = pick_checkpoint()
    if checkpoint is None:
        return
    _, info = common.load_model(checkpoint)
    images = pick_images()
    options = controls(checkpoint, info.class_names)
    for index, picked in enumerate(images):
        with st.container(border=True), common.shown_errors(f"Explaining {picked.name}"):
            st.subheader(picked.name)
            explain_one(index, checkpoint, picked, info.class_names, options)


common.run_page(body, "The Explain page")
