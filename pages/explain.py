"""Explain: where does the model look? Upload images (or pick built-in samples), pick a checkpoint, layers and
method; per image, see the top-5 predictions (click one to explain it, or search any class), how far the image
is from the training data, and the overlays; download them one by one or all together (zip)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from core import charts
from core.errors import UserError
from core.images import SUPPORTED_EXTENSIONS
from pages import cam, common
from pages.cam import Picture

common.setup("Explain")

TOP1 = "the top-1 prediction"


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
    chosen = st.session_state.get("explain_checkpoint")
    if chosen is not None and chosen not in found:  # deleted or moved while chosen: not silently another model
        st.session_state["explain_checkpoint_gone"] = chosen
        del st.session_state["explain_checkpoint"]
    gone = st.session_state.get("explain_checkpoint_gone")
    if gone is not None:
        st.warning(f"The checkpoint you chose, {gone}, is no longer there (deleted or moved): choose another one.",
                   icon=":material/folder_off:")
    labels = {path: common.checkpoint_label(path) for path in found}  # read once: the store changes as runs train
    return st.selectbox("Checkpoint", found, format_func=labels.__getitem__, key="explain_checkpoint",
                        index=None if gone is not None else 0, placeholder="Choose a checkpoint",
                        on_change=lambda: st.session_state.pop("explain_checkpoint_gone", None),
                        help="Any checkpoint under the ResLens home folder, newest first.")


def pick_images() -> list[Picture]:
    """The uploads, else the chosen built-in samples; each hashed once here (its digest keys every cache)."""
    uploads = st.file_uploader("Drop images here", type=list(SUPPORTED_EXTENSIONS), accept_multiple_files=True,
                               help="JPEG, PNG, WebP, BMP, GIF or TIFF; each is explained on its own.")
    if uploads:
        return [Picture.of(u.name, u.getvalue()) for u in uploads]
    options = samples()
    chosen = st.multiselect("...or explain built-in samples", range(len(options)), default=list(range(min(3, len(options)))),
                            format_func=lambda i: options[i].label)
    return [Picture.of(options[i].filename, options[i].png) for i in chosen]


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
    kind = tuple((i.name, i.resolution) for i in layers)  # choices carry over between checkpoints of one kind
    if st.session_state.get("layers-of") != kind:  # another architecture or input size: its own defaults
        for key in [k for k in st.session_state if str(k).startswith("layers-")]:
            del st.session_state[key]
        st.session_state["layers-of"] = kind
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


def controls(layers: list[Any]) -> dict[str, Any]:
    """The sidebar: method, smoothing, colour scale, colormap, opacity and ``layers`` (by stage, with map size)."""
    from core.cam_scale import SCALES
    from core.overlay import COLORMAPS

    with st.sidebar:
        st.header("Explanation")
        method = st.selectbox("Method", list(cam.METHODS), key="explain_method",
                              help="Grad-CAM: evidence for the class. Grad-CAM++ and LayerCAM: sharper at shallow "
                              "layers. Score-CAM: no gradients, one forward pass per channel. Eigen-CAM: the "
                              "activations' main component, the same for every class. Counterfactual: what "
                              "speaks against the class. BENCHMARKS.md compares how faithful each is.")
        if cam.METHODS[method] == "scorecam":
            st.caption("Score-CAM runs the model once per channel of each layer (512 at layer2 of a ResNet-50): "
                       "seconds on a GPU, up to minutes on a CPU.")
        smoothing = st.multiselect("Smoothing", list(cam.SMOOTHING), key="explain_smoothing",
                                   help="As pytorch-grad-cam offers them: the mean map over six flipped and "
                                   "brightened copies, and/or the first principal component of the weighted "
                                   "channels instead of their sum. Both reduce noise.")
        scale = st.radio("Colour scale", list(SCALES), format_func=SCALES.get, key="explain_scale",
                         help="Own: every map spans the whole colormap, even for a class at 0% probability. "
                         "Shared: all images' maps of a layer are divided by the largest value among them, so a "
                         "weak map looks weak.")
        colormap = st.selectbox("Colormap", list(COLORMAPS), index=list(COLORMAPS).index("jet")
                                if "jet" in COLORMAPS else 0, key="explain_colormap")
        opacity = st.slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="explain_opacity")
        chosen = pick_layers(layers)
    return {"method": cam.METHODS[method], "method_label": method, "layers": chosen, "scale": scale,
            "smoothing": tuple(cam.SMOOTHING[s] for s in smoothing), "colormap": colormap, "opacity": opacity,
            "layer_info": {info.name: info for info in layers}}


@dataclass
class Card:
    """One explained image, waiting for its overlays (drawn once every image's maps are known)."""

    picked: Picture
    stem: str
    image: Any  # PIL.Image.Image
    cells: list[Any]
    maps: dict[str, Any]  # layer -> unnormalised map at the model's input size
    class_name: str
    record: dict[str, Any]


def pick_target(key: str, probs: Any, class_names: list[str], column: Any) -> int:
    """The image's class to explain: a click on a row of its top-5 table, or a class typed in its own box."""
    top5 = charts.probabilities_frame(probs, class_names, k=5)
    box_key, drawn_key = f"target-{key}", f"top5-drawn-{key}"
    table_key = f"top5-{key}-{st.session_state.get(drawn_key, 0)}"  # a new key: a table drawn with no row ticked

    def clicked() -> None:
        rows = st.session_state[table_key].selection.rows
        if rows:
            st.session_state[box_key] = str(top5["class"].iloc[rows[0]])

    def typed() -> None:  # a class chosen in the box: the table's ticked row no longer says what is explained
        st.session_state[drawn_key] = st.session_state.get(drawn_key, 0) + 1

    column.dataframe(top5, hide_index=True, width="stretch", key=table_key, on_select=clicked,
                     selection_mode="single-row",
                     column_config={"probability": st.column_config.ProgressColumn(format="percent", min_value=0,
                                                                                   max_value=1)})
    choice = column.selectbox("Class to explain", [TOP1] + sorted(class_names), key=box_key, on_change=typed,
                              help="Click a row of the table above, or type here to search every class.")
    return int(probs.argmax()) if choice == TOP1 else class_names.index(choice)


def explain_one(index: int, stem: str, checkpoint: Path, picked: Picture, class_names: list[str],
                options: dict[str, Any]) -> Card | None:
    """The image's predictions, out-of-distribution verdict and class; its maps, computed (cached)."""
    import numpy as np

    from core import ood
    from core.explain_files import prediction_record
    from core.overlay import framed

    image = cam.image_of(picked)
    logits = cam.logits(checkpoint, picked)
    probs = cam.predict(checkpoint, picked)
    left, right = st.columns([3, 2])
    target = pick_target(f"{index}-{picked.key[:12]}", probs, class_names, left)
    verdict = ood.assess(logits, cam.ood_stats(checkpoint))
    right.markdown(f"Explaining **{class_names[target]}** ({probs[target]:.1%}) with {options['method_label']}.")
    if verdict.level in ("out", "borderline"):
        right.warning(verdict.sentence, icon=":material/report:" if verdict.level == "out" else ":material/help:")
    else:
        right.caption(verdict.sentence)
    cells = grid(1 + len(options["layers"]))
    cells[0].image(framed(np.asarray(image)), caption=f"{picked.name} ({image.width}x{image.height})",
                   width="stretch")
    if not options["layers"]:
        right.caption("Choose at least one layer in the sidebar.")
        return None
    maps = cam.maps(checkpoint, picked, options["layers"], options["method"], target, options["smoothing"])
    record = prediction_record(picked.name, probs, class_names, target, 5, method=options["method"],
                               layers=list(options["layers"]), smoothing=list(options["smoothing"]),
                               scale=options["scale"], ood=verdict.record())
    return Card(picked, stem, image, cells, maps, class_names[target], record)


def draw_overlays(index: int, card: Card, checkpoint: Path, options: dict[str, Any],
                  scales: dict[Any, float]) -> list[Any]:
    """Each layer's overlay in its cell with its scale and a PNG download; returns the shown maps."""
    from core.cam_scale import on_scale, scale_label
    from core.explain_files import ShownMap

    label = "against the class" if options["method"] == "counterfactual" else "importance"
    shown = []
    for cell, layer in zip(card.cells[1:], options["layers"]):
        scale = scales.get(layer)
        png = cam.overlay_png(checkpoint, card.image, on_scale(card.maps[layer], scale), options["colormap"],
                              options["opacity"], label)
        item = ShownMap(card.stem, layer, options["method"], card.class_name, png, card.maps[layer])
        info = options["layer_info"][layer]
        cell.image(png, caption=f"{layer} ({info.resolution}) · {scale_label(scale)}", width="stretch")
        cell.download_button("Download PNG", png, file_name=item.name("png"), mime="image/png",
                             key=f"dl-{index}-{layer}", icon=":material/download:")
        shown.append(item)
    return shown


def grid(n: int, per_row: int = 3) -> list[Any]:
    """``n`` cells in rows of ``per_row`` equal columns (the original first, then one per layer)."""
    cells: list[Any] = []
    while len(cells) < n:
        cells += st.columns(per_row)
    return cells[:n]


def body() -> None:
    from core.cam_scale import shared_scales
    from core.explain_files import bundle_zip, file_part, unique_stems

    st.title("Explain")
    st.caption("Where does the model look? Grad-CAM highlights the regions that raise the chosen class's score. "
               "Click a row of an image's top-5 table to explain that class.")
    checkpoint = pick_checkpoint()
    if checkpoint is None:
        return
    images = pick_images()  # drawn before the model loads: a checkpoint that fails keeps the uploads
    try:
        _, info = common.load_model(checkpoint)
        layers = cam.layer_choices(checkpoint)
    except UserError as exc:
        st.error(str(exc), icon=":material/error:")
        controls(st.session_state.get("explain_layers", []))  # the sidebar stays as it was
        return
    st.session_state["explain_layers"] = layers
    options = controls(layers)
    export = st.empty()
    cards: list[tuple[int, Card]] = []
    for index, (picked, stem) in enumerate(zip(images, unique_stems([p.name for p in images]))):
        with st.container(border=True), common.shown_errors(f"Explaining {picked.name}"):
            st.subheader(picked.name)
            card = explain_one(index, stem, checkpoint, picked, info.class_names, options)
            if card is not None:
                cards.append((index, card))
    scales = shared_scales((layer, c.maps[layer]) for _, c in cards for layer in options["layers"]) \
        if options["scale"] == "shared" else {}
    shown = []
    for index, card in cards:
        with common.shown_errors(f"Drawing {card.picked.name}"):
            shown += draw_overlays(index, card, checkpoint, options, scales)
    if shown:
        about = {"checkpoint": common.checkpoint_label(checkpoint), "method": options["method"],
                 "scale": options["scale"], "scales": scales}
        export.download_button(
            "Download everything (zip)", bundle_zip(shown, [c.record for _, c in cards], about),
            file_name=f"reslens-{file_part(info.run_name or checkpoint.parent.name)}-{file_part(options['method'])}.zip",
            mime="application/zip", icon=":material/folder_zip:", key="explain_zip",
            help="Every overlay shown (PNG), the maps themselves (.npy, before colour scaling) and the "
                 "predictions (JSON and CSV); names carry image, layer, method and class.")


common.run_page(body, "The Explain page")
