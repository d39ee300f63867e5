"""Store: atomic writes under random kills, HDF5 round trips, checkpoints, run directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from glymphmpi.errors import InputError, Preempted
from glymphmpi.io import atomic_write_json, read_h5_tree, write_h5_tree, write_nifti
from glymphmpi.store import Checkpointer, RunDir, StopFlag


def test_h5_tree_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    tree = {"a": np.arange(10.0), "big": rng.normal(size=(20, 30, 10)), "n": 3, "x": 2.5,
            "s": "hello", "flag": True, "hist": [1.0, 2.0, 3.5], "g": {"inner": np.eye(3)},
            "rng": state, "none": None}
    write_h5_tree(tmp_path / "t.h5", tree, {"who": "me", "cfg": {"k": 1}})
    back, attrs = read_h5_tree(tmp_path / "t.h5")
    np.testing.assert_array_equal(back["big"], tree["big"])
    assert back["n"] == 3 and back["x"] == 2.5 and back["s"] == "hello" and back["flag"] is True
    assert back["hist"] == [1.0, 2.0, 3.5]
    np.testing.assert_array_equal(back["g"]["inner"], np.eye(3))
    assert back["rng"] == state and "none" not in back
    assert attrs["who"] == "me" and json.loads(attrs["cfg"]) == {"k": 1}
    r2 = np.random.default_rng()
    r2.bit_generator.state = back["rng"]
    assert r2.normal() == np.random.default_rng(3).normal()


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    from glymphmpi.io import atomic_path

    p = tmp_path / "x.json"
    atomic_write_json(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert json.loads(p.read_text()) == {"v": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_nifti_written_with_affine(tmp_path):
    import nibabel as nib

    aff = np.array([[0, -1.5, 0, 10], [2, 0, 0, -5], [0, 0, 1, 3], [0, 0, 0, 1]], float)
    data = np.random.default_rng(0).random((4, 5, 6))
    write_nifti(tmp_path / "m.nii.gz", data, aff)
    img = nib.load(str(tmp_path / "m.nii.gz"))
    np.testing.assert_allclose(img.affine, aff)
    np.testing.assert_allclose(img.get_fdata(), data, rtol=1e-6)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from glymphmpi.store import Checkpointer
    ck = Checkpointer(sys.argv[1], every=1)
    it = 0
    rng = np.random.default_rng(int(sys.argv[2]))
    while True:
        it += 1
        n = int(rng.integers(1000, 200000))
        a = np.full(n, float(it))
        ck.save({"a": a, "n": n, "check": float(a.sum()), "it": it}, it)
        print(it, flush=True)
""")


