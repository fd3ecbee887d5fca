"""benchmarks/RESULTS.md, one section per benchmark script."""

import os
import subprocess

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


def write_sections(text: str, path: str = PATH) -> str:
    """Each section of ``text`` (from a heading of level 1 or 2 to the next) in place of the section of
    that heading in the file at ``path``, or appended; the file's other sections stay. Returns ``path``."""
    chunks: list = []
    for line in text.rstrip("\n").splitlines():
        if line.startswith(("## ", "# ")) or not chunks:
            chunks.append([])
        chunks[-1].append(line)
    for chunk in chunks:
        write_section(chunk[0].strip(), "\n".join(chunk), path)
    return path


def commit() -> str:
    """HEAD's short hash, and the tracked files that differ from it (other than RESULTS.md, which the
    benchmarks write themselves): what a recorded figure was measured on."""
    root = os.path.dirname(os.path.dirname(PATH))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout

    try:
        sha = git("rev-parse", "--short", "HEAD").strip()
        changed = [
            ln[3:]
            for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()
            if ln[3:] != "benchmarks/RESULTS.md"
        ]
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    if not changed:
        return sha
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"{sha} with uncommitted changes ({shown})"
