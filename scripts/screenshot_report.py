"""Render `specbench report --html` for some runs and look at it in a real browser (headless Chromium).

    python scripts/screenshot_report.py RUN_DIR_OR_FOLDER... --out shots/ [--width 1300] [--height 850]

Writes into --out: report.html (what `specbench report --html` writes), first-screen.png (what a
laptop shows on opening it), full.png (the whole page as it opens) and expanded.png (every folded
section open). It measures, with every section open, how wide the page's content is against the
window, and exits 1 if the page scrolls sideways. Needs a Chromium (`apt-get install chromium`);
--browser names another binary.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from specbench.report.build import build, write_outputs

# appended to a copy of the page: open the folds (when asked) and leave the layout's sizes in the DOM
MEASURE = """<script>
if (OPEN) document.querySelectorAll('details').forEach(d => d.open = true);
const e = document.documentElement;
document.body.setAttribute('data-measure', JSON.stringify({
  window: innerWidth, content: e.scrollWidth, height: e.scrollHeight,
  widest: Math.max(...[...document.querySelectorAll('table, img')].map(t => Math.ceil(t.getBoundingClientRect().right)))}));
</script>"""


def chromium(browser: str, page: Path, width: int, height: int, *args: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={width},{height}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def variant(page: Path, directory: Path, open_all: bool) -> Path:
    """A copy of the page with the measuring script (and the folds opened when `open_all`)."""
    out = directory / f"{page.stem}-{'open' if open_all else 'as-opened'}.html"
    script = MEASURE.replace("OPEN", "true" if open_all else "false")
    out.write_text(page.read_text().replace("</body>", script + "</body>"))
    return out


def measure(browser: str, page: Path, width: int, height: int) -> dict:
    dom = chromium(browser, page, width, height, "--dump-dom").stdout
    found = re.search(r"data-measure=\"([^\"]*)\"", dom)
    if not found:
        raise SystemExit(f"{page}: the browser ran no script (no measurement in its DOM)")
    return json.loads(found.group(1).replace("&quot;", '"'))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", type=int, default=1300)
    parser.add_argument("--height", type=int, default=850, help="the first screen's height")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    report = build(args.runs)
    html = args.out / "report.html"
    with tempfile.TemporaryDirectory(prefix="specbench-shot-") as tmp:
        write_outputs(report, Path(tmp) / "plots", html)
        shots = {}
        for name, open_all in (("full", False), ("expanded", True)):
            page = variant(html, Path(tmp), open_all)
            sizes = measure(args.browser, page, args.width, args.height)
            shots[name] = sizes
            chromium(args.browser, page, args.width, sizes["height"], f"--screenshot={args.out / f'{name}.png'}")
            if name == "full":
                chromium(args.browser, page, args.width, args.height, f"--screenshot={args.out / 'first-screen.png'}")
    for name, sizes in shots.items():
        print(f"{name}: window {sizes['window']} px, content {sizes['content']} px wide (widest table or plot ends at "
              f"{sizes['widest']} px), page {sizes['height']} px tall")
    print(f"wrote {html}, {args.out / 'first-screen.png'}, {args.out / 'full.png'}, {args.out / 'expanded.png'}")
    wide = [name for name, s in shots.items() if s["content"] > s["window"]]
    if wide:
        print(f"scrolls sideways at {args.width} px: {', '.join(wide)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
