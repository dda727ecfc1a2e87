"""The README's pictures of `dfm serve`: mid-generation (the first stage's preview shown, the final images
pending), or with ``--pick``: a sampling stopped after stage 1, some tiles picked to be finished.

    python benchmarks/serve_screenshot.py runs/quickstart --out docs/images/serve.png
    python benchmarks/serve_screenshot.py runs/quickstart --pick --out docs/images/serve_pick.png

Starts the server, opens the page in Debian's chromium (playwright), asks for 16 images with a long second stage
(so that the picture can be taken between the two), and screenshots the page once the stage-1 preview is there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from playwright.sync_api import sync_playwright

from dfm.serve import running_server


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", default="docs/images/serve.png")
    p.add_argument("--pick", action="store_true", help="stop after stage 1 and select tiles to finish")
    args = p.parse_args()
    with running_server(args.run) as url:
        browser_path = os.environ.get("DFM_CHROMIUM") or shutil.which("chromium")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#class_label option').length > 1")
            page.select_option("#class_label", "8")
            page.fill("#seeds", "0-15")
            if args.pick:
                page.select_option("#until_stage", "1")
                page.click("#generate")
                page.wait_for_selector("#refine", timeout=600_000)
                for seed in (1, 4, 6, 11):
                    page.click(f"#tiles figure[data-seed='{seed}'] img")
                page.screenshot(path=args.out, full_page=True)
                browser.close()
                print(f"screenshot written to {args.out}")
                return 0
            page.fill("#steps", "30,200")
            page.click("#generate")
            page.wait_for_selector("img.preview[data-stage='0']")
            time.sleep(0.5)
            page.screenshot(path=args.out, full_page=True)
            page.click("#cancel")
            browser.close()
    print(f"screenshot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
