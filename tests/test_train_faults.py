"""Training faults (issue 10, item 6): no finished or interrupted run is lost.

- every output (--out, --checkpoint, --history, --plot) is checked before the run: a directory,
  a path under a regular file, a full disk (mocked: posix_fallocate refusing) are refused with
  exit 2 before the first epoch; a missing parent directory is made;
- a final save that fails anyway (mocked ENOSPC) goes to a fallback file, named on stderr;
- SIGINT, SIGTERM and SIGHUP (real signals to a subprocess) save the best parameters; a second
  signal during the final evaluation does not crash;
- temporary files of a killed save (a real SIGKILL) are removed by the next run;
- a checkpoint (--checkpoint-every) resumes the exact run: 10 + 10 epochs == 20, bitwise, for
  sgd, momentum, nesterov and adam with a step or cosine schedule, shuffling and a validation
  split, in the library and through the CLI after a SIGKILL;
- float16 parameters are trained in float64 (or float32) with a warning instead of diverging.
"""
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compiler as bpc
from compiler.cli import main
from compiler.files import atomic_file, remove_stale_temporaries
from compiler.train.loop import StopRequest, TrainConfig, TrainError, load_checkpoint, train

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

LINE_SPEC = """
[model]
name = "line"
[expression]
prediction = "w*x + c"
params = { w = 0.0, c = 0.0 }
inputs = ["x"]
targets = ["y"]
loss = "(p - y)**2"
"""

