"""A tiny method for testing the cohort machinery (registered only by the tests' cohort files).

Command line like ``glymph``: ``python tests/test_cohort_toymethod.py [--quiet] toy SUBJECT
--out DIR [--steps N] [--step-s S] [--fail-subject ID]``. It follows the run-directory
contract with the foundation's store: a stochastic running mean of the subject's scan masses
(random scan, multiplicative noise, RNG state in the checkpoint), one checkpoint per step,
SIGTERM -> checkpoint -> exit 75, summary.json last. A resumed run must end with bit-for-bit
the same value as an uninterrupted one, which is what the kill/requeue tests compare.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def toy_reference(masses: np.ndarray, sid: str, steps: int) -> float:
    """The value an uninterrupted run reaches (same RNG sequence, computed directly)."""
    rng = np.random.default_rng(zlib.crc32(sid.encode()))
    x = 0.0
    for k in range(steps):  # the same arithmetic as the method: a bitwise comparison is fair
        i = rng.integers(len(masses))
        x += (masses[i] * (1.0 + 0.01 * rng.standard_normal()) - x) / (k + 1)
    return float(x)


def solve_toy(subject, cfg, rundir, comm, steps: int, step_s: float, fail_subject: str | None) -> dict:
    from glymphmpi.errors import InputError

    if fail_subject and subject.id == fail_subject:
        raise InputError(f"toy: told to fail on subject {subject.id}")
    masses = subject.mass_per_scan()
    ck = rundir.checkpointer(every=1)
    loaded = ck.load()
    if loaded is None:
        it0, x = 0, 0.0
        rng = np.random.default_rng(zlib.crc32(subject.id.encode()))
        trace = np.zeros(steps)
    else:
        state, it0 = loaded
        x, trace = float(state["x"]), np.asarray(state["trace"], dtype=float)
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
    for k in range(it0, steps):
        i = rng.integers(len(masses))
        sample = masses[i] * (1.0 + 0.01 * rng.standard_normal())
        x += (sample - x) / (k + 1)  # running mean of the samples
        trace[k] = x
        time.sleep(step_s)
        ck.step(k + 1, lambda x=x: {"x": x, "trace": trace, "rng": rng.bit_generator.state})
    rundir.write_results({"value": x, "trace": trace}, None, subject.id)
    ck.remove()
    return {"value": x, "mass_mean": float(masses.mean()), "iterations": steps, "resumed_from": it0}


def main(argv=None) -> int:
    from glymphmpi.errors import GlymphError
    from glymphmpi.log import setup_logging
    from glymphmpi.runner import add_run_args, run_method
    from glymphmpi.store import StopFlag

    p = argparse.ArgumentParser(prog="toy")
    p.add_argument("--quiet", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy", aliases=["toy2"])
    add_run_args(t)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--step-s", type=float, default=0.05)
    t.add_argument("--fail-subject")
    args = p.parse_args(argv)
    setup_logging(0, quiet=args.quiet)
    try:
        with StopFlag.installed():
            run_method("toy", args, lambda s, c, r, m: solve_toy(s, c, r, m, args.steps, args.step_s,
                                                                   args.fail_subject),
                       comm=None, config_section="subject")
        return 0
    except GlymphError as exc:
        print(f"toy: error: {exc}", file=sys.stderr)
        return exc.exit_code


def test_toy_matches_reference_and_resumes_exactly(tmp_path, small_phantom):
    """Direct check of the toy: uninterrupted value == reference; a SIGTERM'd run resumes to it."""
    import signal
    import subprocess

    from glymphmpi.store import read_summary
    from glymphmpi.subject import load_subject

    subj = load_subject(small_phantom)
    steps = 40
    ref = toy_reference(subj.mass_per_scan(), subj.id, steps)
    cmd = [sys.executable, __file__, "--quiet", "toy", str(small_phantom), "--out", str(tmp_path / "a"),
           "--steps", str(steps), "--step-s", "0.1"]
    proc = subprocess.Popen(cmd)
    t0 = time.time()
    while not (tmp_path / "a" / "checkpoint.h5").exists() and time.time() - t0 < 60:
        time.sleep(0.02)
    time.sleep(0.5)  # inside the loop: first checkpoint after step 1, the run takes 4 s
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 75
    s = read_summary(tmp_path / "a")
    assert s["status"] == "preempted" and s["resumable"] is True
    assert subprocess.run(cmd).returncode == 0
    s = read_summary(tmp_path / "a")
    assert s["status"] == "complete" and 0 < s["resumed_from"] < steps
    assert s["value"] == ref  # bit-for-bit: the RNG state came back from the checkpoint
    # the running mean of 40 noisy draws of scan masses lies within the masses' range
    m = subj.mass_per_scan()
    assert m.min() * 0.95 <= s["value"] <= m.max() * 1.05
    assert not any(Path(tmp_path / "a").glob("checkpoint*.h5"))


if __name__ == "__main__":
    sys.exit(main())
