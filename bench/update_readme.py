"""Copy the benchmark tables into README.md: each `<!-- include PATH -->` ... `<!-- end include -->` block
gets PATH's current content. Run by `make bench` after the benchmarks."""
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- include (\S+) -->\n).*?(<!-- end include -->)", re.S)


def update(readme):
    text = readme.read_text()
    missing = [path for path in BLOCK.findall(text) if not (readme.parent / path[1]).is_file()]
    if missing:
        sys.exit(f"not found (run the benchmarks first): {', '.join(p[1] for p in missing)}")
    readme.write_text(BLOCK.sub(lambda m: m[1] + (readme.parent / m[2]).read_text() + m[3], text))


if __name__ == "__main__":
    update(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
