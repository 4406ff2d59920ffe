"""The curation view in a real browser: headless Chromium (Debian's package, driven by selenium
through the system chromedriver; `.ci/browser` installs both) against the package's real
``airflow standalone`` that ran image_curation on generated data with one row group of
partition 1's write failing (the package's ``failed_run``, before the REST tests clear it).

Logs in through Airflow's own login form, opens the run's "Curation" tab, and checks what a user
would see: the failed row groups on the map, thumbnails that load, histograms that draw. The
screenshot of each view is the README's: written to ``docs/img/`` (``$WINNOW_SCREENSHOTS`` to put
them elsewhere) on every run, so the README shows today's UI; a failure's screenshot goes under
``$WINNOW_TEST_ARTIFACTS`` (default ``test-artifacts/``).
A user without access to the DAG gets 403.

The Corpus tab: three small runs that build one corpus (with a takedown between the second and
the third) are made in this process (``tests/report/test_corpus_view.py``, seconds), and a DAG
run of the live Airflow names the third one's run root; it is triggered while the DAG is paused,
so none of its tasks runs (the view reads storage only), and deleted afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests.airflow._live import REPO, LiveAirflow
from tests.airflow.live.conftest import OUTSIDER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ARTIFACTS = Path(os.environ.get("WINNOW_TEST_ARTIFACTS", str(REPO / "test-artifacts")))
#: The README's screenshots: regenerated from the current UI by this test.
SCREENSHOTS = Path(os.environ.get("WINNOW_SCREENSHOTS", str(REPO / "docs" / "img")))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def live_run(failed_run):
    """The package's failed run (partition 1's write fails one row group on every try)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromedriver are needed: run `bash .ci/browser` (Debian packages)")
    return failed_run


@pytest.fixture(scope="module")
def browser(live_run):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = live_run["root"] / "chromium-profile"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _password(af: LiveAirflow, user: str) -> str:
    return json.loads(af._password_file().read_text())[user]


def _wait(driver, predicate, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.3).until(lambda d: predicate(d))
    except Exception as exc:  # noqa: BLE001 - rethrown with what we waited for and a screenshot
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "browser-failure.png"))
        raise AssertionError(f"timed out waiting for {what}; screenshot in {ARTIFACTS}") from exc


