"""tools.demo: the app served for real on a free localhost port, called through gradio_client and a headless
Chromium; what it serves, bad input on the page and at start-up. Tiny checkpoint and gallery under tmp_path."""
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import png_claiming
from datasets.synthetic import draw_photo, draw_sketch
from datasets.transforms import load_image
from models import build_model
from test_retrieve import TRAIN_ARGS, _expected_ranking, _save_train_checkpoint
from tools import ToolError, demo
from utils import visualize as vis
from utils.config import config_from_saved

TOPK = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(s, *extra):
    return ["--checkpoint", str(s["ckpt"]), "--gallery", str(s["gallery"]), "--cache_dir", str(s["cache"]),
            "--device", "cpu", "--no_progress", "--port", str(_free_port()), "--topk", str(TOPK), *extra]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo over 8 photos (3 classes of 2, 2 loose), served in this process; uploads and thumbnails
    in a temporary folder of its own."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = build_model(config_from_saved(TRAIN_ARGS), with_sampler=False).eval()
    # The checkpoint and the embedding cache inside the gallery folder: only blocked_paths keeps them from being
    # served (neither is an image, so the gallery does not list them).
    gallery = root / "gallery"
    gallery.mkdir()
    s = dict(root=root, model=model, ckpt=_save_train_checkpoint(model, gallery / "best.pth"), gallery=gallery,
             cache=gallery / ".cache", files=[])
    (root / "secret.txt").write_text("outside the gallery")
    for ci, cls in enumerate(["sun", "house", "car"]):
        (s["gallery"] / cls).mkdir(parents=True)
        for i in range(2):
            draw_photo(cls, 10 * ci + i, size=56).save(s["gallery"] / cls / f"{cls}_{i}.png")
            s["files"].append((s["gallery"] / cls / f"{cls}_{i}.png", cls))
    for i, cls in enumerate(["tree", "fish"]):
        draw_photo(cls, 100 + i, size=50).save(s["gallery"] / f"loose_{i}.jpg")
        s["files"].append((s["gallery"] / f"loose_{i}.jpg", ""))
    s["sketch"] = root / "sketch.png"
    draw_sketch("sun", 7, size=90).save(s["sketch"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        app, url, search = demo.start(demo.get_args_parser().parse_args(_argv(s)), quiet=True)
        try:
            yield {**s, "app": app, "url": url, "search": search}
        finally:
            app.close()


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    from gradio_client import Client

    return Client(served["url"], verbose=False, download_files=str(tmp_path_factory.mktemp("client")))


def _search(client, path, k=TOPK):
    from gradio_client import handle_file

    return json.loads(client.predict(handle_file(str(path)), k, api_name="/search"))


def test_search_api_returns_the_ranking_as_json(served, client):
    got = _search(client, served["sketch"])
    expected = _expected_ranking(served["model"], served["sketch"], served["files"])[:TOPK]
    assert [g["path"] for g in got] == [p for p, _, _ in expected]
    np.testing.assert_allclose([g["score"] for g in got], [s for _, s, _ in expected], atol=1e-5)
    assert [g["class"] for g in got] == [c or None for _, _, c in expected]
    assert all(set(g) == {"path", "score", "class"} for g in got)
    assert served["url"].startswith("http://127.0.0.1:") and served["app"].share_url is None


def _drawing(size=300):
    """A Sketchpad-like layer: black strokes on a transparent layer, with half-transparent edges."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    d.ellipse((90, 90, 210, 210), outline=(0, 0, 0, 255), width=7)
    d.line((60, 150, 30, 150), fill=(0, 0, 0, 110), width=5)
    d.line((150, 60, 150, 20), fill=(0, 0, 0, 255), width=5)
    return layer


def test_a_drawing_and_the_same_picture_as_a_file_give_the_same_embedding_and_results(served, client, tmp_path):
    layer = _drawing()
    layer.save(tmp_path / "drawing.png")  # a transparent PNG: loading composites it onto white, as datasets do
    from_file = served["search"].embed(load_image(tmp_path / "drawing.png"))
    for value in ({"background": None, "layers": [layer], "composite": None},
                  {"background": Image.new("RGBA", layer.size, (255, 255, 255, 255)), "layers": [layer],
                   "composite": None}):
        np.testing.assert_array_equal(served["search"].embed(demo.canvas_image(value)), from_file)
    np.testing.assert_array_equal(np.asarray(demo.sketch_from("upload", None, str(tmp_path / "drawing.png"))),
                                  np.asarray(load_image(tmp_path / "drawing.png")))  # the upload tab
    drawing = demo.sketch_from("draw", {"background": None, "layers": [layer], "composite": None}, None)
    items, text, as_json, seen = demo.page_results(served["search"], drawing, TOPK, None)
    assert as_json == _search(client, tmp_path / "drawing.png")  # the page and the API: one search
    assert text.startswith(f"**Top {TOPK} of 8 photos** · exact search") and "most frequent class" in text
    assert [c.split(" · ")[0] for _, c in items] == [f"#{r}" for r in range(1, TOPK + 1)]
    assert seen.shape == (64, 64, 3)


def test_results_are_framed_by_the_class_drawn(served):
    items, text, as_json, _ = demo.page_results(served["search"], load_image(served["sketch"]), 8, "sun")
    want = [vis.NEUTRAL if r["class"] is None else vis.GREEN if r["class"] == "sun" else vis.RED for r in as_json]
    assert [tuple(int(v) for v in img[0, 0]) for img, _ in items] == want
    assert {img.shape for img, _ in items} == {(demo.THUMB + 2 * vis.BORDER,) * 2 + (3,)}
    assert "2 of 8 are *sun*" in text
    assert [c for _, c in items] == [f"#{i} · {r['score']:.3f} · " + (f"{r['class']} · " if r["class"] else "")
                                     + r["path"].rsplit("/", 1)[1] for i, r in enumerate(as_json, 1)]


@pytest.mark.parametrize("case", ["blank", "not_image", "truncated", "bomb", "topk_zero", "topk_too_large"])
def test_bad_input_is_a_message_and_the_app_keeps_serving(served, client, tmp_path, case):
    from gradio_client.exceptions import AppError

    path, k = tmp_path / "query.png", TOPK
    if case == "blank":
        Image.new("RGB", (80, 80), (250, 250, 250)).save(path)
        expect = "query.png: the sketch is blank"
    elif case == "not_image":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
        expect = "notes.txt: cannot read the image"
    elif case == "truncated":
        path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        expect = "query.png: cannot read the image"
    elif case == "bomb":
        path.write_bytes(png_claiming(12_000, 12_000))  # 144 M pixels: over Pillow's warning limit
        expect = "query.png: refused as a possible decompression bomb"
    else:
        draw_sketch("sun", 1, size=64).save(path)
        k = 0 if case == "topk_zero" else 9
        expect = "top K must be between 1 and the gallery size, 8 photos"
    with pytest.raises(AppError) as exc:
        _search(client, path, k)
    assert expect in str(exc.value) and "Traceback" not in str(exc.value)
    assert len(_search(client, served["sketch"], 3)) == 3  # still serving


def test_blank_canvas_and_missing_file_are_messages():
    import gradio as gr

    empty = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    for value in (None, {"background": None, "layers": [], "composite": None},
                  {"background": None, "layers": [empty], "composite": None}):
        with pytest.raises(ToolError, match="The canvas is blank"):
            demo.sketch_from("draw", value, None)
    with pytest.raises(ToolError, match="No sketch file yet"):
        demo.sketch_from("upload", None, None)
    with pytest.raises(gr.Error) as exc:  # on the page: a message, HTML escaped
        with demo._page_errors(gr):
            raise ToolError("<b>x.png</b>: the sketch is blank")
    assert exc.value.message == "&lt;b&gt;x.png&lt;/b&gt;: the sketch is blank"
    with pytest.raises(gr.Error, match="The search failed on the server"):
        with demo._page_errors(gr):
            raise RuntimeError("a bug")


def test_only_the_gallery_is_served(served):
    import httpx

    def status(path):
        return httpx.get(served["url"] + path, timeout=30).status_code

    photo = served["files"][0][0]
    assert status(f"gradio_api/file={photo}") == 200
    gallery = served["gallery"]
    refused = [served["ckpt"], next(served["cache"].glob("*.npz")),  # inside the gallery folder, but blocked
               "/etc/passwd", served["root"] / "secret.txt", f"{gallery}/../secret.txt", f"{gallery}/..%2Fsecret.txt",
               demo.__file__, "README.md"]  # the server's working directory is not served either
    for path in refused:
        for route in ("gradio_api/file=", "gradio_api/file/"):
            assert status(f"{route}{path}") == 403, (route, path)
        assert status(f"file={path}") in (403, 404), path  # the route of older Gradio versions


@pytest.mark.parametrize("case", ["checkpoint_missing", "checkpoint_garbage", "empty_gallery", "corrupt_photo",
                                  "port_taken", "topk_zero"])
def test_startup_errors_exit_2_with_a_message(served, tmp_path, capsys, case):
    s = dict(served, cache=tmp_path / "cache")
    extra = []
    if case == "checkpoint_missing":
        s["ckpt"] = tmp_path / "none.pth"
        expect = "none.pth does not exist"
    elif case == "checkpoint_garbage":
        s["ckpt"] = tmp_path / "bad.pth"
        s["ckpt"].write_bytes(served["ckpt"].read_bytes()[:2000])  # a checkpoint cut short
        expect = "bad.pth is not a readable PyTorch checkpoint"
    elif case == "empty_gallery":
        s["gallery"] = tmp_path / "empty"
        s["gallery"].mkdir()
        expect = "no images found"
    elif case == "corrupt_photo":
        s["gallery"] = tmp_path / "gal"
        (s["gallery"] / "cat").mkdir(parents=True)
        draw_photo("sun", 1, size=40).save(s["gallery"] / "cat" / "ok.png")
        (s["gallery"] / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
        expect = "broken.jpg: cannot read the image"
    elif case == "port_taken":
        port = int(served["url"].rstrip("/").rsplit(":", 1)[1])
        extra = ["--port", str(port), "--topk", "1"]
        expect = f"cannot serve on 127.0.0.1:{port}"
    else:
        extra = ["--topk", "0"]
        expect = "--topk must be at least 1"
    with pytest.raises(SystemExit) as exc:
        demo.main(_argv(s, *extra))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expect in err and "Traceback" not in err, err


def test_defaults_bind_localhost_without_a_share_link():
    args = demo.get_args_parser().parse_args(["--checkpoint", "x.pth"])
    assert (args.host, args.port, args.share, args.index, args.topk) == ("127.0.0.1", 7860, False, "auto", 10)


def test_draw_and_search_in_a_real_browser(served, tmp_path):
    from tools import demo_screenshot as shot

    reason = shot.missing_browser()
    if reason:
        pytest.skip(f"no headless browser: {reason}")
    driver = shot.open_browser()
    try:
        # One stroke, a roof, in few pointer moves: every move repaints the canvas, slowly without a GPU.
        assert shot.draw_and_search(driver, served["url"], [[(-0.6, 0.5), (0.0, -0.6), (0.6, 0.5)]], steps=2,
                                    drawn_class="sun") == TOPK
        summary = driver.find_element("css selector", "#summary").text
        driver.save_screenshot(str(tmp_path / "demo.png"))
    finally:
        driver.quit()
    assert f"Top {TOPK} of 8 photos" in summary and f"of {TOPK} are sun" in summary
    with Image.open(tmp_path / "demo.png") as img:
        assert img.size[0] >= 1000
