"""The demo in a real headless browser: draw a sketch on the canvas, press Search, save a screenshot.

    python -m tools.demo_screenshot                                  # docs/demo_screenshot.png
    python -m tools.demo_screenshot --checkpoint best.pth --out shot.png

It serves ``tools.demo`` in this process (on a free localhost port), opens it in Chromium through
Selenium (Debian: ``apt-get install chromium chromium-driver``), draws a tent (a class the ``make run``
model never saw) with the mouse, searches and waits for the result thumbnails. The checkpoint is the
``make run`` one (``results/synthetic_demo/best.pth``, gallery: its unseen-class photos) when it exists,
otherwise an untrained tiny model over a few drawn photos (the page, not the ranking, is what it shows).
``tests/test_demo.py`` drives the browser with the same functions.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import socket
import tempfile
import time
from pathlib import Path

from tools import ToolError, run_tool

log = logging.getLogger("demo_screenshot")

MAKE_RUN_CHECKPOINT = Path("results/synthetic_demo/best.pth")
# A tent, as strokes in canvas units (x right, y down, the canvas spans -1..1): the roof, the door, the ground.
TENT = [[(-0.75, 0.55), (0.0, -0.65), (0.75, 0.55)], [(-0.2, 0.55), (0.0, 0.0), (0.2, 0.55)],
        [(-0.85, 0.57), (0.85, 0.57)], [(0.0, -0.65), (0.06, -0.8)]]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m tools.demo_screenshot", description="screenshot of tools.demo in Chromium")
    p.add_argument("--checkpoint", default=None,
                   help=f"default: {MAKE_RUN_CHECKPOINT} when it exists, else an untrained tiny model")
    p.add_argument("--out", default="docs/demo_screenshot.png", help="the PNG to write (default docs/demo_screenshot.png)")
    p.add_argument("--topk", type=int, default=10, help="results to show (default 10)")
    p.add_argument("--drawn_class", default="tent", help="the class chosen as drawn, for green/red frames "
                                                         "(default tent; '' for none)")
    p.add_argument("--width", type=int, default=1400, help="browser window width (default 1400)")
    p.add_argument("--height", type=int, default=1100, help="browser window height (default 1100)")
    return p


def main(argv=None) -> Path:
    return run_tool("tools.demo_screenshot", run, get_args_parser().parse_args(argv))


# ----------------------------------------------------------------------------- the browser
def missing_browser() -> str | None:
    """Why no headless Chromium can be driven here (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not found (Debian: apt-get install -y chromium chromium-driver)"
    return None


def open_browser(width: int = 1400, height: int = 1000):
    """Headless Chromium with the system's chromedriver (Selenium downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)  # --no-sandbox: CI containers run as root, where the sandbox cannot start
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)


def _canvas(driver, timeout: float):
    """The drawing surface: the largest visible <canvas> inside the Sketchpad."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def largest(d):
        shown = [c for c in d.find_elements(By.CSS_SELECTOR, "#canvas canvas") if c.is_displayed()]
        shown = [c for c in shown if c.size["width"] > 100 and c.size["height"] > 100]
        return max(shown, key=lambda c: c.size["width"] * c.size["height"]) if shown else False

    return WebDriverWait(driver, timeout).until(largest)


def draw(driver, canvas, strokes, steps: int = 4) -> None:
    """Draw ``strokes`` (polylines in canvas units, -1..1) with the mouse: press, move in ``steps`` steps per
    segment, release. Each move repaints the canvas (software WebGL when headless: ~0.4 s a move on 2 cores)."""
    from selenium.webdriver.common.action_chains import ActionChains

    half_w, half_h = canvas.size["width"] * 0.45, canvas.size["height"] * 0.45
    for stroke in strokes:
        points = [(round(x * half_w), round(y * half_h)) for x, y in stroke]
        chain = ActionChains(driver, duration=10).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
        at = points[0]
        for target in points[1:]:
            for s in range(1, steps + 1):  # the canvas draws straight between pointer events: a few suffice
                x = at[0] + (target[0] - at[0]) * s // steps
                y = at[1] + (target[1] - at[1]) * s // steps
                chain.move_to_element_with_offset(canvas, x, y)
            at = target
        chain.release().perform()
        time.sleep(0.3)  # two strokes in quick succession read as a double click, which draws nothing


def choose_class(driver, name: str) -> None:
    """Pick ``name`` in the "what did you draw?" dropdown: open it, click the option."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#drawn input").click()
    time.sleep(0.3)
    options = [li for li in driver.find_elements(By.CSS_SELECTOR, "ul li") if li.text.strip() == name]
    if not options:
        raise ToolError(f"the page offers no class {name!r} to choose")
    options[0].click()
    time.sleep(0.3)


def draw_and_search(driver, url: str, strokes, *, steps: int = 4, drawn_class: str | None = None,
                    timeout: float = 60) -> int:
    """Open the page, draw, optionally say what was drawn, press Search and wait for the result thumbnails;
    returns how many are shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    canvas = _canvas(driver, timeout)
    time.sleep(0.5)  # the canvas library attaches its pointer handlers after the element appears
    driver.find_element(By.CSS_SELECTOR, '#canvas button[aria-label="Brush"]').click()  # no tool is active at first
    time.sleep(0.5)
    draw(driver, canvas, strokes, steps)
    time.sleep(0.5)  # the drawing is sent when Search is pressed: let the last stroke land
    if drawn_class:
        choose_class(driver, drawn_class)
    driver.find_element(By.CSS_SELECTOR, "#search").click()
    images = WebDriverWait(driver, timeout).until(
        lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "#results img") if i.is_displayed()
                   and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)]
        or False)
    return len(images)


