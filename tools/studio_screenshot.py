"""Take docs/studio.png: the studio in headless Chromium after generating a song with the bundled model.

    PYTHONPATH=src python tools/studio_screenshot.py [--out docs/studio.png] [--bars 8] [--seed 1]

Needs the studio extra, selenium, chromium and chromedriver (tools/install-browser.sh). Songs go to
a temporary folder. FluidSynth is not used (the page's own synthesizer makes the audio), as on a
machine without it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from studio_browser import chromium, find_browser, generate_on_page, running_studio, wait_for  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/studio.png")
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--select", default="5-6", help="bars to show selected on the roll (FIRST-LAST)")
    args = parser.parse_args()
    browser, driver, reason = find_browser()
    if browser is None:
        print(f"studio_screenshot: {reason}", file=sys.stderr)
        return 1
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    import museformer.render
    from museformer.studio.jobs import Studio
    from museformer.studio.settings import available_models

    museformer.render.find_fluidsynth = lambda: None  # the page's synthesizer, whatever this machine has
    with tempfile.TemporaryDirectory() as folder:
        studio = Studio(available_models(), Path(folder) / "songs")
        with running_studio(studio) as url, chromium(browser, driver, Path(folder), 1280, 1010) as web:
            generate_on_page(web, url, bars=args.bars, seed=args.seed)
            card = wait_for(lambda: web.find_elements(By.CSS_SELECTOR, "article.song"), 300, "a song")[0]
            audio = card.find_element(By.CSS_SELECTOR, "audio")
            wait_for(lambda: audio.get_attribute("data-duration"), 120, "the audio")
            canvas = card.find_element(By.CSS_SELECTOR, "canvas.roll")
            first, last = (int(b) for b in args.select.split("-"))
            width = canvas.size["width"]

            def x(bar: int) -> int:  # selenium's offsets are from the canvas's centre
                return int((bar - 0.5) / args.bars * width - width / 2)

            ActionChains(web).move_to_element_with_offset(canvas, x(first), 0).click_and_hold() \
                .move_to_element_with_offset(canvas, x(last), 0).release().perform()
            web.execute_script("document.querySelector('audio').currentTime = arguments[0];", 3.0)
            time.sleep(0.5)
            web.execute_script("document.getElementById('folder').textContent = 'songs folder: studio-songs/'")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            web.save_screenshot(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