def _shot(driver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    driver.save_screenshot(str(path))
    return path


def test_the_run_ended_failed_with_partition_1s_write_failed(live_run):
    states = live_run["states"]
    assert live_run["state"] == "failed", states
    assert states[("write", 1)][0] == "failed" and states[("write", 0)][0] == "success", states


def test_login_open_the_run_tab_and_see_failed_row_groups_thumbnails_and_histograms(live_run, browser):
    from selenium.webdriver.common.by import By

    af, run_id = live_run["af"], live_run["run_id"]
    browser.get(f"{af.base}/")
    _wait(browser, lambda d: d.find_elements(By.NAME, "username"), "the login form")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(_password(af, "admin"))
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser, lambda d: "login" not in d.current_url, "the login to finish")

    browser.get(f"{af.base}/dags/image_curation/runs/{quote(run_id, safe='')}/plugin/winnow-run")
    frame = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "iframe[title=Curation]"), "the Curation tab")
    browser.switch_to.frame(frame)
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-map-drawn") == "1",
          "the row-group map to draw")
    rows = {r.find_elements(By.TAG_NAME, "td")[0].text: [c.text for c in r.find_elements(By.TAG_NAME, "td")]
            for r in browser.find_elements(By.CSS_SELECTOR, "#stages tbody tr")}
    from winnow.stages.write import STAGE

    # Columns: stage, status, committed, failed, pending, records/s, progress.
    assert int(rows[STAGE][3]) > 0 and rows["embed"][3] == "0" and rows["embed"][4] == "0", rows
    assert rows["embed"][1] == "done" and rows["centroids"][1] == "done" and rows["pairwise"][1] == "done", rows
    red = browser.execute_script(
        "const c=document.getElementById('map'),x=c.getContext('2d'),d=x.getImageData(0,0,c.width,c.height).data;"
        "let n=0;for(let i=0;i<d.length;i+=4){if(d[i]===198&&d[i+1]===40&&d[i+2]===40)n++;}return n;")
    assert red > 0, "no failed (red) cells on the map"
    browser.switch_to.default_content()
    _shot(browser, "run-map.png")

    browser.switch_to.frame(frame)
    browser.find_element(By.CSS_SELECTOR, "button[data-tab=gallery]").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) > 0, "gallery thumbnails")
    _wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery img')].every(i => i.complete)"), "thumbnails to load")
    widths = browser.execute_script("return [...document.querySelectorAll('#gallery img')].map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths), widths
    reasons = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .reason")]
    # Everything but one row group of partition 1 was written.
    assert any(r == "kept" for r in reasons) and any(r != "kept" for r in reasons), reasons
    # The outcome menu is built from the engine's filter list: every outcome is there, and the
    # filters decided before decode (on in this run) show their records and words.
    from winnow.filters import OUTCOMES

    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#outcome option")]
    assert options[1:] == ["kept", *[o for o in OUTCOMES if o != "kept"]], options
    from selenium.webdriver.support.ui import Select

    for outcome, words in (("image_size", " px: "), ("caption_length", "words < min_caption_words 3")):
        Select(browser.find_element(By.ID, "outcome")).select_by_value(outcome)
        _wait(browser, lambda d, w=words: d.find_elements(By.CSS_SELECTOR, "#gallery .reason")
              and all(w in e.text for e in d.find_elements(By.CSS_SELECTOR, "#gallery .reason")), f"{outcome} cards")
        cards = browser.find_elements(By.CSS_SELECTOR, f"#gallery figure.card.{outcome}")
        assert cards and len(cards) == len(browser.find_elements(By.CSS_SELECTOR, "#gallery figure.card")), outcome
    Select(browser.find_element(By.ID, "outcome")).select_by_value("image_size")
    browser.switch_to.default_content()
    _shot(browser, "gallery.png")

    browser.switch_to.frame(frame)
    browser.find_element(By.CSS_SELECTOR, "button[data-tab=scores]").click()
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-hist-drawn") == "1",
          "the histograms to draw")
    green = browser.execute_script(
        "const c=document.getElementById('hist-aesthetic'),d=c.getContext('2d').getImageData(0,0,c.width,c.height).data;"
        "let n=0;for(let i=0;i<d.length;i+=4){if(d[i]===46&&d[i+1]===125&&d[i+2]===50)n++;}return n;")
    assert green > 0, "the aesthetic histogram drew no kept bars"
    assert "kept" in browser.find_element(By.ID, "whatif").text
    # One histogram and what-if slider per declared filter, the new ones included.
    from winnow.filters import FILTERS

    for f in FILTERS:
        assert browser.find_element(By.ID, f"hist-{f.name}") and browser.find_element(By.ID, f"t-{f.name}"), f.name
    drawn = browser.execute_script(
        "const c=document.getElementById('hist-min_image_side'),d=c.getContext('2d').getImageData(0,0,c.width,c.height).data;"
        "let n=0;for(let i=0;i<d.length;i+=4){if((d[i]===46&&d[i+1]===125&&d[i+2]===50)||(d[i]===158&&d[i+1]===158&&d[i+2]===158))n++;}"
        "return n;")
    assert drawn > 0, "the image-size histogram drew no bars"
    browser.switch_to.default_content()
    _shot(browser, "scores.png")
    browser.switch_to.frame(frame)
    before = browser.find_element(By.ID, "whatif").text
    slider = browser.find_element(By.ID, "t-min_image_side")
    browser.execute_script("arguments[0].value = arguments[0].max; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert browser.find_element(By.ID, "whatif").text != before  # the what-if follows the new slider
    browser.switch_to.default_content()

    # The task-instance tab of the failed partition highlights its row groups.
    browser.get(f"{af.base}/dags/image_curation/runs/{quote(run_id, safe='')}/tasks/write/mapped/1/plugin/winnow-partition")
    frame = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "iframe[title=Curation]"), "the task tab")
    browser.switch_to.frame(frame)
    _wait(browser, lambda d: "p1: row groups" in d.find_element(By.ID, "title").text, "the partition title")
    browser.switch_to.default_content()


@pytest.fixture(scope="module")
def corpus_run(live_run, tmp_path_factory):
    from tests.airflow._live import DAG_ID
    from tests.report.test_corpus_view import build_corpus_runs

    made = build_corpus_runs(tmp_path_factory.mktemp("corpus-view"))
    af = live_run["af"]
    run_id = "corpus-view"
    # Paused: the scheduler starts no queued run of the DAG, so this run only points at the run root.
    af.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": True})
    try:
        af.trigger({"output_root": str(made["out"]), "run_key": "20250303"}, run_id=run_id)
        yield {**made, "run_id": run_id}
    finally:
        af.api("DELETE", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", ok=(200, 204, 404))
        af.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})


