"""What every benchmark shares: timing, the machine's description, result rows and where they are written.

A bench stage is a module in ``bench/stages/`` with ``STAGE = "<name>"`` and ``run(ctx) -> list[Row]``.
Each figure is the median of several timed runs after a warm-up, taken side by side with the alternative in the
same process and the same minute, so that a noisy shared machine moves both and the ratio stays honest.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass
class Row:
    """One measured figure. ``ratio`` is how many times better ours is (>1 means ours wins)."""

    stage: str
    metric: str
    unit: str
    ours: float | None
    alternative: str
    alternative_value: float | None
    input: str
    higher_is_better: bool = True
    machine: dict = field(default_factory=dict)
    ratio: float | None = None
    # Runnable tasks other than the bench's own, when the stage began and when the row was made (load()), and
    # whether either was above one per core: then the machine was shared and the absolute figures are noisy.
    load: dict = field(default_factory=dict)
    noisy: bool | None = None

    def __post_init__(self):
        if self.ratio is None and self.ours and self.alternative_value:
            self.ratio = (
                self.ours / self.alternative_value if self.higher_is_better else self.alternative_value / self.ours
            )

    def to_json(self) -> dict:
        """The row in the results file's shape."""
        data = asdict(self)
        data.pop("higher_is_better")
        for key in ("ours", "alternative_value", "ratio"):
            if isinstance(data[key], float):
                data[key] = round(data[key], 4)
        return data


def machine() -> dict:
    """Cores, CPU model and GPU (if any) of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu or "no GPU"}


def load(samples: int = 20, interval: float = 0.05) -> dict:
    """How busy the machine is now, apart from this bench: runnable tasks, and the 1-minute load average.

    ``runnable`` is the mean over ``samples`` readings of the kernel's count of running tasks
    (``/proc/loadavg``'s fourth field) less the one reading it (this process). It is taken while the bench itself
    is idle (before a stage starts, after its measurements), so it counts other work only; the load average lags
    by a minute and includes the bench's own recent work, so it is recorded for context and not judged.
    """
    counts = []
    for _ in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return {"runnable": None, "loadavg_1min": None}
        counts.append(max(0, running - 1))
        time.sleep(interval)
    return {"runnable": round(statistics.mean(counts), 2), "loadavg_1min": round(os.getloadavg()[0], 2)}


def is_noisy(before: dict, after: dict, cores: int) -> bool | None:
    """Whether other work used more than one runnable task per core before or after the measurement."""
    seen = [x["runnable"] for x in (before, after) if x.get("runnable") is not None]
    return None if not seen else max(seen) > cores


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (subprocesses, finished worker pools)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Timing:
    """Medians of one contender's timed runs: wall seconds, and CPU seconds spent by it and its children."""

    wall: float
    cpu: float


def _once(fn: Callable[[], object], setup: Callable[[], object] | None) -> tuple[float, float]:
    if setup is not None:
        setup()
    cpu, start = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def _medians(samples: list[tuple[float, float]]) -> Timing:
    return Timing(statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))


def measure(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, setup: Callable[[], object] | None = None
) -> Timing:
    """Median wall and CPU seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    ``setup`` (untimed) runs before every call: clearing an output folder, say.
    """
    for _ in range(warmup):
        _once(fn, setup)
    return _medians([_once(fn, setup) for _ in range(repeats)])