# ----------------------------------------------------------------------------- the tool
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_setup(folder: Path) -> tuple[Path, Path]:
    """An untrained tiny checkpoint and a gallery of drawn photos (three unseen classes) under ``folder``."""
    import torch

    from datasets.synthetic import draw_photo
    from models import build_model
    from utils.checkpoint import CHECKPOINT_FORMAT, model_state_dict, save_checkpoint
    from utils.config import make_config

    config = make_config("tiny")
    torch.manual_seed(0)
    model = build_model(config, with_sampler=False)
    ckpt = save_checkpoint({"model": model_state_dict(model), "config": config.to_dict(), "arch": "tiny",
                            "format": CHECKPOINT_FORMAT}, folder / "tiny.pth")
    for cls in ("tent", "kite", "candle"):
        (folder / "gallery" / cls).mkdir(parents=True)
        for i in range(4):
            draw_photo(cls, i, size=96).save(folder / "gallery" / cls / f"{cls}_{i}.png")
    return Path(ckpt), folder / "gallery"


def run(args) -> Path:
    from tools import demo

    reason = missing_browser()
    if reason:
        raise ToolError(f"no browser to drive: {reason}")
    with tempfile.TemporaryDirectory(prefix="puxim-shot-") as tmp:
        checkpoint = args.checkpoint or (MAKE_RUN_CHECKPOINT if MAKE_RUN_CHECKPOINT.is_file() else None)
        argv = ["--port", str(free_port()), "--topk", str(args.topk), "--no_progress"]
        if checkpoint is None:
            log.info("no %s: an untrained tiny model over drawn photos", MAKE_RUN_CHECKPOINT)
            checkpoint, gallery = tiny_setup(Path(tmp))
            argv += ["--gallery", str(gallery), "--cache_dir", str(Path(tmp) / "cache")]
        app, url, _ = demo.start(demo.get_args_parser().parse_args(["--checkpoint", str(checkpoint), *argv]),
                                 quiet=True)
        driver = open_browser(args.width, args.height)
        try:
            shown = draw_and_search(driver, url, TENT, drawn_class=args.drawn_class)
            driver.execute_script("window.scrollTo(0, 0)")  # pressing Search scrolled the page
            time.sleep(0.5)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
            app.close()
    log.info("%d results shown; wrote %s", shown, out)
    return out


if __name__ == "__main__":
    main()
