"""Peak memory of a benchmark process, and warming the page cache without raising it.

ru_maxrss is no use for a child process here: Linux hands a child its parent's high-water RSS, so a worker started by
a parent that once held 3.6 GB reports at least 3.6 GB, whatever it used itself. VmHWM in /proc/self/status is the
high-water RSS of the process's own memory map, which starts empty at exec.
"""
from pathlib import Path


def peak_gb() -> float:
    """The most resident memory this process has held since it started (VmHWM), in GB (2**30 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def warm_page_cache(path: Path) -> None:
    """Reads the file in 64 MB pieces, so that it is in the page cache and this process's RSS stays small."""
    with open(path, "rb") as f:
        while f.read(64 * 2**20):
            pass