def test_checkpoint_survives_random_kills(tmp_path):
    """SIGKILL a writer at random instants (25 times): the file left always loads and is consistent."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ck_path = tmp_path / "ck" / "checkpoint.h5"
    ck_path.parent.mkdir()
    rng = np.random.default_rng(42)
    last_seen = 0
    loaded = 0
    for trial in range(25):
        proc = subprocess.Popen([sys.executable, str(script), str(ck_path), str(trial)],
                                stdout=subprocess.PIPE, text=True)
        # wait for at least one save, then kill at a random moment
        first = proc.stdout.readline()
        assert first.strip(), "writer produced no checkpoint"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.kill()
        proc.wait()
        res = Checkpointer(ck_path).load()
        assert res is not None, f"trial {trial}: no loadable checkpoint"
        state, it = res
        assert state["it"] == it and state["a"].shape == (state["n"],)
        assert np.all(state["a"] == it) and state["check"] == pytest.approx(it * state["n"])
        loaded += 1
        last_seen = it
        leftovers = [p for p in ck_path.parent.iterdir() if ".tmp-" in p.name]
        for p in leftovers:  # a killed writer may leave its temporary file: never the real one
            p.unlink()
    assert loaded == 25 and last_seen >= 1


def test_checkpointer_step_and_signal(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoint.h5", every=3)
    calls = []

    def state():
        calls.append(1)
        return {"x": np.ones(3)}

    for it in range(1, 7):
        ck.step(it, state)
    assert len(calls) == 2 and ck.load()[1] == 6
    StopFlag.reset()
    try:
        StopFlag._handler(signal.SIGTERM, None)
        with pytest.raises(Preempted):
            ck.step(7, state)
        assert ck.load()[1] == 7
    finally:
        StopFlag.reset()


def test_checkpointer_min_interval_throttles_periodic_saves_not_signals(tmp_path, monkeypatch):
    """min_interval_s: the first due save happens, later ones only when enough time passed since the last;
    a stop signal saves at once."""
    import glymphmpi.store.checkpoint as cp

    now = [100.0]
    monkeypatch.setattr(cp.time, "monotonic", lambda: now[0])
    ck = Checkpointer(tmp_path / "checkpoint.h5", every=1, min_interval_s=30.0)
    saved = []

    def state():
        saved.append(1)
        return {"x": np.ones(3)}

    ck.step(1, state)  # first: saved
    now[0] += 10.0
    ck.step(2, state)  # 10 s later: skipped
    now[0] += 25.0
    ck.step(3, state)  # 35 s after the last save: saved
    now[0] += 1.0
    ck.step(4, state)
    assert len(saved) == 2 and ck.load()[1] == 3
    StopFlag.reset()
    try:
        StopFlag._handler(signal.SIGTERM, None)
        with pytest.raises(Preempted):
            ck.step(5, state)  # 1 s after the last save, but stopping: saved
        assert len(saved) == 3 and ck.load()[1] == 5
    finally:
        StopFlag.reset()


SIGNALLED = textwrap.dedent("""
    import sys, time, numpy as np
    from glymphmpi.store import Checkpointer, StopFlag
    from glymphmpi.cli import main
    from glymphmpi.errors import Preempted
    ck = Checkpointer(sys.argv[1], every=0)
    with StopFlag.installed():
        try:
            for it in range(1, 10**6):
                time.sleep(0.01)
                if it == 5:
                    print("ready", flush=True)
                ck.step(it, lambda: {"it": it})
        except Preempted as exc:
            print(exc, file=sys.stderr)
            sys.exit(exc.exit_code)
