"""Renders an HTML page in headless Chromium and returns the DOM after layout, with the computed
colours of chosen elements written into attributes (``data-computed``: the background colour,
``data-computed-image``: the background image), so that a test reads what a browser shows."""

import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_ANNOTATE = """<script>
for (const el of document.querySelectorAll(%r)) {
  const style = getComputedStyle(el);
  el.setAttribute('data-computed', style.backgroundColor);
  el.setAttribute('data-computed-image', style.backgroundImage);
}
</script>"""


def render(page: str, tmp_path, selector: str) -> str:
    """The DOM of ``page`` (an HTML document) as Chromium lays it out; the elements that match the
    CSS ``selector`` carry their computed colours. Skips where Chromium is not installed."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs it: apt-get install chromium)")
    probe = tmp_path / "probe.html"
    if "</body>" not in page:
        page = f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{page}</body></html>"
    probe.write_text(page.replace("</body>", _ANNOTATE % selector + "</body>"), encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
