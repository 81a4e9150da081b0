"""Progress of long work (training, gradient checks) on stderr.

On a terminal, a tqdm bar (rate, elapsed and remaining time, a status after it), drawn at most
ten times a second and erased at the end. Elsewhere (a log file, CI) no bar: a plain line at
most every ``log_every`` seconds, or nothing when the caller logs its own lines.
"""
from __future__ import annotations

import sys
import time


def _is_terminal(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return False


class Progress:
    """Progress over ``total`` items of ``unit`` (a plural: "steps"). ``update(n, status)`` as work is done, ``write(line, file)`` for a line of its own
    (above the bar on a terminal), ``close()`` at the end.

    ``delay``: seconds before anything shows (quick work shows nothing); ``log_every``: seconds
    between plain lines off a terminal (None: none); ``redraw``: least seconds between two
    drawings of the bar; ``clock``: the clock of the plain lines (tests pass their own)."""

    def __init__(self, total, unit, stream=None, delay=0.5, log_every=10.0, clock=None, redraw=0.1):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.unit, self.done = total, unit, 0
        self.log_every = log_every
        self.clock = clock or time.monotonic
        self.start = self.last = self.clock()
        self.delay = delay
        self.bar = None
        if _is_terminal(self.stream):
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, file=self.stream, leave=False, dynamic_ncols=True,
                            delay=delay, mininterval=redraw, bar_format="{percentage:3.0f}% |{bar}| {n_fmt}/{total_fmt} "
                            "{unit} {postfix} [{elapsed}<{remaining}]")

    def update(self, n, status):
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if self.log_every is None or now - self.last < self.log_every or now - self.start < self.delay:
            return
        self.last = now
        self.stream.write(f"{status}; {self.done} of {self.total} {self.unit}\n")
        self.stream.flush()

    def write(self, line, file=None):
        file = file if file is not None else sys.stdout
        if self.bar is not None:
            self.bar.write(line, file=file)
            file.flush()
        else:
            print(line, file=file, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