""")


def test_sigterm_gives_checkpoint_and_exit_75(tmp_path):
    script = tmp_path / "sig.py"
    script.write_text(SIGNALLED)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "c.h5")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    state, it = Checkpointer(tmp_path / "c.h5").load()
    assert it >= 5 and state["it"] == it


def test_rundir_refuses_complete_output_without_force(tmp_path):
    rd = RunDir(tmp_path / "out").prepare()
    assert all((tmp_path / "out" / d).is_dir() for d in ("maps", "figures", "vtk"))
    rd.write_results({"a": np.ones(2)}, subject_id="s1")
    s = rd.write_summary("test", "s1", {"D_mm2_per_h": 0.5})
    assert s["status"] == "complete" and rd.is_complete()
    assert json.loads(rd.summary.read_text())["D_mm2_per_h"] == 0.5
    with pytest.raises(InputError, match="complete output exists"):
        RunDir(tmp_path / "out").prepare()
    rd2 = RunDir(tmp_path / "out", force=True).prepare()
    assert not rd2.summary.exists() and not rd2.results.exists()


def test_results_provenance(tmp_path):
    from glymphmpi import __version__
    from glymphmpi.config import SubjectConfig
    from glymphmpi.io import read_h5_attrs

    rd = RunDir(tmp_path / "o").prepare()
    rd.write_results({"v": np.zeros(3)}, config=SubjectConfig(), subject_id="sub-9")
    attrs = read_h5_attrs(rd.results)
    assert attrs["version"] == __version__ and attrs["subject"] == "sub-9" and attrs["mpi_size"] == 1
    assert json.loads(attrs["config"]) == {"SubjectConfig": {"max_negative_mass_fraction": 0.1}}
    assert attrs["created"].endswith("+00:00") and attrs["hostname"]
    assert len(attrs["git_sha"]) in (40, 7) or attrs["git_sha"] == "unknown"


def test_failure_record_and_fresh(tmp_path):
    rd = RunDir(tmp_path / "o").prepare()
    ck = rd.checkpointer()
    ck.save({"x": 1}, 1)
    rd.write_failure("m", "s", "stopped by a signal", 75)
    st = rd.status()
    assert st["status"] == "preempted" and st["resumable"] is True and not rd.is_complete()
    RunDir(tmp_path / "o").prepare()  # resume: checkpoint kept
    assert rd.checkpoint.exists()
    RunDir(tmp_path / "o", fresh=True).prepare()
    assert not rd.checkpoint.exists()


def test_prev_checkpoint_used_when_newest_damaged(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoint.h5")
    ck.save({"v": 1}, 1)
    ck.save({"v": 2}, 2)
    (tmp_path / "checkpoint.h5").write_bytes(b"garbage")
    state, it = ck.load()
    assert it == 1 and state["v"] == 1
    os.remove(tmp_path / "checkpoint.prev.h5")
    assert ck.load() is None


# ------------------------------------------------------------------ no pickle (issue 17 section 2)
class _Payload:
    """Unpickling this creates the file ``marker``: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, how: str) -> None:
    """Add a dataset carrying a pickle payload to an HDF5 file (creating it, marked complete)."""
    import pickle

    import h5py

    blob = pickle.dumps(_Payload(marker), protocol=4)
    with h5py.File(path, "a") as fh:
        grp = fh.require_group("state")
        if how == "pickle":  # what versions before this one wrote and read back with pickle.loads
            grp.create_dataset("rng", data=np.void(blob)).attrs["kind"] = "pickle"
        elif how == "opaque":  # no kind, opaque bytes
            grp.create_dataset("rng", data=np.void(blob))
        elif how == "bytes-as-json":
            text = pickle.dumps(_Payload(marker), protocol=0).decode("latin-1")  # protocol 0 is text
            grp.create_dataset("rng", data=text, dtype=h5py.string_dtype()).attrs["kind"] = "json"
        elif how == "vlen":
            ds = grp.create_dataset("rng", (1,), dtype=h5py.vlen_dtype(np.uint8))
            ds[0] = np.frombuffer(blob, np.uint8)
            ds.attrs["kind"] = "array"
        fh.attrs["complete"] = True
        if "iteration" not in fh:
            fh.create_dataset("iteration", data=3).attrs["kind"] = "scalar"


