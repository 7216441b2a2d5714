#!/usr/bin/env python
"""Take the README's screenshots of the review app, driving it in Chromium like a user would.

Starts ``marrowscope serve`` on the demo's EfficientNet-Lite0 bundle with a fresh data folder,
creates a signer with ``marrowscope users create``, then in headless Debian Chromium (Playwright,
the same launcher as the tests: ``tests/harness/browser.py``): logs in, creates a sample, uploads
the `make demo-train` run's held-out test cells (``runs/demo-train/split.csv``, split ``test``: 5 per class, never seen
in training; renamed ``cell_001.jpg`` ... so the file names do not give the class away), waits
for the classifier, reviews every cell (the "reviewer" gives each cell its Matek et al. label, by
keyboard shortcut where the model was wrong or unsure, "Confirm all" elsewhere), signs off and
opens the report. Writes:

    docs/images/review_gallery.png   the gallery by class with confidences + differential count
    docs/images/review_cell.png      one cell opened large: its activation map and top-3 probabilities
    docs/images/review_report.png    the signed report

Usage (after ``make demo-train``, whose run gives the default checkpoint; ~2 min on 2 cores):
    .venv/bin/python scripts/review_screenshots.py
    .venv/bin/python scripts/review_screenshots.py --checkpoint RUN/best --out docs/images

Needs Debian's ``chromium`` (or ``MARROWSCOPE_CHROMIUM``) and the dev extras (playwright).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: server and browser launchers

from harness.appserver import start_app_server  # noqa: E402
from harness.browser import launch  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "runs/demo-train/runs/tf_efficientnet_lite0/best"
DEFAULT_SPLIT = ROOT / "runs/demo-train/split.csv"
USER, PASSWORD = "dr.lee", "screenshots only, not a real account"
CODE = "BM-2025-0042"
VIEWPORT = {"width": 1400, "height": 900}
CLASSIFY_TIMEOUT_MS = 900_000


def held_out_cells(split_csv: Path, work: Path) -> dict[Path, str]:
    """The test-split cells copied as ``cell_NNN.jpg`` (shuffled by a fixed rule) -> true class."""
    from marrowscope.data.sample import SAMPLE_ROOT

    rows: list[tuple[Path, str]] = []
    if split_csv.is_file():
        with split_csv.open(newline="", encoding="utf-8") as f:
            rows = [
                (Path(r["path"]), r["label"]) for r in csv.DictReader(f) if r["split"] == "test"
            ]
    if not rows:  # no demo split: 5 bundled cells per class
        print(f"note: {split_csv} has no test split; using 5 bundled cells per class")
        for folder in sorted(p for p in SAMPLE_ROOT.iterdir() if p.is_dir()):
            rows += [(p, folder.name) for p in sorted(folder.glob("*.jpg"))[:5]]
    rows.sort(key=lambda r: r[0].name[::-1])  # interleave the classes, deterministically
    out = work / "upload"
    out.mkdir()
    truth = {}
    for i, (src, label) in enumerate(rows, 1):
        dst = out / f"cell_{i:03d}{src.suffix.lower()}"
        shutil.copyfile(src, dst)
        truth[dst] = label
    return truth


def create_user(data_dir: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "marrowscope", "users", "create", USER, "--role", "signer",
         "--password-stdin", "--data-dir", str(data_dir)],
        input=PASSWORD + "\n", text=True, check=True, capture_output=True,
    )  # fmt: skip


def take(checkpoint: Path, split_csv: Path, out: Path, work: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    truth = held_out_cells(split_csv, work)
    data = work / "data"
    create_user(data)
    server = start_app_server(
        checkpoint, data_dir=data, log_path=work / "serve.log", startup_timeout=1800
    )
    base = server.base_url
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            page = browser.new_context(viewport=VIEWPORT, device_scale_factor=1).new_page()
            page.set_default_timeout(120_000)

            page.goto(base + "/login")
            page.fill("input[name=username]", USER)
            page.fill("input[name=password]", PASSWORD)
            page.click("form[action='/login'] button[type=submit]")
            form = page.locator("#new-sample")
            form.locator("input[name=code]").fill(CODE)
            form.locator("input[name=collected_on]").fill("2025-03-14")
            form.locator("select[name=age_band]").select_option("60-79")
            form.locator("select[name=referral_question]").select_option("cytopenia")
            form.locator("textarea[name=notes]").fill(
                "Pancytopenia for 3 months; no prior chemotherapy. Iliac crest aspirate."
            )
            form.locator("button[type=submit]").click()
            page.wait_for_url(re.compile(r"/samples/\d+$"))
            sample_url = page.url
            sample_id = sample_url.rsplit("/", 1)[1]

            page.set_input_files("#upload-form input[type=file]", list(truth))
            page.click("#upload-form button[type=submit]")
            page.locator("#upload-result").wait_for()
            print(f"uploaded {len(truth)} cells; waiting for the classifier ...")
            expect(page.locator(".group[data-group=pending]")).to_be_hidden(
                timeout=CLASSIFY_TIMEOUT_MS
            )
            expect(page.locator("#progress")).to_be_hidden()

            cells = page.request.get(f"{base}/api/samples/{sample_id}/cells?limit=1000").json()
            by_name = {c["name"]: c for c in cells}
            label_of = {by_name[p.name]["id"]: label for p, label in truth.items()}
            keys = json.loads(page.locator("body").get_attribute("data-keys"))
            key_of = {c: k for k, c in keys.items()}

            # A few cells reviewed already, so the count shows model vs reviewed.
            wrong = [c for c in cells if c["predicted"] != label_of[c["id"]]]
            for c in wrong[:4]:
                page.locator(f".cell[data-id='{c['id']}'] img").click()
                page.locator(f"#panel .panel-inner[data-cell='{c['id']}']").wait_for()
                page.keyboard.press(key_of[label_of[c["id"]]])
                page.locator(f".cell[data-id='{c['id']}'].reviewed").wait_for()
            page.reload()
            page.wait_for_load_state("networkidle")
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(out / "review_gallery.png"))
            print(f"wrote {out / 'review_gallery.png'}")

            # One cell opened large: the first confident, correct call in the gallery (a blast
            # if there is one), so the tile is on screen next to its panel.
            ok = [
                c["id"]
                for c in cells
                if c["predicted"] == label_of[c["id"]] and (c["confidence"] or 0) >= 0.8
            ]
            blasts = [i for i in ok if label_of[i] == "BLA"]
            order = [
                int(i) for i in page.locator(".cell").evaluate_all("e => e.map(t => t.dataset.id)")
            ]
            pick = {"id": min(blasts or ok or order, key=order.index)}
            page.locator(f".cell[data-id='{pick['id']}'] img").click()
            panel = page.locator(f"#panel .panel-inner[data-cell='{pick['id']}']")
            panel.wait_for()
            page.wait_for_function(
                "() => [...document.querySelectorAll('#panel img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(out / "review_cell.png"))
            print(f"wrote {out / 'review_cell.png'}")

            # Review the rest: the true label by keyboard where the model was wrong or unsure,
            # then "Confirm all" in each group for the model's correct calls.
            for c in page.request.get(f"{base}/api/samples/{sample_id}/cells?limit=1000").json():
                if c["reviewed_label"] or (c["identified"] and c["predicted"] == label_of[c["id"]]):
                    continue
                page.locator(f".cell[data-id='{c['id']}'] img").click()
                page.locator(f"#panel .panel-inner[data-cell='{c['id']}']").wait_for()
                page.keyboard.press(key_of[label_of[c["id"]]])
                page.locator(f".cell[data-id='{c['id']}'].reviewed").wait_for()
            for group in page.locator(".group:not(.empty)").all():
                todo = group.locator(".cell:not(.reviewed)")
                if todo.count():
                    group.locator("button.confirm-group").click()
                    expect(todo).to_have_count(0)
            expect(page.locator("#blocking")).to_contain_text("Every cell is reviewed")
            page.click("#signoff-button")
            page.locator("h1 .badge.ok").wait_for()

            page.goto(f"{base}/samples/{sample_id}/report")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(out / "review_report.png"), full_page=True)
            print(f"wrote {out / 'review_report.png'}")
            browser.close()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--split", type=Path, default=DEFAULT_SPLIT, help="the demo's split.csv")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = ap.parse_args(argv)
    if not (args.checkpoint / "metadata.json").is_file():
        print(f"no checkpoint bundle at {args.checkpoint}: run `make demo` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="review-shots-"))
    try:
        take(args.checkpoint, args.split, args.out, work)
    finally:
        if args.keep:
            print(f"data and server log kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
