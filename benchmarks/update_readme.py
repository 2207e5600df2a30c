"""Copy the benchmark outputs in results/ into the README and docs/, between their markers.

Each ``<!-- results/NAME.md -->`` ... ``<!-- end -->`` block is replaced by that file's content,
so the documented tables are always the scripts' own output.

Run: ``python benchmarks/update_readme.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- (results/[\w.-]+) -->\n.*?<!-- end -->", re.DOTALL)


def main() -> None:
    def fill(match: re.Match[str]) -> str:
        source = match.group(1)
        body = (ROOT / source).read_text().strip()
        return f"<!-- {source} -->\n{body}\n<!-- end -->"

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        page.write_text(BLOCK.sub(fill, page.read_text()))


if __name__ == "__main__":
    main()