def measure_pair(
    ours: Callable[[], object],
    theirs: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> tuple[Timing, Timing]:
    """Medians of two alternatives, interleaved run by run so that load hits both alike.

    ``setup`` (untimed) runs before every call of either. CPU seconds are the noise-proof figure on a shared
    machine: they do not grow when other work steals cores, where wall time does.
    """
    for _ in range(warmup):
        _once(ours, setup)
        _once(theirs, setup)
    a, b = [], []
    for _ in range(repeats):
        a.append(_once(ours, setup))
        b.append(_once(theirs, setup))
    return _medians(a), _medians(b)


def timed(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, setup: Callable[[], object] | None = None
) -> float:
    """Median wall seconds of ``fn`` (see :func:`measure`)."""
    return measure(fn, repeats, warmup, setup).wall


def timed_pair(
    ours: Callable[[], object],
    theirs: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """Median wall seconds of two alternatives, interleaved (see :func:`measure_pair`)."""
    a, b = measure_pair(ours, theirs, repeats, warmup, setup)
    return a.wall, b.wall


@dataclass
class Context:
    """What a bench stage gets: a scratch folder, repeat counts, optional real data, the machine."""

    work: Path
    repeats: int
    quick: bool
    research_data: Path | None
    machine: dict
    smoke: bool = False  # --smoke: --quick, one timed run, alternatives that need installing not run
    load_before: dict = field(default_factory=dict)

    def row(self, **kwargs) -> Row:
        """A Row stamped with this machine and the load before the stage and now (see :func:`load`)."""
        after = load(samples=2, interval=0.01) if self.smoke else load()
        return Row(
            machine=self.machine,
            load={"before": self.load_before, "after": after},
            noisy=is_noisy(self.load_before, after, self.machine.get("cores") or 1),
            **kwargs,
        )

    def alternative(self, fn: Callable[[], object]) -> Callable[[], object]:
        """``fn``, or with --smoke a no-op: the smoke test checks our side and the fixtures, not other tools."""
        return (lambda: None) if self.smoke else fn

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        """Run a command, failing loudly with its output."""
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc

    def venv(self, name: str, requirements: list[str], no_deps: list[str] = ()) -> Path:
        """A throwaway virtualenv for an alternative tool, under the scratch folder; returns its ``bin`` folder.

        The alternative's packages never enter the project's environment. The folder is reused when it already
        holds exactly these requirements (a ``--work`` folder kept between runs).
        """
        if self.smoke:  # nothing is installed in a smoke run (no network in tests); ctx.alternative skips the use
            return self.work / f"venv-{name}-not-installed" / "bin"
        root = self.work / f"venv-{name}"
        stamp = root / "bench-requirements.txt"
        wanted = "\n".join([*requirements, "--no-deps", *no_deps]) + "\n"
        if stamp.is_file() and stamp.read_text() == wanted:
            return root / "bin"
        print(f"   installing {', '.join([*no_deps, *requirements])} into {root}", file=sys.stderr, flush=True)
        self.run(sys.executable, "-m", "venv", "--clear", str(root))
        pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        if no_deps:
            self.run(*pip, "--no-deps", *no_deps)
        if requirements:
            self.run(*pip, *requirements)
        stamp.write_text(wanted)
        return root / "bin"

    def note(self, message: str) -> None:
        """Progress on stderr (the table goes to stdout)."""
        print(f"   {message}", file=sys.stderr, flush=True)


def write_results(rows: list[Row], stages_run: list[str], mach: dict) -> tuple[Path, Path]:
    """Merge ``rows`` into ``latest.json`` (replacing the stages just run) and write a dated Markdown table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    latest = RESULTS / "latest.json"
    kept = []
    if latest.is_file():
        kept = [r for r in json.loads(latest.read_text()) if r["stage"] not in stages_run]
    merged = kept + [r.to_json() for r in rows]
    latest.write_text(json.dumps(merged, indent=2) + "\n")
    name = f"{dt.date.today().isoformat()}-{mach['cores']}core-{'gpu' if mach['gpu'] != 'no GPU' else 'cpu'}.md"
    table = RESULTS / name
    table.write_text(markdown(merged, mach))
    return latest, table


def markdown(rows: list[dict], mach: dict) -> str:
    """The results as a Markdown table."""
    lines = [
        f"# Benchmarks, {dt.date.today().isoformat()}",
        "",
        f"Machine: {mach['cores']} cores, {mach['cpu']}, {mach['gpu']}.",
        "",
        "Load: other runnable tasks before the stage → after the row (1-minute load average in brackets);",
        "**noisy** where either count was above one per core.",
        "",
        "| stage | metric | ours | alternative | theirs | ratio | load | input |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = "—" if r["ours"] is None else f"{r['ours']:.4g} {r['unit']}"
        theirs = "—" if r["alternative_value"] is None else f"{r['alternative_value']:.4g} {r['unit']}"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(
            f"| {r['stage']} | {r['metric']} | {ours} | {r['alternative']} | {theirs} | {ratio} | {_load_cell(r)} "
            f"| {r['input']} |"
        )
    return "\n".join(lines) + "\n"


def _load_cell(row: dict) -> str:
    """``0.1 → 0.3 (1.2 → 1.9)``, with **noisy** where the row was measured on a shared machine."""
    before, after = (row.get("load") or {}).get("before") or {}, (row.get("load") or {}).get("after") or {}
    if not before and not after:
        return "not recorded"

    def fmt(key: str) -> str:
        return " → ".join("?" if x.get(key) is None else f"{x[key]:.1f}" for x in (before, after))

    return f"{fmt('runnable')} ({fmt('loadavg_1min')})" + (" **noisy**" if row.get("noisy") else "")
