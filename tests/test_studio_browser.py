"""The studio in a real headless Chromium: generate, see the piano roll, hear it, download the MIDI.

Skipped, with the reason, where Chromium, chromedriver or selenium is missing (tools/install-browser.sh
installs the first two on Debian), or with MUSEFORMER_BROWSER_TEST=0.
"""

import time

import pytest
import symusic
import torch

pytest.importorskip("starlette", reason="the studio extra (starlette) is not installed")
pytest.importorskip("uvicorn", reason="the studio extra (uvicorn) is not installed")

from studio_browser import chromium, find_browser, generate_on_page, running_studio, wait_for  # noqa: E402

from museformer.checkpoint import save_checkpoint  # noqa: E402
from museformer.model import Museformer, MuseformerConfig  # noqa: E402
from museformer.studio.jobs import Studio  # noqa: E402
from museformer.studio.settings import available_models  # noqa: E402
from museformer.tokenizer import Tokenizer  # noqa: E402

BROWSER, DRIVER, WHY_NOT = find_browser()
pytestmark = pytest.mark.usefixtures("one_thread")
needs_browser = pytest.mark.skipif(BROWSER is None, reason=f"browser test skipped: {WHY_NOT}")

# coloured pixels on the roll canvas (the background is near-white, bar lines are light grey)
COLOURED_PIXELS = """
const c = arguments[0], g = c.getContext('2d');
const d = g.getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) {
  const max = Math.max(d[i], d[i + 1], d[i + 2]), min = Math.min(d[i], d[i + 1], d[i + 2]);
  if (max - min > 60) n++;
}
return n;
"""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("browser-ckpt") / "tiny"
    save_checkpoint(directory, Museformer(MuseformerConfig.preset("tiny")).eval(), Tokenizer.preset("lmd6"))
    return directory


@needs_browser
def test_generate_see_hear_and_download_in_chromium(tiny_checkpoint, tmp_path, no_fluidsynth):
    """In Chromium: a 4-bar song is drawn, its audio has the song's duration, its MIDI downloads and parses."""
    from selenium.webdriver.common.by import By

    studio = Studio(available_models([tiny_checkpoint]), tmp_path / "songs")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with running_studio(studio) as url, chromium(BROWSER, DRIVER, downloads) as web:
        generate_on_page(web, url, bars=4, tempo=120, seed=3)
        card = wait_for(lambda: web.find_elements(By.CSS_SELECTOR, "article.song"), 90, "a song card")[0]
        name = card.get_attribute("id").removeprefix("song-")
        assert web.find_element(By.ID, "progress-text").get_attribute("data-state") == "done"
        assert "4/4 bars" in web.find_element(By.ID, "progress-text").text

        # the piano roll: every note of the song drawn, in colour
        notes = studio.notes(name)
        canvas = card.find_element(By.CSS_SELECTOR, "canvas.roll")
        total = sum(len(t["notes"]) for t in notes["tracks"])
        assert canvas.get_attribute("data-drawn-notes") == str(total) and canvas.get_attribute("data-bars") == "4"
        assert web.execute_script(COLOURED_PIXELS, canvas) > 200

        # playback: no FluidSynth here, so the page's synthesizer made the audio (song + 1 s release)
        audio = card.find_element(By.CSS_SELECTOR, "audio")
        duration = float(wait_for(lambda: audio.get_attribute("data-duration"), 60, "the audio's duration"))
        assert duration == pytest.approx(notes["duration"] + 1.0, abs=0.05)
        assert "in-browser synthesizer" in card.find_element(By.CSS_SELECTOR, ".audio-source").text

        # the MIDI download is the song's file
        card.find_element(By.CSS_SELECTOR, "a.dl-mid").click()
        path = wait_for(lambda: next((p for p in downloads.glob("*.mid")), None), 30, "the MIDI download")
        time.sleep(0.2)
        assert path.read_bytes() == (studio.out_dir / f"{name}.mid").read_bytes()
        assert symusic.Score(str(path)).note_num() == symusic.Score(str(studio.out_dir / f"{name}.mid")).note_num()

        # a bad setting: one clear message on the page, and the server still answers
        generate_on_page(web, url, bars=0)
        message = web.find_element(By.ID, "message")
        wait_for(lambda: message.text, 10, "the error message")
        assert message.get_attribute("class") == "error" and message.text.startswith("bars: must be between 1 and")
        severe = [e for e in web.get_log("browser") if e["level"] == "SEVERE"]
        assert [e for e in severe if "/api/generate" not in e["message"]] == [], severe  # the 400 itself is logged


def test_a_missing_browser_is_a_skip_with_its_reason(monkeypatch):
    """Without chromium and chromedriver on PATH (or with MUSEFORMER_BROWSER_TEST=0) the reason says what to install."""
    import studio_browser

    monkeypatch.delenv("MUSEFORMER_CHROMIUM", raising=False)
    monkeypatch.delenv("MUSEFORMER_CHROMEDRIVER", raising=False)
    monkeypatch.setattr(studio_browser.shutil, "which", lambda name: None)
    monkeypatch.setattr(studio_browser, "DRIVERS", ("chromedriver",))
    assert find_browser()[0] is None and "chromium and chromedriver not found" in find_browser()[2]
    monkeypatch.setenv("MUSEFORMER_BROWSER_TEST", "0")
    assert find_browser() == (None, None, "MUSEFORMER_BROWSER_TEST=0")
