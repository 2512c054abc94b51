"""Write the HTML template `dvc plots show` uses (.dvc/config: plots.html_template), with Vega inlined.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so offline it renders blank. This page
carries the three libraries (the npm builds that scripts/setup.sh installs) inside it, so `dvc plots show`
renders with no network, and the HTML it writes works anywhere it is copied.

    python scripts/plots_template.py NODE_MODULES OUT.html     # inline the libraries
    python scripts/plots_template.py --cdn OUT.html            # fallback when npm was unavailable: DVC's CDN scripts
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

LIBRARIES = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>genforge: DVC plots</title>
    SCRIPTS
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page(node_modules: Path | None) -> str:
    if node_modules is None:
        return PAGE.replace("SCRIPTS", "{scripts}")  # DVC fills in its CDN <script> tags
    scripts = []
    for library in LIBRARIES:
        source = (node_modules / library).read_text(encoding="utf-8")
        if "</script" in source:
            raise SystemExit(f"{library}: contains '</script' and cannot be inlined")
        scripts.append(f"<script>/* {library} */\n{source}\n</script>")
    return PAGE.replace("SCRIPTS", "\n".join(scripts))


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    node_modules = None if argv[0] == "--cdn" else Path(argv[0])
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, encoding="utf-8") as tmp:
        tmp.write(page(node_modules))
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, out)


if __name__ == "__main__":
    main(sys.argv[1:])