# a generated module whose steps (backward) or final evaluation (loss) are slow, and say so on
# stdout: a signal can be sent at a known point of the run
SLOW = """
import os as _os, time as _time
_backward, _loss = backward, loss
def backward(params, *arrays):
    _time.sleep(float(_os.environ.get("BPC_TEST_STEP_SLEEP", "0")))
    return _backward(params, *arrays)
def loss(params, *arrays):
    _os.write(1, b"EVALUATING\\n")
    _time.sleep(float(_os.environ.get("BPC_TEST_EVAL_SLEEP", "0")))
    return _loss(params, *arrays)
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "line.toml").write_text(LINE_SPEC)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 50)
    y = 3 * x - 1 + 0.01 * rng.standard_normal(50)
    (tmp_path / "line.csv").write_text("x,y\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(x, y)))
    return tmp_path


def run(capsys, *argv):
    code = main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def slow_module(work):
    assert main(["compile", "line.toml", "-o", "line_mod.py"]) == 0
    (work / "slow_line.py").write_text((work / "line_mod.py").read_text() + SLOW)
    return "slow_line.py"


# ------------------------------------------------------------------------- outputs checked first

UNWRITABLE = [
    ("out_is_a_directory", ["--out", "d.npz"], "--out d.npz: cannot write there: it is a directory"),
    ("out_under_a_file", ["--out", "afile/p.npz"], "--out afile/p.npz: cannot write there: afile is a file"),
    ("out_deeper_under_a_file", ["--out", "afile/x/y/p.npz"], "afile is a file, not a directory"),
    ("checkpoint_is_a_directory", ["--checkpoint-every", "1", "--checkpoint", "d.npz"],
     "--checkpoint d.npz: cannot write there: it is a directory"),
    ("default_checkpoint_under_a_file", ["--checkpoint-every", "1", "--out", "p.npz", "--checkpoint",
                                         "afile/c.npz"], "--checkpoint afile/c.npz: cannot write there"),
    ("history_under_a_file", ["--history", "afile/h.json"], "--history afile/h.json: cannot write there"),
    ("out_is_a_device", ["--out", "/dev/null/x.npz"], "cannot write there"),
]


@pytest.mark.parametrize("argv,message", [u[1:] for u in UNWRITABLE], ids=[u[0] for u in UNWRITABLE])
def test_an_unwritable_output_is_refused_before_training(work, capsys, argv, message):
    (work / "d.npz").mkdir()
    (work / "afile").write_text("")
    before = sorted(p.name for p in work.iterdir())
    code, out, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "2", *argv)
    assert code == 2 and err.startswith("bpc: error: ") and message in err, err
    assert "training line" not in out and "epoch" not in out          # refused before the run
    assert sorted(p.name for p in work.iterdir()) == before


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the mock finds the probe's file through /proc")
@pytest.mark.parametrize("option", ["--out", "--checkpoint"])
def test_a_full_disk_is_found_before_training(work, capsys, monkeypatch, option):
    # mocked: the probe reserves the file's size with posix_fallocate; a full disk refuses it
    full_for = ".p.npz." if option == "--out" else ".p.ckpt.npz."

    def full(fd, offset, size):
        if full_for in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    argv = ["--out", "p.npz", "--checkpoint-every", "1"]
    code, out, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "2", *argv)
    assert code == 2 and f"bpc: error: {option} " in err and "No space left on device" in err, err
    assert "epoch" not in out
    assert not list(work.glob("*.npz")) and not list(work.glob(".*.tmp"))


def test_a_read_only_folder_is_refused_by_the_probe():
    """As root (the tests' usual user) every folder is writable: the probe runs with the
    effective uid of nobody then. The CLI turns its OSError into the message tested above."""
    import shutil
    import tempfile
    from compiler.files import check_writable
    base = Path(tempfile.mkdtemp(prefix="bpc-ro-"))
    try:
        base.chmod(0o755)
        (base / "ro").mkdir()
        (base / "ro").chmod(0o555)
        root = os.geteuid() == 0
        if root:
            os.setegid(65534)
            os.seteuid(65534)
        try:
            with pytest.raises(PermissionError):
                check_writable(base / "ro" / "p.npz", 4096)
            with pytest.raises(PermissionError):
                check_writable(base / "ro" / "new" / "p.npz", 4096)
        finally:
            if root:
                os.seteuid(0)
                os.setegid(0)
        assert list((base / "ro").iterdir()) == []
    finally:
        shutil.rmtree(base)


def test_a_missing_output_directory_is_made_before_training(work, capsys):
    code, out, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "2", "--out", "new/sub/p.npz")
    assert code == 0, err
    with np.load(work / "new/sub/p.npz") as p:
        assert set(p.files) == {"w", "c"}


def test_a_failed_final_save_goes_to_a_fallback_file(work, capsys, monkeypatch):
    import compiler.train.loop as train_module
    real = train_module.save_params

    def disk_full_for_out(params, path, stats=None):      # mocked: the disk filled up during the run
        if Path(path).name == "p.npz":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(params, path, stats)
    monkeypatch.setattr(train_module, "save_params", disk_full_for_out)
    code, out, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "3", "--out", "p.npz", "-q")
    assert code == 2
    assert "bpc: error: cannot write p.npz: No space left on device; the parameters are saved in" in err
    (rescued,) = work.glob("bpc-rescued-line-*.npz")
    assert f"saved in {rescued} instead" in err and f"parameters -> {rescued}" in out
    assert "completed 3 epochs" in out
    monkeypatch.setattr(train_module, "save_params", real)
    assert run(capsys, "line.toml", "--data", "line.csv", "--epochs", "3", "--out", "q.npz", "-q")[0] == 0
    with np.load(rescued) as a, np.load(work / "q.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("w", "c"))


# ------------------------------------------------------------------------- signals

def start(work, *argv, env=None):
    return subprocess.Popen([sys.executable, "-m", "compiler", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(ENV, **(env or {})), cwd=work)


def read_until(proc, predicate, count=1):
    seen = []
    while len(seen) < count:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if predicate(line):
            seen.append(line)
    return seen


@pytest.mark.parametrize("name,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_saves_the_best_params(work, name, code):
    proc = start(work, "line.toml", "--data", "line.csv", "--epochs", "1000000", "--batch-size", "4",
                 "--log-every", "1", "--out", "int.npz")
    try:
        read_until(proc, lambda line: line.startswith("epoch"), 3)     # epochs done: a best exists
        proc.send_signal(getattr(signal, name))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert f"interrupted by {name} during epoch" in out and "kept the best parameters so far" in out
    assert "Traceback" not in err
    assert f"bpc: interrupted by {name}; the best parameters so far are saved in int.npz" in err
    with np.load(work / "int.npz") as p:
        assert set(p.files) == {"w", "c"} and np.isfinite(p["w"])
    assert not list(work.glob(".*.tmp"))


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_a_second_signal_during_the_final_evaluation_does_not_crash(work, second):
    module = slow_module(work)
    proc = start(work, module, "--data", "line.csv", "--epochs", "1000000", "--batch-size", "4", "--log-every",
                 "1", "--out", "int.npz", env={"BPC_TEST_EVAL_SLEEP": "1.5"})
    try:
        read_until(proc, lambda line: line.startswith("epoch"), 2)
        proc.send_signal(signal.SIGINT)
        read_until(proc, lambda line: "EVALUATING" in line)             # the final evaluation has begun
        proc.send_signal(getattr(signal, second))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "already stopping" in err
    assert "  training  loss " in out                                    # the evaluation was finished
    with np.load(work / "int.npz") as p:
        assert set(p.files) == {"w", "c"} and np.isfinite(p["w"])


def test_the_summary_of_an_unevaluated_run_is_printed(work, capsys, monkeypatch):
    # the library leaves final losses None when Ctrl-C (the default handler) stops the evaluation
    import compiler.train.loop as train_module
    real = train_module.train

    def interrupted_evaluation(*a, **k):
        result = real(*a, **k)
        result.final.update(train_loss=None, train_accuracy=None)
        return result
    monkeypatch.setattr(train_module, "train", interrupted_evaluation)
    code, out, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "2", "-q")
    assert code == 0 and "training  not evaluated (interrupted)" in out


def test_stop_request_in_the_library(work):
    module = bpc.compile_model(bpc.mlp([1, 1], loss="mse", name="linear")).load()
    x = np.linspace(-1, 1, 64)[:, None]
    stop = StopRequest()
    r = train(module, {"x": x, "y": 2 * x}, TrainConfig(epochs=1000, batch_size=8), stop=stop,
              on_epoch=lambda e, h: e == 3 and stop.request("test") and False)
    assert r.stopped == "interrupted" and "interrupted by test during epoch 4" in r.message
    assert r.best_epoch == 3 and len(r.history.epoch) == 3


# ------------------------------------------------------------------------- temporary files

def test_temporaries_of_a_killed_save_are_removed_by_the_next_run(work, capsys):
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from compiler.files import atomic_file\n"
        "with atomic_file('p.npz', 'wb') as f:\n"
        "    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env=ENV, cwd=work)
    try:
        assert child.stdout.readline() == "writing\n"
        child.send_signal(signal.SIGKILL)                # no cleanup can run
        child.wait(timeout=30)
    finally:
        child.kill()
    (stale,) = work.glob(".p.npz.*.tmp")
    live = work / f".p.npz.{os.getpid()}-abcd.tmp"       # a live writer's (this process): kept
    live.write_text("")
    code, _, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "2", "--out", "p.npz", "-q")
    assert code == 0, err
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in work.glob(".p.npz.*")) == [live.name]


def test_an_interrupted_save_leaves_no_temporary(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "p.npz", "wb") as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    assert remove_stale_temporaries(tmp_path / "p.npz") == []


# ------------------------------------------------------------------------- exact resume

@pytest.fixture(scope="module")
def classifier():
    return bpc.compile_model(bpc.mlp([2, 8, 3], "tanh", "softmax_cross_entropy", name="clf"),
                             dtype="float64").load()


def clf_data(n=90):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    return {"x": x, "y": (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)}


RESUME = [(opt, sched) for opt in ("sgd", "momentum", "nesterov", "adam") for sched in ("step", "cosine")]


@pytest.mark.parametrize("optimizer,schedule", RESUME)
def test_10_plus_10_epochs_equal_20_bitwise(classifier, tmp_path, optimizer, schedule):
    config = TrainConfig(optimizer=optimizer, schedule=schedule, epochs=20, batch_size=8, lr=0.05, val_split=0.2,
                         weight_decay=0.01, clip=1.0, patience=15, seed=3)
    straight = train(classifier, clf_data(), config)
    path = tmp_path / "run.ckpt.npz"

    def crash(epoch, history):
        if epoch == 13:
            raise RuntimeError("a crash after epoch 13")
    with pytest.raises(RuntimeError):
        train(classifier, clf_data(), config, checkpoint=path, checkpoint_every=10, on_epoch=crash)
    ckpt = load_checkpoint(classifier, path)
    assert ckpt.epoch == 10
    resumed = train(classifier, clf_data(), config, resume=ckpt)
    for k in straight.params:
        np.testing.assert_array_equal(resumed.params[k], straight.params[k])
    for key in ("epoch", "lr", "train_loss", "val_loss", "val_accuracy", "grad_norm", "param_grad_norms"):
        assert getattr(resumed.history, key) == getattr(straight.history, key), key
    assert (resumed.best_epoch, resumed.stopped, resumed.final) == (straight.best_epoch, straight.stopped,
                                                                    straight.final)
    again = train(classifier, clf_data(), config, resume=ckpt)          # the checkpoint object is not used up
    for k in straight.params:
        np.testing.assert_array_equal(again.params[k], straight.params[k])


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_a_stopped_run_checkpoints_its_last_complete_epoch(classifier, tmp_path, optimizer):
    config = TrainConfig(optimizer=optimizer, schedule="cosine", epochs=20, batch_size=8, lr=0.05, val_split=0.2)
    straight = train(classifier, clf_data(), config)
    path = tmp_path / "run.ckpt.npz"
    calls = []

    class StopInEpoch14:                       # a signal in the middle of epoch 14
        def is_set(self):
            calls.append(1)
            return len(calls) > 13 * 9 + 4      # 72 training samples: 9 steps per epoch
    first = train(classifier, clf_data(), config, checkpoint=path, checkpoint_every=5, stop=StopInEpoch14())
    assert first.stopped == "interrupted" and len(first.history.epoch) == 13
    ckpt = load_checkpoint(classifier, path)
    assert ckpt.epoch == 13 and ckpt.history.epoch == list(range(1, 14))
    resumed = train(classifier, clf_data(), config, resume=ckpt)
    for k in straight.params:
        np.testing.assert_array_equal(resumed.params[k], straight.params[k])
    assert resumed.history.train_loss == straight.history.train_loss


@pytest.mark.parametrize("change,message", [
    (dict(lr=0.1), "other options (lr 0.05 -> 0.1)"),
    (dict(optimizer="sgd"), "other options (optimizer 'adam' -> 'sgd')"),
    (dict(seed=4), "other options (seed 3 -> 4)"),
    (dict(epochs=10), "at epoch 10 of the run; epochs 10 leaves nothing to train"),
    (dict(data=60), "other training or validation data"),
])
def test_a_checkpoint_resumes_only_its_own_run(classifier, tmp_path, change, message):
    config = dict(optimizer="adam", epochs=20, batch_size=8, lr=0.05, val_split=0.2, seed=3)
    path = tmp_path / "c.npz"
    train(classifier, clf_data(), TrainConfig(**config), checkpoint=path, checkpoint_every=10,
          on_epoch=lambda e, h: e == 10)
    n = change.pop("data", 90)
    with pytest.raises(TrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(classifier, clf_data(n), TrainConfig(**{**config, **change}), resume=load_checkpoint(classifier, path))


@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM"])
def test_resume_after_a_signal_through_the_cli(work, name):
    """`bpc train --checkpoint-every 5` stopped after epoch 12: by SIGKILL, its checkpoint is from
    epoch 10; by SIGTERM, from its last complete epoch. `--resume` from it ends with the
    parameters of an uninterrupted run, bitwise."""
    module = slow_module(work)
    common = [module, "--data", "line.csv", "--epochs", "20", "--batch-size", "8", "--optimizer", "adam", "--lr",
              "0.05", "--schedule", "cosine", "--val-split", "0.2", "--log-every", "1"]
    proc = start(work, *common, "--checkpoint-every", "5", "--out", "a.npz", env={"BPC_TEST_STEP_SLEEP": "0.02"})
    try:
        read_until(proc, lambda line: line.startswith("epoch 12/"))
        proc.send_signal(getattr(signal, name))
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (-9 if name == "SIGKILL" else 143)
    assert (work / "a.npz").exists() == (name == "SIGTERM") and (work / "a.ckpt.npz").is_file()
    r = subprocess.run([sys.executable, "-m", "compiler", "train", *common, "--resume", "a.ckpt.npz", "--out",
                        "a.npz"], capture_output=True, text=True, env=ENV, cwd=work)
    assert r.returncode == 0, r.stderr
    resumed_at = int(r.stdout.split("resuming from a.ckpt.npz (epoch ")[1].split(")")[0])
    assert resumed_at == 10 if name == "SIGKILL" else 12 <= resumed_at < 20
    assert f"epoch {resumed_at + 1}/20" in r.stdout and f"epoch {resumed_at}/20" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "compiler", "train", *common, "--out", "b.npz"],
                       capture_output=True, text=True, env=ENV, cwd=work)
    assert r.returncode == 0, r.stderr
    with np.load(work / "a.npz") as a, np.load(work / "b.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("w", "c"))


def test_resume_from_a_parameters_file_still_works(work, capsys):
    assert run(capsys, "line.toml", "--data", "line.csv", "--epochs", "2", "--out", "p.npz", "-q")[0] == 0
    code, out, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "2", "--resume", "p.npz",
                         "--out", "q.npz")
    assert code == 0 and "resuming from p.npz;" not in out and "resuming from p.npz" in out, err


# ------------------------------------------------------------------------- float16

def test_float16_params_are_trained_in_float64_not_diverging(classifier):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2)) * 100
    data = {"x": x, "y": (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)}
    half = {k: v.astype(np.float16) for k, v in classifier.init_params().items()}
    config = TrainConfig(optimizer="adam", epochs=5)
    r = train(classifier, data, config, params=half)
    assert r.stopped == "completed", r.message                # was: diverged at epoch 1, step 2
    assert all(v.dtype == np.float64 for v in r.params.values())
    assert any("float16: trained in float64" in w for w in r.warnings)
    same = train(classifier, data, config, params={k: v.astype(np.float64) for k, v in half.items()})
    for k in r.params:
        np.testing.assert_array_equal(r.params[k], same.params[k])


def test_float16_params_file_through_the_cli(work, capsys):
    np.savez(work / "half.npz", w=np.float16(0.5), c=np.float16(-0.25))
    code, out, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "3", "--resume", "half.npz",
                         "--out", "p.npz")
    assert code == 0, err
    assert "bpc: warning: parameter(s) w, c are float16: trained in float64" in err
    with np.load(work / "p.npz") as p:
        assert p["w"].dtype == np.float64


def test_an_unwritable_module_cache_is_reported_before_training(work, capsys, monkeypatch):
    (work / "afile").write_text("")
    monkeypatch.setenv("BPC_CACHE", str(work / "afile"))
    code, out, err = run(capsys, "line.toml", "--data", "line.csv", "--epochs", "2", "--out", "p.npz")
    if code == 2:          # (a private fallback cache, if there is one, may make the run work instead)
        assert "cannot write the module cache" in err and "epoch" not in out
    else:
        assert code == 0 and (work / "p.npz").is_file()


@pytest.mark.parametrize("damage,message", [
    (lambda a: a.update({"bpc/checkpoint": np.array("{not json")}), "a damaged checkpoint"),
    (lambda a: a.update({"bpc/checkpoint": np.array('{"version": 1}')}), "a damaged checkpoint (KeyError"),
    (lambda a: a.update({"bpc/checkpoint": np.array('{"version": 99}')}), "checkpoint format 99"),
    (lambda a: a.pop("params/W1"), "parameters do not match the model (missing: W1"),
    (lambda a: a.pop("bpc/checkpoint"), "not a bpc checkpoint"),
])
def test_a_damaged_checkpoint_is_refused_clearly(classifier, tmp_path, damage, message):
    path = tmp_path / "c.npz"
    train(classifier, clf_data(), TrainConfig(epochs=2), checkpoint=path, checkpoint_every=1)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    damage(arrays)
    np.savez(path, **arrays)
    with pytest.raises(TrainError, match=message.replace("(", r"\(")):
        load_checkpoint(classifier, path)
