"""The one progress display of the command line (generation steps, training steps), on stderr:

    unet [#########           ] 900/2000 steps, 0.41 s/step, 7:31 left  loss 0.1234  lr 0.001

redrawn in place on a terminal, one line per update when stderr is a file or a pipe (logs stay readable).
"""
import sys
import time


class Progress:
    """Call with (done, total) after each unit of work, or with a note to show beside it. `start` is where a resumed
    run begins (its rate counts the work done since); `quiet` shows nothing."""

    def __init__(self, label: str = "", unit: str = "step", start: int = 0, quiet: bool = False, stream=None):
        self.label, self.unit, self.start, self.quiet = label, unit, start, quiet
        self.stream = stream or sys.stderr
        self.began = time.perf_counter()

    def __call__(self, done: int, total: int, note: str = "") -> None:
        if self.quiet:
            return
        per_unit = (time.perf_counter() - self.began) / max(done - self.start, 1)
        left = int(per_unit * (total - done))
        bar = "#" * (20 * done // total)
        line = (f"{self.label + ' ' if self.label else ''}[{bar:<20}] {done}/{total} {self.unit}s, "
                f"{per_unit:.2f} s/{self.unit}, {left // 60}:{left % 60:02d} left{'  ' + note if note else ''}")
        if self.stream.isatty():
            end = "\n" if done == total else ""
            print(f"\r{line}\033[K", end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
