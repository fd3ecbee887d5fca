"""benchmarks/RESULTS.md, one section per benchmark script."""

import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(section: str, text: str, path: str = PATH) -> str:
    """Puts ``text`` (which starts with the heading line ``section``) in place of that section of the
    file at ``path`` (up to the next heading of level 1 or 2), or appends it; returns ``path``."""
    old = open(path).read() if os.path.exists(path) else ""
    lines = old.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == section), None)
    body = text.rstrip("\n").splitlines()
    if start is None:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + "\n".join(body) + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "# "))), len(lines))
        rest = lines[end:]
        new = "\n".join(lines[:start] + body + ([""] if rest else []) + rest) + "\n"
    with open(path, "w") as f:
        f.write(new)
    return path
