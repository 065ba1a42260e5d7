"""Draw a sketch, find the photos: a web page (Gradio) over a trained PuXIM checkpoint and a gallery.

    python -m tools.demo --checkpoint results/synthetic_demo/best.pth            # http://127.0.0.1:7860
    python -m tools.demo --checkpoint best.pth --gallery ~/photos --index auto --port 8080

The page has a drawing canvas (brush size, undo, clear) and an upload tab for a sketch file, a top-K
control and an optional "what did you draw?" class; the results come as a grid with rank, cosine score,
file name and class. The query class of a drawing is unknown, so results are framed green (same class)
or red (another class) only when that class is chosen; otherwise the frame is grey and the summary names
the most frequent class of the top K. The gallery, its cached embeddings and the exact / FAISS index are
``tools.search``'s, as for ``tools.retrieve`` (default gallery: the checkpoint's unseen-class photos).

A drawing goes through the same preprocessing as a dataset sketch: the canvas's RGBA layers are
composited onto white, then the ink threshold, crop and pad of ``datasets.transforms.preprocess_sketch``,
so a drawing and the same picture as a file give the same embedding.

API: the endpoint ``/search`` takes a sketch file and K and returns a JSON list, best first, of
``{"path", "score", "class"}`` (class null when unknown); the page's button runs the same search::

    import json
    from gradio_client import Client, handle_file
    hits = json.loads(Client("http://127.0.0.1:7860/").predict(handle_file("s.png"), 10, api_name="/search"))

The list comes as JSON text, not as a JSON value: gradio_client takes every dict with a ``path`` key in a
JSON value for a file, downloads it and puts the local copy's name in its place (the scores would be lost).

Security: the server binds to 127.0.0.1 unless ``--host``, makes no share link unless ``--share``, and
serves no file of the machine but the gallery's (Gradio's ``allowed_paths`` is the gallery folder, the
checkpoint and the embedding cache are blocked) and what the app itself writes (thumbnails, uploads) in a
private temporary folder. Bad input on the page (a blank canvas, a file that is not an image, a
decompression bomb, K out of range) is a message there; bad start-up input (checkpoint, gallery, port)
is a one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tools import ToolError, run_tool
from tools.search import (Hit, SketchSearch, add_search_args, checkpoint_settings, default_cache_dir, open_checkpoint,
                          open_gallery)

log = logging.getLogger("demo")

NO_CLASS = "(not saying)"  # the class dropdown's "unknown": results framed grey
MAX_TOPK = 100  # the slider's end: a page of results, not the gallery
THUMB = 192  # side of a result thumbnail, frame excluded (pixels)
MAX_UPLOAD = "10mb"  # a sketch is a few KB; Gradio refuses bigger uploads before any decoding


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m tools.demo", description="PuXIM draw-a-sketch search (a web page)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (best.pth)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--topk", type=int, default=10, help=f"results shown at first (default 10, at most {MAX_TOPK})")
    p.add_argument("--share", action="store_true",
                   help="also make a public gradio.live link (off by default: anyone with the link can search)")
    add_search_args(p)
    return p


def main(argv=None) -> None:
    return run_tool("tools.demo", run, get_args_parser().parse_args(argv))


def run(args) -> None:
    """Serve until Ctrl+C, with the uploads and thumbnails in a private temporary folder removed at the end."""
    own_tmp = None
    if not os.environ.get("GRADIO_TEMP_DIR"):  # not the shared /tmp/gradio of every user of the machine
        own_tmp = os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="puxim-demo-")
    try:
        app, url, _ = start(args)
        print(f"PuXIM demo on {url} (Ctrl+C to stop)", flush=True)
        app.block_thread()
    finally:
        if own_tmp is not None:
            shutil.rmtree(own_tmp, ignore_errors=True)
            del os.environ["GRADIO_TEMP_DIR"]


# ----------------------------------------------------------------------------- start-up
def start(args, *, quiet: bool = False):
    """Load everything, build the page and serve it from a background thread: ``(app, local URL, search)``.

    Every start-up problem is a ``ToolError`` (or a checkpoint / dataset error) before anything is served.
    """
    if args.topk < 1:
        raise ToolError(f"--topk must be at least 1, got {args.topk}")
    if not 0 < args.port < 65536:
        raise ToolError(f"--port must be between 1 and 65535, got {args.port}")
    _import_gradio()  # before the (long) embedding, not after
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up self-checks log every request
    ckpt = open_checkpoint(args.checkpoint)
    gallery = open_gallery(args, checkpoint_settings(ckpt, args.checkpoint))
    search = SketchSearch.open(args, ckpt, gallery)
    app = build_app(search, topk=min(args.topk, MAX_TOPK, len(gallery.items)),
                    title=f"{Path(args.checkpoint).name}, {len(gallery.items):,} photos")
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    blocked = [str(Path(args.checkpoint).resolve()), str(cache_dir.resolve())]
    app.queue(default_concurrency_limit=1)  # one search at a time: one model, one device
    try:
        _, url, _ = app.launch(server_name=args.host, server_port=args.port, share=args.share,
                               prevent_thread_lock=True, allowed_paths=list(gallery.folders),
                               blocked_paths=blocked, max_file_size=MAX_UPLOAD, show_error=False,
                               ssr_mode=False, inbrowser=False, quiet=quiet, enable_monitoring=False)
    except OSError as e:  # the port is taken: Gradio says "Cannot find empty port in range"
        raise ToolError(f"cannot serve on {args.host}:{args.port} ({str(e).split('. ')[0]}); pass another --port "
                        f"or stop what uses it.") from None
    return app, url, search


def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ToolError("the demo needs Gradio: pip install gradio (or make demo)") from None
    return gr


# ----------------------------------------------------------------------------- the query
def canvas_image(value) -> Image.Image | None:
    """A Sketchpad value (``background``, ``layers``, ``composite``) as one RGB picture, on white.

    The layers are alpha-composited over the background over white, as ``datasets.transforms.to_rgb`` does
    for a transparent sketch file; without layers the composite (or the background) is used. None: empty.
    """
    from datasets.transforms import to_rgb

    if value is None:
        return None
    if not isinstance(value, dict):  # a plain image
        return to_rgb(_pil(value))
    layers = [_pil(x).convert("RGBA") for x in value.get("layers") or [] if x is not None]
    background = value.get("background")
    if not layers:
        flat = value.get("composite") if value.get("composite") is not None else background
        return None if flat is None else to_rgb(_pil(flat))
    parts = ([_pil(background).convert("RGBA")] if background is not None else []) + layers
    width, height = max(p.size[0] for p in parts), max(p.size[1] for p in parts)
    canvas = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    for part in parts:
        canvas.alpha_composite(part)
    return canvas.convert("RGB")


def _pil(x) -> Image.Image:
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, (str, os.PathLike)):
        from datasets.transforms import load_image

        return load_image(x)
    return Image.fromarray(np.asarray(x))


def sketch_from(mode: str, drawing, upload) -> Image.Image:
    """The query of the page: the drawing or the uploaded file (whichever tab is open), checked for ink."""
    if mode == "upload":
        if not upload:
            raise ToolError("No sketch file yet: upload a PNG or JPEG drawing first, or draw on the canvas.")
        return sketch_file(upload)
    img = canvas_image(drawing)
    if img is None or not _has_ink(img):
        raise ToolError("The canvas is blank: draw something with dark strokes first.")
    return img


def sketch_file(path) -> Image.Image:
    """An uploaded sketch file as RGB; a ``ToolError`` naming it when it is no image, a bomb, or blank."""
    from datasets.transforms import ImageLoadError, load_image

    if not path:
        raise ToolError("No sketch file: send a PNG or JPEG drawing.")
    name = Path(str(path)).name
    try:
        img = load_image(path)
    except ImageLoadError as e:  # its text starts with the (temporary) path: name the file as uploaded
        reason = str(e).split(": ", 1)[-1].split("; ")[0]
        raise ToolError(f"{name}: {reason}. Send a PNG or JPEG drawing.") from None
    if not _has_ink(img):
        raise ToolError(f"{name}: the sketch is blank (no stroke darker than R+G+B = 300); send a drawing with "
                        f"dark strokes on a light background.")
    return img


def _has_ink(img: Image.Image) -> bool:
    from datasets.transforms import ink_bbox

    return ink_bbox(np.asarray(img.convert("RGB"))) is not None


def _topk(k, num: int) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ToolError(f"top K must be a whole number, got {k!r}") from None
    if not 1 <= k <= num:
        raise ToolError(f"top K must be between 1 and the gallery size, {num:,} photos; got {k}.")
    return k


# ----------------------------------------------------------------------------- results
def thumbnail(hit: Hit, colour: tuple[int, int, int], size: int = THUMB) -> np.ndarray:
    """The photo of ``hit`` fitted into a white ``size`` square, framed in ``colour`` (as tools.retrieve's
    picture); a grey square when the file cannot be read any more. ``uint8 [size + 2B, size + 2B, 3]``."""
    from datasets.transforms import ImageLoadError, load_image
    from utils import visualize as vis

    try:
        photo = ImageOps.contain(load_image(hit.path), (size, size), Image.Resampling.BILINEAR)
    except ImageLoadError:
        photo = Image.new("RGB", (size, size), vis.NEUTRAL)
    square = Image.new("RGB", (size, size), vis.BACKGROUND)
    square.paste(photo, ((size - photo.size[0]) // 2, (size - photo.size[1]) // 2))
    return np.asarray(ImageOps.expand(square, border=vis.BORDER, fill=colour))


def frame_colour(hit: Hit, drawn_class: str | None) -> tuple[int, int, int]:
    """Green: the class drawn; red: another known class; grey: either class unknown."""
    from utils import visualize as vis

    if drawn_class is None or hit.cls is None:
        return vis.NEUTRAL
    return vis.GREEN if hit.cls == drawn_class else vis.RED


def summary(hits: list[Hit], num: int, kind: str, ms: float, drawn_class: str | None) -> str:
    """One Markdown line: what was searched, how, and how the top K splits by class."""
    text = f"**Top {len(hits)} of {num:,} photos** · {kind} search · {ms:.0f} ms"
    known = [h.cls for h in hits if h.cls is not None]
    if drawn_class is not None:
        text += f" · {sum(c == drawn_class for c in known)} of {len(hits)} are *{drawn_class}*"
    elif known:
        cls, n = collections.Counter(known).most_common(1)[0]
        text += f" · most frequent class: *{cls}* ({n} of {len(hits)})"
    return text


def page_results(search: SketchSearch, sketch: Image.Image, k: int, drawn_class: str | None):
    """What the page shows for a query: (gallery items, summary, JSON list, the sketch as the model sees it)."""
    from utils.visualize import denormalize

    from datasets.transforms import preprocess_sketch

    t0 = time.perf_counter()
    hits = search.search(sketch, k)
    ms = (time.perf_counter() - t0) * 1e3
    # The caption: rank, score, class, file name (last, as the grid cuts a long caption short).
    items = [(thumbnail(h, frame_colour(h, drawn_class)),
              " · ".join([f"#{r}", f"{h.score:.3f}", *([h.cls] if h.cls else []), Path(h.path).name]))
             for r, h in enumerate(hits, 1)]
    seen = denormalize(preprocess_sketch(sketch, search.image_size))  # uint8 [S, S, 3]
    return items, summary(hits, len(search.gallery.items), search.index.kind, ms, drawn_class), \
        [h.as_json() for h in hits], seen


# ----------------------------------------------------------------------------- the page
def build_app(search: SketchSearch, *, topk: int, title: str):
    """The Gradio page (canvas, upload, class, K, results) and the ``/search`` API endpoint, one search behind both."""
    gr = _import_gradio()
    classes, num = search.gallery.classes, len(search.gallery.items)

    def page_search(mode, drawing, upload, k, drawn):
        with _page_errors(gr):
            out = page_results(search, sketch_from(mode, drawing, upload), _topk(k, num),
                               None if drawn in (None, NO_CLASS) else drawn)
        unreadable = sum(not Path(p["path"]).is_file() for p in out[2])
        if unreadable:  # the gallery changed since it was embedded: say so, keep serving
            gr.Warning(f"{unreadable} of the results are no longer readable (grey): restart the demo to embed "
                       f"the gallery again.")
        return out

    def api_search(sketch_path, k) -> str:
        with _page_errors(gr):
            return json.dumps([h.as_json() for h in search.search(sketch_file(sketch_path), _topk(k, num))])

    with gr.Blocks(title="PuXIM sketch search", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## PuXIM: draw a sketch, find the photos\n{_escape(title)}; {search.index.kind} search. "
                    f"Pick the brush (left of the canvas; its size is beside it, undo and clear above), draw, "
                    f"or upload a sketch file, then press **Search**.")
        mode = gr.State("draw")  # which tab holds the query
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Draw") as draw_tab:
                        drawing = gr.Sketchpad(
                            type="pil", image_mode="RGBA", canvas_size=(512, 512), height=640, format="png",
                            layers=False,
                            brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=6),
                            label="your sketch", elem_id="canvas")
                    with gr.Tab("Upload") as upload_tab:
                        upload = gr.File(label="a sketch file (PNG, JPEG)", file_types=["image"], type="filepath")
                drawn = gr.Dropdown([NO_CLASS] + classes, value=NO_CLASS, visible=bool(classes), elem_id="drawn",
                                    label="What did you draw? (optional: frames results green / red)")
                k = gr.Slider(1, max(2, min(MAX_TOPK, num)), value=topk, step=1, label="top K")
                button = gr.Button("Search", variant="primary", elem_id="search")
            with gr.Column(scale=3):
                info = gr.Markdown(elem_id="summary")
                results = gr.Gallery(label="results", columns=4, object_fit="contain", format="png",
                                     elem_id="results")
                with gr.Accordion("Details", open=False):
                    seen = gr.Image(label="the sketch as the model sees it", interactive=False, format="png")
                    as_json = gr.JSON(label="the results as /search returns them")
        draw_tab.select(lambda: "draw", None, mode, api_visibility="private")
        upload_tab.select(lambda: "upload", None, mode, api_visibility="private")
        button.click(page_search, [mode, drawing, upload, k, drawn], [results, info, as_json, seen],
                     api_visibility="private")
        # The API: inputs of its own (hidden), so a client's call does not depend on the page's tabs and fields.
        api_file = gr.File(visible=False, type="filepath")
        api_k = gr.Number(value=topk, precision=0, visible=False)
        api_out = gr.Textbox(visible=False)  # JSON text: see the module's doc
        gr.Button(visible=False).click(api_search, [api_file, api_k], api_out, api_name="search")
    return app


def _escape(text: str) -> str:
    """Gradio renders messages and Markdown as HTML: a file name must not become markup."""
    import html

    return html.escape(text, quote=False)


@contextlib.contextmanager
def _page_errors(gr):
    """A user's error becomes a message on the page (``gr.Error``, no traceback); anything else is logged
    here with its traceback and shown as one line. Either way the server keeps serving."""
    from tools import tool_errors
    from utils.errors import user_message
    from utils.runtime import UserError

    try:
        yield
    except gr.Error:
        raise
    except Exception as e:
        if isinstance(e, (UserError, *tool_errors())):
            raise gr.Error(_escape(user_message(e)), print_exception=False) from None
        log.exception("the search failed")
        raise gr.Error("The search failed on the server; its log has the details.", print_exception=False) from None


if __name__ == "__main__":
    main()
