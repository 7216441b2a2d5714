"""End-to-end: a signer and a reviewer take a sample from login to a signed report in Chromium.

The real ``marrowscope serve`` runs in a subprocess on a SQLite data folder, with a tiny model
bundle built in the session (``hac_bundle``: it calls every cell HAC at ~100%, so the expected
counts are known exactly and the hairy-cell flag fires). Users come from the real
``marrowscope users create`` command. Playwright drives Debian's Chromium through the HTML
pages only (no API shortcuts for the workflow itself):

log in -> create a sample (id, date, structured fields, note) -> upload 20 of the bundled Matek
cell images plus one file that is not an image (refused by name) -> wait while the page shows the
classification progress -> open a cell (Grad-CAM + top 3) and re-classify it with a keyboard
shortcut, another with a click -> sign-off refused with "18 of 20 cells ... not reviewed" ->
the reviewer confirms the rest with the group's "Confirm all" (and cannot sign) -> the signer
signs off -> the report page and the downloaded CSV carry the counts, signer, reviewers and
model -> the audit trail lists each re-classification with its old and new value.

A second flow uploads a sample as whole fields of view (the shipped ``wbc2`` detector on real
fields from ``tests/data/fields``): field link from the gallery -> field page with the boxes ->
reject a detection as "not a white cell" -> click on a missed cell and add it -> it is classified,
the rejected one is not counted -> sign-off -> both changes in the audit trail.

Under ``MARROWSCOPE_REQUIRE_BROWSER=1`` (CI) a missing Chromium fails this test, never skips it.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from marrowscope.data.sample import SAMPLE_ROOT

from .conftest import PASSWORD

pytestmark = [pytest.mark.integration, pytest.mark.browser]

SIGNER, REVIEWER = "hema", "tech"
CODE = "E2E-0001"
N_CELLS = 20
CLASSIFY_TIMEOUT_MS = 600_000  # the background classifier on two busy cores
KEYS = {"BLA": "1", "HAC": "2", "LYT": "3"}  # SHORTCUT_KEYS in model class order


def _create_user(data_dir: Path, name: str, role: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "marrowscope", "users", "create", name, "--role", role,
         "--password-stdin", "--data-dir", str(data_dir)],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"created {role} {name}" in r.stdout


def _cell_images() -> list[Path]:
    """20 of the bundled real cells, spread over all 8 classes (every 10th file)."""
    images = sorted(SAMPLE_ROOT.glob("*/*.jpg"))[::10][:N_CELLS]
    assert len(images) == N_CELLS and len({p.parent.name for p in images}) == 8
    return images


def _login(page, base_url: str, name: str) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page.goto(base_url + "/")
    expect(page).to_have_url(re.compile(r"/login"))  # every page needs a login
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("form[action='/login'] button[type=submit]")
    expect(page.locator("header .who")).to_contain_text(name)


def _group(page, key: str):  # type: ignore[no-untyped-def]
    return page.locator(f".group[data-group='{key}']")


def test_login_to_signed_report_in_the_browser(  # type: ignore[no-untyped-def]
    page, browser, app_server, hac_bundle: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    age_band, referral = "60-79", "suspected hairy-cell leukaemia"
    data = tmp_path / "data"
    _create_user(data, SIGNER, "signer")
    _create_user(data, REVIEWER, "reviewer")
    server = app_server(hac_bundle, data_dir=data, startup_timeout=600)  # busy CI machines
    base = server.base_url

    # --- the signer logs in and creates a sample ---------------------------------------------
    _login(page, base, SIGNER)
    expect(page.locator("h1")).to_have_text("Samples")
    form = page.locator("#new-sample")
    form.locator("input[name=code]").fill(CODE)
    form.locator("input[name=collected_on]").fill("2025-03-14")
    form.locator("select[name=age_band]").select_option(age_band)
    form.locator("select[name=referral_question]").select_option(referral)
    form.locator("textarea[name=notes]").fill("Pancytopenia, splenomegaly. E2E test sample.")
    form.locator("button[type=submit]").click()
    expect(page).to_have_url(re.compile(r"/samples/\d+$"))
    sample_url = page.url
    sample_id = int(sample_url.rsplit("/", 1)[1])
    expect(page.locator("h1")).to_contain_text(CODE)
    expect(page.locator("main .muted").first).to_contain_text("2025-03-14")
    expect(page.locator("main .muted").first).to_contain_text(age_band)
    expect(page.locator("main .muted").first).to_contain_text(referral)
    expect(page.locator(".notes")).to_have_text("Pancytopenia, splenomegaly. E2E test sample.")

    # --- upload the bundled cells (one non-image is refused by name, the rest go through) ------
    bogus = tmp_path / "not_a_cell.jpg"
    bogus.write_text("this is not an image", encoding="utf-8")
    images = _cell_images()
    page.set_input_files("#upload-form input[type=file]", [*images, bogus])
    page.click("#upload-form button[type=submit]")
    result = page.locator("#upload-result")
    expect(result).to_contain_text(f"{N_CELLS} image(s) added, 1 refused", timeout=120_000)
    expect(result.locator("li")).to_have_count(1)
    expect(result.locator("li")).to_contain_text("not_a_cell.jpg")

    # --- classification runs in the background; the page polls and reloads when it is done ----
    # (on a fast machine it can finish before the first render: the bar is then never shown)
    expect(_group(page, "HAC").locator(".cell")).to_have_count(N_CELLS, timeout=CLASSIFY_TIMEOUT_MS)
    expect(page.locator("#progress")).to_be_hidden()
    expect(_group(page, "pending")).to_be_hidden()
    expect(_group(page, "unidentified")).to_be_hidden()
    expect(_group(page, "HAC").locator("h3 .count")).to_have_text(f"({N_CELLS})")
    expect(_group(page, "HAC").locator(".cell .cap").first).to_contain_text(
        re.compile(r"HAC (99|100)%")
    )
    expect(page.locator("#diff tr[data-class=HAC] .mc")).to_have_text(str(N_CELLS))
    expect(page.locator("#diff tr[data-class=HAC] .rc")).to_have_text("0")
    expect(page.locator("#flag")).to_have_class(re.compile(r"\bflagged\b"))
    expect(page.locator("#flag .evidence figure").first).to_be_visible()
    # the upload's outcome is still listed after the reload that follows classification
    expect(result).to_contain_text(f"{N_CELLS} image(s) added, 1 refused")
    expect(result.locator("li")).to_contain_text("not_a_cell.jpg")

    # --- open a cell: large image, Grad-CAM and top 3 ------------------------------------------
    first = _group(page, "HAC").locator(".cell").first
    first_id = int(first.get_attribute("data-id"))
    first_name = first.get_attribute("title")
    first.locator("img").click()
    panel = page.locator(f"#panel .panel-inner[data-cell='{first_id}']")
    expect(panel).to_be_visible()
    expect(panel.locator("h3")).to_have_text(first_name)
    expect(panel.locator("table.top3 tbody tr")).to_have_count(3)
    expect(panel.locator("table.top3 tbody tr").first).to_contain_text("HAC")
    gradcam = panel.locator("img[src$='/gradcam.png']")
    expect(gradcam).to_be_visible()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=gradcam.element_handle(), timeout=120_000
    )

    # --- re-classify it with the keyboard shortcut for BLA ---------------------------------------
    page.keyboard.press(KEYS["BLA"])
    moved = _group(page, "BLA").locator(f".cell[data-id='{first_id}']")
    expect(moved).to_be_visible()
    expect(moved).to_have_class(re.compile(r"\breviewed\b"))
    expect(moved.locator(".rev")).to_have_text("→ BLA")
    expect(page.locator("#diff tr[data-class=BLA] .rc")).to_have_text("1")
    expect(page.locator("#tot-reviewed")).to_have_text("1")

    # --- the panel moved on to the next unreviewed cell: re-classify that one with a click -------
    panel = page.locator("#panel .panel-inner")
    expect(panel).not_to_have_attribute("data-cell", str(first_id))
    second_id = int(panel.get_attribute("data-cell"))
    panel.locator("button.cls[data-label=LYT]").click()
    expect(_group(page, "LYT").locator(f".cell[data-id='{second_id}']")).to_be_visible()
    expect(page.locator("#diff tr[data-class=LYT] .rc")).to_have_text("1")
    expect(page.locator("#tot-reviewed")).to_have_text("2")
    expect(page.locator("#blocking")).to_contain_text(f"{N_CELLS - 2} of {N_CELLS}")

    # --- sign-off is refused while cells are unreviewed, with how many --------------------------
    page.click("#signoff-button")
    error = page.locator(".msg.error")
    expect(error).to_contain_text(
        f"cannot sign off {CODE}: {N_CELLS - 2} of {N_CELLS} cells are not reviewed yet"
    )
    expect(page.locator("h1 .badge")).to_have_count(0)  # not signed
    # the two re-classifications were saved (the page was reloaded by the form post)
    expect(_group(page, "BLA").locator(".cell.reviewed")).to_have_count(1)
    expect(_group(page, "LYT").locator(".cell.reviewed")).to_have_count(1)

    # --- the reviewer confirms everything else in one go, and cannot sign -----------------------
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        rpage = context.new_page()
        rpage.set_default_timeout(30_000)
        _login(rpage, base, REVIEWER)
        rpage.goto(sample_url)
        expect(rpage.locator("#signoff-button")).to_have_count(0)
        expect(rpage.locator("text=Only a signer (hematologist) can sign off.")).to_be_visible()
        hac = _group(rpage, "HAC")
        expect(hac.locator(".cell:not(.reviewed)")).to_have_count(N_CELLS - 2)
        hac.locator("button.confirm-group").click()
        expect(hac.locator(".cell.reviewed")).to_have_count(N_CELLS - 2)
        expect(rpage.locator("#blocking")).to_have_text(
            "Every cell is reviewed: the sample can be signed off."
        )
        expect(rpage.locator("#diff tr[data-class=HAC] .rc")).to_have_text(str(N_CELLS - 2))
        expect(rpage.locator("#tot-reviewed")).to_have_text(str(N_CELLS))
    finally:
        context.close()

    # --- the signer signs off; the sample is read-only afterwards ---------------------------------
    page.goto(sample_url)
    expect(page.locator(".cell.reviewed")).to_have_count(N_CELLS)  # persisted, as reviewed
    expect(page.locator("#blocking")).to_have_text(
        "Every cell is reviewed: the sample can be signed off."
    )
    page.click("#signoff-button")
    expect(page.locator("h1 .badge.ok")).to_have_text("signed")
    expect(page.locator("main")).to_contain_text(f"Signed off by {SIGNER}")
    expect(page.locator("#upload-form")).to_have_count(0)
    expect(page.locator("#signoff-button")).to_have_count(0)
    expect(page.locator(".cell input[type=checkbox]")).to_have_count(0)
    csrf = page.locator("body").get_attribute("data-csrf")
    refused = page.request.post(
        f"{base}/api/samples/{sample_id}/cells/reclassify",
        data=json.dumps({"cell_ids": [first_id], "label": "HAC"}),
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert refused.status == 409, refused.text()

    # --- the report page -----------------------------------------------------------------------
    model = page.request.get(f"{base}/api/model").json()
    assert model["name"] == "paper_cnn"
    page.click("a.button:text-is('Report')")
    expect(page.locator("h1")).to_have_text("Bone-marrow differential count")
    report = page.locator("main")
    expect(report).to_contain_text(f"signed off by {SIGNER}")
    expect(report).to_contain_text(f"{N_CELLS} reviewed (2 re-classified from the model's call)")
    expect(report).to_contain_text("Hairy-cell flag: flagged")
    expect(report).to_contain_text(f"{model['name']} ({model['arch']}), version {model['version']}")
    expect(
        report.locator("dd").filter(has_text=re.compile(rf"^{SIGNER}, {REVIEWER}$"))
    ).to_have_count(1)
    expected = {"BLA": ("1", "5.0%"), "HAC": (str(N_CELLS - 2), "90.0%"), "LYT": ("1", "5.0%")}
    rows = report.locator("table tbody tr")
    expect(rows).to_have_count(3)
    for i, (cls, (count, pct)) in enumerate(expected.items()):
        cells = rows.nth(i).locator("td")
        expect(cells.nth(0)).to_have_text(cls)
        expect(cells.nth(2)).to_have_text(count)
        expect(cells.nth(3)).to_have_text(pct)
    expect(report.locator("tfoot")).to_contain_text(str(N_CELLS))
    expect(report.locator(".chart svg")).to_contain_text("% of reviewed cells")

    # --- download the CSV report -------------------------------------------------------------
    with page.expect_download() as info:
        page.click("a:text-is('CSV')")
    download = info.value
    assert download.suggested_filename == f"{CODE}-report.csv"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    table = list(csv.DictReader(io.StringIO(saved.read_text(encoding="utf-8"))))
    assert {r["class"]: (r["count"], r["percent"]) for r in table} == {
        "BLA": ("1", "5.00"),
        "HAC": (str(N_CELLS - 2), "90.00"),
        "LYT": ("1", "5.00"),
    }
    for r in table:
        assert r["sample_id"] == CODE
        assert r["collected_on"] == "2025-03-14"
        assert r["age_band"] == age_band and r["referral_question"] == referral
        assert r["signed_by"] == SIGNER
        assert r["reviewers"] == f"{SIGNER};{REVIEWER}"  # sorted
        assert r["model"] == model["name"] and r["model_version"] == model["version"]
        assert r["hac_flag"] == "flagged"
        assert r["model_count"] == ("20" if r["class"] == "HAC" else "0")

    # --- the audit trail: each re-classification with its old and new value ------------------
    page.goto(sample_url)
    page.click("a:text-is('Audit trail')")
    expect(page.locator("h1")).to_contain_text(f"Audit trail · {CODE}")
    audit = page.locator("table.audit tbody tr")
    expect(audit.first).to_be_visible()

    def rows_for(action: str, cell_id: int | None = None) -> list[list[str]]:
        out = []
        for row in audit.all():
            tds = [t.strip() for t in row.locator("td").all_inner_texts()]
            if tds[3] == action and (cell_id is None or tds[4] == str(cell_id)):
                out.append(tds)
        return out

    (kbd,) = rows_for("cell.reclassify", first_id)
    assert kbd[2] == SIGNER
    assert json.loads(kbd[5]) == {"label": None, "model": "HAC"}
    assert json.loads(kbd[6]) == {"label": "BLA"}
    (click,) = rows_for("cell.reclassify", second_id)
    assert json.loads(click[5]) == {"label": None, "model": "HAC"}
    assert json.loads(click[6]) == {"label": "LYT"}
    confirmed = rows_for("cell.reclassify")
    assert len(confirmed) == N_CELLS
    assert sum(1 for r in confirmed if r[2] == REVIEWER) == N_CELLS - 2
    (signoff,) = rows_for("sample.signoff")
    assert signoff[2] == SIGNER and json.loads(signoff[6])["cells"] == N_CELLS
    assert rows_for("cells.upload")


def test_fields_upload_reject_and_add_a_cell_in_the_browser(  # type: ignore[no-untyped-def]
    page, app_server, hac_bundle: Path, tmp_path: Path
) -> None:
    """A sample uploaded as whole fields: the detector's cells are pre-classified, the gallery
    links each to its field (boxes drawn), a detection is rejected as "not a white cell" (it
    leaves the count), a missed cell is added by clicking on a field (classified, it enters
    review), and the sample is signed off as usual; the audit trail has both changes."""
    from field_samples import BCCD, EMPTY, PBC
    from playwright.sync_api import expect

    data = tmp_path / "data"
    _create_user(data, SIGNER, "signer")
    server = app_server(hac_bundle, data_dir=data, startup_timeout=600)
    base = server.base_url
    _login(page, base, SIGNER)
    form = page.locator("#new-sample")
    form.locator("input[name=code]").fill("E2E-FIELDS")
    form.locator("button[type=submit]").click()
    expect(page).to_have_url(re.compile(r"/samples/\d+$"))
    sample_url = page.url

    # --- upload three fields (two with one white cell each, one with none) ----------------------
    page.set_input_files("#upload-form input[type=file]", [BCCD, PBC, EMPTY])
    page.check("#upload-form input[name=kind][value=fields]")
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#upload-result")).to_contain_text("3 field(s) added", timeout=120_000)
    expect(_group(page, "HAC").locator(".cell")).to_have_count(2, timeout=CLASSIFY_TIMEOUT_MS)
    fields = page.locator("#fields tbody tr")
    expect(fields).to_have_count(3)
    empty_row = fields.filter(has_text=EMPTY.name)
    expect(empty_row).to_contain_text("no white cell was found in this field")
    expect(page.locator("#diff tr[data-class=HAC] .mc")).to_have_text("2")

    # --- a gallery cell links to its field, where its box is drawn ------------------------------
    tile = _group(page, "HAC").locator(".cell").first
    cell_id = tile.get_attribute("data-id")
    tile.locator("a.field-link").click()
    expect(page).to_have_url(re.compile(rf"/fields/\d+#cell-{cell_id}$"))
    expect(page.locator("#field-svg rect.box.detected")).to_have_count(1)
    expect(page.locator(f"#box-{cell_id}")).to_have_class(re.compile(r"\bfocused\b"))

    # --- reject it as not a white cell ---------------------------------------------------------
    page.locator(f"#cell-{cell_id} button.reject").click()
    expect(page.locator(".msg").first).to_contain_text(f"cell {cell_id} rejected")
    expect(page.locator(f"#box-{cell_id}")).to_have_class(re.compile(r"\brejected\b"))
    expect(page.locator(f"#cell-{cell_id} .label")).to_contain_text("not a white cell")

    # --- add a missed cell by clicking on the empty field ---------------------------------------
    page.goto(sample_url)
    page.locator("#fields tbody tr").filter(has_text=EMPTY.name).locator("a").first.click()
    expect(page.locator("#field-message")).to_contain_text("no white cell was found")
    svg = page.locator("#field-svg")
    expect(svg.locator("rect.box")).to_have_count(0)
    bbox = svg.bounding_box()
    assert bbox is not None
    page.mouse.click(bbox["x"] + bbox["width"] / 2, bbox["y"] + bbox["height"] / 2)
    expect(page.locator("#click-marker")).not_to_have_class(re.compile(r"\bhidden\b"))
    x = float(page.locator("#add-cell-form input[name=x]").input_value())
    y = float(page.locator("#add-cell-form input[name=y]").input_value())
    assert abs(x - 352 / 2) <= 3 and abs(y - 480 / 2) <= 3  # field pixels, not screen pixels
    page.click("#add-cell-button")
    expect(page.locator(".msg").first).to_contain_text(re.compile(r"cell \d+ added"))
    expect(svg.locator("rect.box.added")).to_have_count(1)

    # --- back in the gallery: the added cell is classified; the rejected one is not counted -----
    page.goto(sample_url)
    expect(_group(page, "HAC").locator(".cell")).to_have_count(2, timeout=CLASSIFY_TIMEOUT_MS)
    expect(_group(page, "rejected").locator(f".cell[data-id='{cell_id}']")).to_be_visible()
    expect(page.locator("#diff tr[data-class=HAC] .mc")).to_have_text("2")
    expect(page.locator("#tot-model")).to_have_text("2")

    # --- sign-off rules unchanged: confirm the two counted cells, then sign ----------------------
    _group(page, "HAC").locator("button.confirm-group").click()
    expect(_group(page, "HAC").locator(".cell.reviewed")).to_have_count(2)
    expect(page.locator("#blocking")).to_have_text(
        "Every cell is reviewed: the sample can be signed off."
    )
    page.click("#signoff-button")
    expect(page.locator("h1 .badge.ok")).to_have_text("signed")

    # --- the audit trail has the rejection and the added cell ------------------------------------
    page.click("a:text-is('Audit trail')")
    audit = page.locator("table.audit tbody")
    expect(audit).to_contain_text("cell.reject")
    expect(audit).to_contain_text("cell.add")
    expect(audit).to_contain_text("field.detected")


def test_keys_leave_buttons_alone_and_skip_rejected_cells_in_the_browser(  # type: ignore[no-untyped-def]
    page, app_server, hac_bundle: Path, tmp_path: Path
) -> None:
    """Enter on the panel's focused *Not a countable cell* button presses it (it used to confirm
    the open cell instead); a rejected crop cannot be selected (Space, Ctrl-click); confirming
    with Enter moves on to the next unreviewed cell past the rejected one; and Enter after a
    click on *Select all* still confirms the selection (the button hands the focus back), as a
    class key does after boxes ticked with the mouse."""
    from playwright.sync_api import expect

    data = tmp_path / "data"
    _create_user(data, SIGNER, "signer")
    server = app_server(hac_bundle, data_dir=data, startup_timeout=600)
    _login(page, server.base_url, SIGNER)
    form = page.locator("#new-sample")
    form.locator("input[name=code]").fill("E2E-KEYS")
    form.locator("button[type=submit]").click()
    expect(page).to_have_url(re.compile(r"/samples/\d+$"))
    page.set_input_files("#upload-form input[type=file]", _cell_images()[:4])
    page.click("#upload-form button[type=submit]")
    hac = _group(page, "HAC")
    expect(hac.locator(".cell")).to_have_count(4, timeout=CLASSIFY_TIMEOUT_MS)

    # --- Enter on the focused reject button rejects the open crop (and confirms nothing) -------
    bad = hac.locator(".cell").first
    bad_id = bad.get_attribute("data-id")
    bad.locator("img").click()
    reject = page.locator(f"#panel .panel-inner[data-cell='{bad_id}'] button.reject")
    expect(reject).to_have_text("Not a countable cell")
    reject.focus()
    page.keyboard.press("Enter")
    expect(page.locator(".msg").first).to_contain_text(f"cell {bad_id} rejected")
    rejected = _group(page, "rejected").locator(f".cell[data-id='{bad_id}']")
    expect(rejected).to_be_visible()
    expect(page.locator(".cell.reviewed")).to_have_count(0)

    # --- a rejected crop is not selected, by Space or by Ctrl-click ----------------------------
    rejected.locator("img").click()
    expect(
        page.locator(f"#panel .panel-inner[data-cell='{bad_id}'] button.restore")
    ).to_be_visible()
    page.keyboard.press(" ")
    rejected.click(modifiers=["Control"])
    expect(page.locator(".msg.error").first).to_contain_text(f"cell {bad_id} is rejected")
    expect(page.locator(".cell.selected")).to_have_count(0)

    # --- Enter confirms the last HAC cell and opens the first, not the rejected one after it ---
    counted = [hac.locator(".cell").nth(i).get_attribute("data-id") for i in range(3)]
    hac.locator(f".cell[data-id='{counted[-1]}'] img").click()
    expect(page.locator(f"#panel .panel-inner[data-cell='{counted[-1]}']")).to_be_visible()
    page.keyboard.press("Enter")
    expect(hac.locator(f".cell[data-id='{counted[-1]}']")).to_have_class(
        re.compile(r"\breviewed\b")
    )
    expect(page.locator("#panel .panel-inner")).to_have_attribute("data-cell", counted[0])

    # --- Select all (a click), then Enter confirms the selection -------------------------------
    hac.locator("button.select-group").click()
    expect(hac.locator(".cell.selected")).to_have_count(3)
    page.keyboard.press("Enter")
    expect(hac.locator(".cell.reviewed")).to_have_count(3)
    expect(page.locator(".cell.selected")).to_have_count(0)
    expect(page.locator("#blocking")).to_have_text(
        "Every cell is reviewed: the sample can be signed off."
    )
    expect(page.locator("#tot-reviewed")).to_have_text("3")

    # --- boxes ticked with the mouse, then a class key re-classifies them -----------------------
    keys = json.loads(page.locator("body").get_attribute("data-keys") or "{}")
    lyt_key = next(k for k, c in keys.items() if c == "LYT")
    for cell_id in counted[:2]:
        hac.locator(f".cell[data-id='{cell_id}'] input[type=checkbox]").click()
    expect(page.locator(".cell.selected")).to_have_count(2)
    page.keyboard.press(lyt_key)
    lyt = _group(page, "LYT")
    for cell_id in counted[:2]:
        expect(lyt.locator(f".cell[data-id='{cell_id}']")).to_have_class(
            re.compile(r"\breviewed\b")
        )
    expect(page.locator(".cell.selected")).to_have_count(0)