@pytest.mark.parametrize("how", ["pickle", "opaque", "bytes-as-json", "vlen"])
def test_planted_pickle_refused_in_one_line(tmp_path, how):
    """A pickle planted in checkpoint.h5 or results.h5 is refused naming the file; it never runs."""
    from glymphmpi.io import UnsafeFileError

    marker = tmp_path / "PWNED"
    ck = Checkpointer(tmp_path / "checkpoint.h5")
    ck.save({"x": np.ones(3)}, 2)
    ck.save({"x": np.ones(3)}, 3)  # a valid older checkpoint.prev.h5 must not be used instead
    _plant(ck.path, marker, how)
    with pytest.raises(UnsafeFileError) as err:
        ck.load()
    msg = str(err.value)
    assert msg.startswith(str(ck.path)) and "refused" in msg and "\n" not in msg and err.value.exit_code == 2
    write_h5_tree(tmp_path / "results.h5", {"v": np.zeros(2)})
    _plant(tmp_path / "results.h5", marker, how)
    with pytest.raises(UnsafeFileError, match="results.h5"):
        read_h5_tree(tmp_path / "results.h5")
    assert not marker.exists()
    # the payload is real: plain pickle would have run it
    import pickle

    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_typed_layout_round_trip_and_refuses_objects(tmp_path):
    """JSON for small structures, big ints as text; an arbitrary object is an error naming its key."""
    tree = {"events": [{"epoch": 3, "what": "rar"}, {"epoch": 9, "what": None}], "empty": [],
            "nested": [[1.0, 2.0], [3.0]], "big": 2**100, "neg": -(2**70), "t": (1, 2.5), "mixed": [1, "a"],
            "nan": [1.0, float("nan")], "i64": np.int64(-5), "f32": np.float32(0.5), "b": np.bool_(False)}
    write_h5_tree(tmp_path / "t.h5", tree)
    back, _ = read_h5_tree(tmp_path / "t.h5")
    assert back["events"] == tree["events"] and back["empty"] == [] and back["nested"] == [[1.0, 2.0], [3.0]]
    assert back["big"] == 2**100 and back["neg"] == -(2**70) and back["t"] == [1, 2.5] and back["mixed"] == [1, "a"]
    assert back["nan"][0] == 1.0 and np.isnan(back["nan"][1])
    assert back["i64"] == -5 and back["f32"] == 0.5 and back["b"] is False
    with pytest.raises(TypeError, match="'g/obj'"):
        write_h5_tree(tmp_path / "u.h5", {"g": {"obj": object()}})
    with pytest.raises(TypeError, match="inside 'lst'"):
        write_h5_tree(tmp_path / "u.h5", {"lst": [object()]})
    with pytest.raises(TypeError, match="dtype object"):
        write_h5_tree(tmp_path / "u.h5", {"a": np.array([None, 1], dtype=object)})
    assert not (tmp_path / "u.h5").exists() and [p.name for p in tmp_path.iterdir()] == ["t.h5"]


def test_no_unsafe_deserialisation_in_package():
    """No pickle/marshal loads, no torch.load without weights_only=True, no np.load(allow_pickle=True)."""
    import re
    from pathlib import Path

    import glymphmpi

    bad = re.compile(r"pickle\.loads?\(|marshal\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
                     r"|dill\.|cloudpickle|shelve\.|yaml\.load\(|yaml\.unsafe_load")
    found = []
    for p in Path(glymphmpi.__file__).parent.rglob("*.py"):
        text = p.read_text()
        for m in bad.finditer(text):
            found.append(f"{p.name}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start():text.find(")", m.start()) + 200]
            if "weights_only=True" not in call.split("\n\n")[0]:
                found.append(f"{p.name}:{text[:m.start()].count(chr(10)) + 1}: torch.load without weights_only=True")
    assert not found, found


def test_node_attrs_written_with_the_tree(tmp_path):
    """Per-node attributes (e.g. units) go into the same atomic write; a wrong path writes nothing."""
    import h5py

    rd = RunDir(tmp_path / "o").prepare()
    rd.write_results({"loops": {"000": {"velocity": np.ones((2, 3))}}, "D": 0.5},
                     node_attrs={"loops/000/velocity": {"units": "mm/h", "factor": 2.5}, "D": {"units": "mm^2/h"}})
    with h5py.File(rd.results) as fh:
        assert fh["loops/000/velocity"].attrs["units"] == "mm/h" and fh["loops/000/velocity"].attrs["factor"] == 2.5
        assert fh["D"].attrs["units"] == "mm^2/h"
    tree, _ = read_h5_tree(rd.results)
    assert tree["D"] == 0.5 and tree["loops"]["000"]["velocity"].shape == (2, 3)
    with pytest.raises(ValueError, match="no node 'loops/001'"):
        write_h5_tree(tmp_path / "x.h5", {"loops": {}}, node_attrs={"loops/001": {"units": "m"}})
    with pytest.raises(TypeError, match="a string or a number"):
        write_h5_tree(tmp_path / "x.h5", {"a": 1}, node_attrs={"a": {"units": ["m"]}})
    assert not (tmp_path / "x.h5").exists()
    rd.release()
