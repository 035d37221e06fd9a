"""The static feature browser, loaded from disk in a real headless Chromium (Debian's `chromium`).

Chromium is installed by the environment (.ci/run installs it); without it the tests skip with the reason, and
under CI=true that skip fails the run (`ci_required`). These tests run in the default test run.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from sae import features as F
from sae.features import label as L
from sae.features.browser import render_html, write_browser
from tests.test_features import synthetic_table

pytestmark = [pytest.mark.browser, pytest.mark.ci_required]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find() -> str | None:
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium():
    path = _find()
    if path is None:
        pytest.skip("headless chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    return path


def dump_dom(chromium: str, page, tmp_path) -> str:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--dump-dom", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"chromium exited {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def _records():
    t = synthetic_table()
    recs = F.build_records(t, [2, 5], extra={2: {"found_by": ["contrast"], "cohens_d": 1.25}})
    recs[0]["label"] = "even-context tokens </script><b>not bold</b> & \u2028 friends"
    recs[0]["detection"] = {"balanced_accuracy": 0.75, "auroc": 0.8, "n_pos": 10, "n_neg": 10}
    recs[0]["top_tokens"] = {"positive": [{"token": " banana", "id": 1, "logit": 2.0}],
                             "negative": [{"token": "\n", "id": 2, "logit": -1.0}]}
    return [L.to_line(r, {"model": "synthetic", "layer": 1}) for r in recs]


def test_browser_renders_latents_in_chromium(chromium, tmp_path):
    recs = _records()
    page = write_browser(tmp_path / "features.html", recs, title="Test <browser>", meta={"model": "synthetic", "layer": 1})
    dom = dump_dom(chromium, page, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ok="1"' in body and "data-error" not in body, body
    assert 'data-latents="2"' in body
    for r in recs:
        assert f'id="latent-{r["latent"]}"' in dom
    # the label is shown as text (escaped), not markup; the page title is escaped too
    assert "&lt;/script&gt;&lt;b&gt;not bold&lt;/b&gt;" in dom and "<b>not bold</b>" not in dom
    assert "Test &lt;browser&gt;" in dom
    # token-level highlighting: activating tokens get a background, the marked token an outline class
    assert re.search(r'class="t role-\d mark"', dom) and "rgba(255, 130, 0," in dom
    n_examples = sum(len(r["examples"]) for r in recs)
    assert dom.count('class="ex"') == n_examples
    assert "Quantile bin 9" in dom and "Random non-activating" in dom and "banana" in dom


def test_browser_reports_script_errors(chromium, tmp_path):
    """A broken page sets data-error instead of data-ok (the check above is meaningful)."""
    html = render_html(_records()).replace('"records"', '"recordz"', 1)
    page = tmp_path / "broken.html"
    page.write_text(html)
    body = re.search(r"<body[^>]*>", dump_dom(chromium, page, tmp_path)).group(0)
    assert "data-error" in body and 'data-ok="1"' not in body


def test_write_browser_validates_path(tmp_path):
    with pytest.raises(ValueError, match="should end in .html"):
        write_browser(tmp_path / "features.txt", _records())
    text = render_html(_records())
    assert "</script><b>" not in text.split('id="psm-data"')[1].split("</script>")[0]
