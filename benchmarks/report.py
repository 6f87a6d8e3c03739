"""What both benchmarks share: the machine they ran on, markdown tables, and their sections of RESULTS.md."""
import datetime
import os
import platform
import re
from pathlib import Path

import diffusers
import torch
import transformers

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# Benchmark results\n\nWritten by `python benchmarks/parity.py`, `speed.py`, `tiling.py`, `prompts.py`, "
          "`control.py` and\n`openvino_speed.py`, each replacing its own section; the `revisions` section is "
          "`revisions.py`'s printed\noutput, put in by hand.\n")


def machine() -> str:
    """One paragraph: date, CPU, cores, memory, load, versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now}; {cpu}, {os.cpu_count()} cores, {memory:.0f} GB; load average {os.getloadavg()[0]:.1f} at "
            f"the start; Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), diffusers {diffusers.__version__}, transformers {transformers.__version__}.")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def write_section(name: str, text: str) -> None:
    """Puts `text` in RESULTS.md between the markers of section `name`, replacing what was there."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    old = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(new)