def test_the_corpus_tab_lists_the_corpus_runs_and_takedowns_and_the_gallery_its_duplicates(live_run, corpus_run, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    af = live_run["af"]
    browser.get(f"{af.base}/dags/image_curation/runs/{quote(corpus_run['run_id'], safe='')}/plugin/winnow-run")
    if browser.find_elements(By.NAME, "username"):  # signed out meanwhile: sign in again
        browser.find_element(By.NAME, "username").send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys(_password(af, "admin"))
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    frame = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "iframe[title=Curation]"), "the Curation tab")
    browser.switch_to.frame(frame)
    tab = _wait(browser, lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[data-tab=corpus]") if b.is_displayed()],
                "the Corpus tab to show")[0]
    tab.click()
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-corpus-drawn") == "1",
          "the corpus view")
    rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")] for r in browser.find_elements(By.CSS_SELECTOR, "#corpus-runs tbody tr")]
    assert [r[1].split()[0] for r in rows] == ["20250301", "20250302", "20250303"], rows
    assert [r[0] for r in rows] == ["1", "2", "4"], rows
    this = browser.find_elements(By.CSS_SELECTOR, "#corpus-runs tbody tr.this")
    assert len(this) == 1 and this[0].get_attribute("data-run-key") == "20250303"
    takedowns = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
                 for r in browser.find_elements(By.CSS_SELECTOR, "#corpus-takedowns tbody tr")]
    assert len(takedowns) == 1 and takedowns[0][2] == "opt-out request" and takedowns[0][5] == "20250301", takedowns
    assert "published as generation 4" in browser.find_element(By.ID, "corpus-this").text
    # The screenshot shows both tables: the runs' at the top of the frame, the takedowns' below.
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", browser.find_element(By.ID, "corpus-runs"))
    browser.switch_to.default_content()
    _shot(browser, "corpus-view.png")

    browser.switch_to.frame(frame)
    browser.find_element(By.CSS_SELECTOR, "button[data-tab=gallery]").click()
    Select(browser.find_element(By.ID, "outcome")).select_by_value("corpus_duplicate")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure.card")
          and all("corpus_duplicate" in c.get_attribute("class") for c in d.find_elements(By.CSS_SELECTOR, "#gallery figure.card")),
          "the corpus duplicates")
    _wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery img')].every(i => i.complete)"), "their pictures to load")
    pairs = browser.execute_script("return [...document.querySelectorAll('#gallery figure.card')].map("
                                   "c => [...c.querySelectorAll('img')].map(i => i.naturalWidth))")
    # Each beside the earlier corpus record's picture, named by its run and key.
    assert pairs and all(len(p) == 2 and min(p) > 0 for p in pairs), pairs
    earlier = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .twin")]
    assert len(earlier) == len(pairs) and all(t.startswith("earlier: run 2025030") for t in earlier), earlier
    browser.switch_to.default_content()
    _shot(browser, "corpus-gallery.png")
    browser.switch_to.frame(frame)
    Select(browser.find_element(By.ID, "outcome")).select_by_value("takedown")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure.card.takedown"), "the taken-down record")
    card = browser.find_element(By.CSS_SELECTOR, "#gallery figure.card.takedown")
    assert not card.find_elements(By.TAG_NAME, "img") and "taken down" in card.text
    assert "takedown: opt-out request" in card.find_element(By.CSS_SELECTOR, ".takedown-reason").text
    browser.switch_to.default_content()


def test_extra_links_of_partition_tasks_and_report_lead_to_the_view(live_run):
    af, run_id = live_run["af"], live_run["run_id"]
    links = af.api("GET", f"/api/v2/dags/image_curation/dagRuns/{run_id}/taskInstances/write/links",
                   params={"map_index": 1}).json()
    assert links["extra_links"]["Curation view"] == \
        f"/dags/image_curation/runs/{run_id}/tasks/write/mapped/1/plugin/winnow-partition"


def test_a_user_without_dag_access_gets_403_and_no_session_401(live_run):
    af, run_id = live_run["af"], live_run["run_id"]
    r = requests.post(f"{af.base}/auth/token", json={"username": OUTSIDER, "password": _password(af, OUTSIDER)},
                      timeout=30)
    assert r.status_code in (200, 201), r.text
    token = r.json()["access_token"]
    for path in (f"/winnow/api/runs/{run_id}/progress", f"/winnow/ui/run?run_id={run_id}", "/winnow/static/winnow.js"):
        assert requests.get(f"{af.base}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 403
        assert requests.get(f"{af.base}{path}", timeout=30).status_code == 401
