"""Data-parallel training and evaluation on Dask (issue 17): the same run as in one process to
1e-10 at every step (NumPy and C, optimizers, batch sizes that leave slices empty or uneven),
evaluation over partitions equal to the single-process figures, the module shipped as files, a
worker without numpy or cffi, a worker killed mid-epoch (the run goes on and equals the
single-process one) and no worker left (a clear message, the last step's parameters saved).

Runs only where dask.distributed is installed (the ``test`` extra has it); one LocalCluster of
two single-threaded processes serves the module, the fault tests start their own."""
import logging
import re
import os
import signal
import sys
import types

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import compiler as bpc  # noqa: E402
from compiler.train import TrainConfig, TrainError, evaluate, train  # noqa: E402
from compiler.train import distributed as dtrain  # noqa: E402
from compiler.train import shipping  # noqa: E402
from compiler.train.partitions import evaluate_partitions  # noqa: E402
from tests.model_table import HAS_CC  # noqa: E402

needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler")


def new_cluster():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=logging.CRITICAL)
    return cluster, distributed.Client(cluster)


@pytest.fixture(scope="module")
def client():
    cluster, client = new_cluster()
    yield client
    client.close()
    cluster.close()


def classifier(target="numpy", sizes=(4, 8, 3), name=None):
    model = bpc.mlp(list(sizes), "tanh", "softmax_cross_entropy", name=name or "mlp")
    return (bpc.compile_model(model) if target == "numpy" else bpc.compile_model_c(model)).load()


def blobs(n=103, k=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, k)), "y": rng.integers(0, classes, n)}


class Recorder:
    """Every step's loss and the parameters it started from: a run's per-step record."""

    def __init__(self):
        self.steps = []

    def wrap(self, backward):
        def recorded(params, *args, **kwargs):
            value, grads = backward(params, *args, **kwargs)
            self.steps.append((value, {k: np.array(v) for k, v in params.items()}))
            return value, grads
        return recorded


def single_process_steps(module, data, config):
    rec = Recorder()
    proxy = types.ModuleType(module.__name__)
    proxy.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    proxy.backward = rec.wrap(module.backward)
    return train(proxy, data, config), rec.steps


def dask_steps(module, data, config, client, monkeypatch, **kw):
    rec = Recorder()
    call = dtrain.DaskGradients.__call__
    monkeypatch.setattr(dtrain.DaskGradients, "__call__",
                        lambda self, params, *a, **k: rec.wrap(lambda p, *a2, **k2: call(self, p, *a2, **k2))(
                            params, *a, **k))
    # the API: the package compiler.train called as a function
    return bpc.train(module, data, config, client=client, **kw), rec.steps


def assert_same_steps(a, b, tol=1e-10):
    assert len(a) == len(b) and a
    for (va, pa), (vb, pb) in zip(a, b):
        assert abs(va - vb) <= tol * max(1.0, abs(va))
        for k in pa:
            np.testing.assert_allclose(pb[k], pa[k], rtol=0, atol=tol)


RUNS = [  # target, samples, config
    pytest.param("numpy", 103, dict(optimizer="adam", lr=1e-2, epochs=2, batch_size=16, val_split=0.2),
                 id="adam-batch16-val"),
    pytest.param("numpy", 103, dict(optimizer="sgd", lr=0.1, epochs=2), id="sgd-full-batch"),
    pytest.param("numpy", 60, dict(optimizer="nesterov", lr=0.05, epochs=2, batch_size=7, clip=0.5,
                                   schedule="cosine"), id="nesterov-clip-batch7"),
    # a batch of 1: every step one slice is empty
    pytest.param("numpy", 24, dict(optimizer="momentum", lr=0.05, epochs=1, batch_size=1), id="momentum-batch1"),
    pytest.param("c", 103, dict(optimizer="adam", lr=1e-2, epochs=2, batch_size=32, weight_decay=0.01),
                 id="c-adamw-batch32", marks=needs_cc),
]


@pytest.mark.parametrize("target,samples,options", RUNS)
def test_same_as_one_process_at_every_step(client, monkeypatch, target, samples, options):
    module, data = classifier(target), blobs(samples)
    config = TrainConfig(**options)
    one, steps_one = single_process_steps(module, data, config)
    many, steps_many = dask_steps(module, data, config, client, monkeypatch)
    assert many.stopped == one.stopped == "completed"
    assert_same_steps(steps_one, steps_many)
    for k in one.params:
        np.testing.assert_allclose(many.params[k], one.params[k], rtol=0, atol=1e-10)
    np.testing.assert_allclose(many.history.train_loss, one.history.train_loss, rtol=1e-12)
    assert many.warnings == one.warnings


def test_module_ships_as_files_never_pickled():
    module = classifier()
    p = shipping.payload(module)
    assert p["target"] == "numpy" and list(p["files"]) == [os.path.basename(module.__file__)]
    assert p["files"][p["entry"]].decode() == open(module.__file__).read()
    loaded = shipping.runtime().load(p)          # as a worker loads it: from the text, written to its directory
    assert loaded is not module and loaded.__file__ != module.__file__
    assert loaded.PARAMS == module.PARAMS


@needs_cc
def test_c_module_ships_wrapper_extension_and_source():
    module = classifier("c")
    p = shipping.payload(module)
    names = set(p["files"])
    assert p["target"] == "c" and {"mlp.py", "mlp.c", "mlp.h", p["extension"]} == names
    assert p["extension"].startswith(module._EXT)


def test_worker_without_numpy_or_cffi_is_a_clear_error(monkeypatch):
    rt = shipping.runtime()
    p = dict(shipping.payload(classifier()), digest="0" * 64)   # not loaded yet in this process
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(RuntimeError, match="numpy is not installed there"):
        rt.load(p, ("tcp://w:1", str(os.environ.get("TMPDIR", "/tmp"))))
    monkeypatch.undo()
    if HAS_CC:
        c = dict(shipping.payload(classifier("c")), digest="1" * 64)
        monkeypatch.setitem(sys.modules, "_cffi_backend", None)
        with pytest.raises(RuntimeError, match=r"cffi is not installed there.*C target"):
            rt.load(c, ("tcp://w:1", "/tmp"))


def forget_modules(runtime_name):
    sys.modules[runtime_name]._MODULES.clear()


@needs_cc
def test_worker_without_compiler_is_a_clear_error(monkeypatch, tmp_path):
    """The extension built on the client does not load on the worker (here: damaged), and the
    worker has no C compiler to rebuild it from the shipped C source."""
    import hashlib
    module = classifier("c")
    p = shipping.payload(module)
    files = dict(p["files"])
    files[p["extension"]] = b"\x7fELF not a library"
    p = dict(p, files=files, sha256={k: hashlib.sha256(v).hexdigest() for k, v in files.items()}, digest="2" * 64)
    monkeypatch.delitem(sys.modules, module._EXT)      # as on a worker: not imported there
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    with pytest.raises(RuntimeError, match=r"built on the client does not load there .*it needs a C compiler"):
        shipping.runtime().load(p, ("tcp://w:1", str(tmp_path)))


@needs_cc
def test_cluster_without_cffi_refuses_before_the_run(client):
    """The same, end to end: the workers lack cffi (hidden there), train names the problem."""
    def hide(flag):
        if flag:
            sys.modules["_cffi_backend"] = None
        else:
            sys.modules.pop("_cffi_backend", None)
    client.run(forget_modules, shipping.upload_runtime(client).__name__)     # not loaded there yet
    client.run(hide, True)
    try:
        with pytest.raises(TrainError, match="cffi is not installed there"):
            train(classifier("c"), blobs(), TrainConfig(epochs=1), client=client)
    finally:
        client.run(hide, False)


def test_refusals(client):
    with pytest.raises(TrainError, match="not imported from a file"):
        shipping.payload(types.ModuleType("bare"))
    net = bpc.Network("bn_dask")
    h = net.batchnorm(net.dense(net.input("x", 4), 6, "tanh"))
    bn = bpc.compile_model(net.build(net.dense(h, 3), "softmax_cross_entropy", net.target("y", kind="label"))).load()
    data = {"x": np.random.default_rng(0).normal(size=(20, 4)), "y": np.arange(20) % 3}
    with pytest.raises(TrainError, match="batch normalisation cannot train on Dask"):
        train(bn, data, TrainConfig(epochs=1), client=client)


# ---- evaluation over partitions ----------------------------------------------------------------

def regression():
    return bpc.compile_model(bpc.mlp([3, 6, 2], "tanh", "mse")).load()


def binary():
    return bpc.compile_model(bpc.mlp([3, 6, 1], "tanh", "bce_with_logits")).load()


def write_partitions(tmp_path, data, sizes, fmt, header=True):
    paths, lo = [], 0
    for i, size in enumerate(sizes):
        part = {k: v[lo:lo + size] for k, v in data.items()}
        lo += size
        path = tmp_path / f"part{i:02d}.{fmt}"
        if fmt == "npz":
            np.savez(path, **part)
        else:
            cols, names = [], []
            for k, v in part.items():
                v = v.reshape(len(v), -1)
                cols.append(v)
                names += [k] if v.shape[1] == 1 and k == "y" else [f"{k}{j}" for j in range(v.shape[1])]
            text = (",".join(names) + "\n" if header else "") + "\n".join(
                ",".join(repr(float(c)) if not float(c).is_integer() or k_is_float else str(int(c)) for c, k_is_float in
                         zip(row, [True] * (len(row) - 1) + [False])) for row in np.hstack(cols))
            path.write_text(text + "\n")
        paths.append(path)
    return paths


def heads():
    """Three outputs on one trunk: a classifier, a regression and a binary head (BCE)."""
    net = bpc.Network("heads_dask")
    h = net.dense(net.input("x", 3), 6, "tanh")
    return bpc.compile_model(net.build(losses=[
        (net.dense(h, 3, name="cls"), "softmax_cross_entropy", net.target("y", kind="label")),
        (net.dense(h, 2, name="reg"), "mse", net.target("t", 2)),
        (net.dense(h, 1, name="flag"), "bce_with_logits", net.target("f", 1))])).load()


def heads_data():
    rng = np.random.default_rng(8)
    return {"x": rng.normal(size=(80, 3)), "y": rng.integers(0, 3, 80), "t": rng.normal(size=(80, 2)),
            "f": (rng.random((80, 1)) > 0.5) * 1.0}


EVALS = [  # model, data, format, header
    pytest.param(classifier, lambda: blobs(250, 4, 3, 1), "npz", True, id="multiclass-npz"),
    pytest.param(classifier, lambda: blobs(250, 4, 3, 2), "csv", True, id="multiclass-csv-header"),
    pytest.param(classifier, lambda: blobs(250, 4, 3, 3), "csv", False, id="multiclass-csv-no-header"),
    pytest.param(binary, lambda: {"x": np.random.default_rng(4).normal(size=(90, 3)),
                                  "y": (np.random.default_rng(5).random((90, 1)) > 0.5) * 1.0}, "npz", True,
                 id="binary-npz"),
    pytest.param(regression, lambda: {"x": np.random.default_rng(6).normal(size=(70, 3)),
                                      "y": np.random.default_rng(7).normal(size=(70, 2))}, "npz", True,
                 id="regression-npz"),
    pytest.param(heads, heads_data, "npz", True, id="three-heads-npz"),
]


@pytest.mark.parametrize("make_model,make_data,fmt,header", EVALS)
def test_partitions_evaluate_as_one_process(client, tmp_path, make_model, make_data, fmt, header):
    module, data = make_model(), make_data()
    n = len(data["x"])
    paths = write_partitions(tmp_path, data, [n // 3, n // 3 + 7, n - 2 * (n // 3) - 7], fmt, header)
    params = module.init_params(seed=3)
    from compiler.train.data import load_data
    whole = {k: np.concatenate([load_data(p, module)[k] for p in paths]) for k in data}
    one = evaluate(module, params, whole)
    many = evaluate_partitions(module, params, str(tmp_path), client)
    assert many["samples"] == n and many["partitions"] == 3
    assert abs(many["loss"] - one["loss"]) <= 1e-12 * abs(one["loss"])
    assert many["accuracy"] == one["accuracy"]
    assert many["accuracies"] == one["accuracies"]
    if hasattr(module, "OUTPUTS"):     # each classifier output counted, by name
        assert list(one["accuracies"]) == ["cls", "flag"] and one["accuracy"] is None


def test_bad_partition_names_file_and_line(client, tmp_path):
    module, data = classifier(), blobs(30)
    paths = write_partitions(tmp_path, data, [15, 15], "csv")
    text = paths[1].read_text().splitlines()
    text[3] = text[3].replace(",", ",oops", 1)
    paths[1].write_text("\n".join(text) + "\n")
    with pytest.raises(TrainError, match=r"part01\.csv: line 4, column 2.*'oops"):
        evaluate_partitions(module, module.init_params(seed=0), str(tmp_path / "*.csv"), client)
    with pytest.raises(TrainError, match="no file matches"):
        evaluate_partitions(module, module.init_params(seed=0), str(tmp_path / "*.npz"), client)


# ---- faults: a LocalCluster of 2 processes, workers killed with SIGKILL during a run --------------

class KillBeforeStep:
    """A StopRequest stand-in that, polled before step ``at``, kills ``victims`` workers (their
    nannies told not to restart them) and never asks the run to stop."""

    reason = None

    def __init__(self, cluster, client, at, victims):
        self.cluster, self.client, self.at, self.victims, self.calls = cluster, client, at, victims, 0

    def is_set(self):
        self.calls += 1
        if self.calls == self.at:
            pids = self.client.run(shipping.runtime().pid)
            doomed = sorted(pids)[:self.victims]
            for nanny in self.cluster.workers.values():
                if nanny.worker_address in doomed:
                    nanny.close_gracefully()
            for address in doomed:
                os.kill(pids[address], signal.SIGKILL)
        return False


def test_worker_killed_mid_epoch_then_none_left(monkeypatch, tmp_path):
    """One cluster of two: a run loses one worker mid-epoch and goes on, equal to the run in one
    process; the next run loses the last one and stops with the last step's parameters."""
    cluster, client = new_cluster()
    try:
        module, data = classifier(), blobs()
        config = TrainConfig(optimizer="adam", lr=1e-2, epochs=3, batch_size=16)   # 7 steps an epoch
        one, steps = single_process_steps(module, data, config)
        many = train(module, data, config, client=client, stop=KillBeforeStep(cluster, client, 10, 1))
        assert many.stopped == "completed" and len(client.nthreads()) == 1
        assert any("lost Dask worker" in w and "recomputed its slice" in w for w in many.warnings)
        for k in one.params:
            np.testing.assert_allclose(many.params[k], one.params[k], rtol=0, atol=1e-10)

        monkeypatch.setattr(dtrain, "GRACE_SECONDS", 0.5)
        ckpt = tmp_path / "run.ckpt.npz"
        lost = train(module, data, config, client=client, stop=KillBeforeStep(cluster, client, 17, 1),
                     checkpoint=ckpt, checkpoint_every=1)
        assert lost.stopped == "workers_lost"
        assert "no Dask worker left at epoch 3, step 3" in lost.message and "last complete step" in lost.message
        # the parameters of the last complete step (epoch 3, step 2): those step 3 started from
        for k in lost.params:
            np.testing.assert_allclose(lost.params[k], steps[16][1][k], rtol=0, atol=1e-10)
        # and the checkpoint of the last complete epoch, which resumes to the whole run
        from compiler.train import load_checkpoint
        resumed = train(module, data, config, resume=load_checkpoint(module, ckpt))
        for k in one.params:
            np.testing.assert_allclose(resumed.params[k], one.params[k], rtol=0, atol=1e-10)
    finally:
        client.close()
        cluster.close()


# ---- bpc train --workers N / --scheduler ADDRESS ---------------------------------------------------

CLF_SPEC = """
[model]
name = "clf"
[network]
input = { name = "x", size = 2 }
target = { name = "y", kind = "label" }
loss = "softmax_cross_entropy"
[[network.layers]]
units = 8
activation = "tanh"
[[network.layers]]
units = 3
[train]
optimizer = "adam"
lr = 0.01
batch_size = 16
epochs = 3
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clf.toml").write_text(CLF_SPEC)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    np.savez(tmp_path / "clf.npz", x=x, y=y)
    (tmp_path / "parts").mkdir()
    for i, (lo, hi) in enumerate([(0, 40), (40, 90)]):
        np.savez(tmp_path / "parts" / f"p{i}.npz", x=x[lo:hi], y=y[lo:hi])
    return tmp_path


def cli(capsys, *argv):
    from compiler.cli import main
    code = main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_cli_scheduler_trains_as_one_process(client, work, capsys):
    code, out, err = cli(capsys, "clf.toml", "--data", "clf.npz", "--out", "one.npz", "--test", "clf.npz")
    assert code == 0, err
    one_test = re.search(r"test +loss (\S+) +accuracy (\S+)", out).groups()
    code, out, err = cli(capsys, "clf.toml", "--data", "clf.npz", "--out", "many.npz", "--test", "parts",
                         "--scheduler", client.scheduler.address)
    assert code == 0, err
    assert "on Dask: 2 worker(s)" in out
    assert re.search(r"test \(2 partitions, 90 samples, on Dask\) +loss (\S+) +accuracy (\S+)", out).groups() == one_test
    with np.load(work / "one.npz") as a, np.load(work / "many.npz") as b:
        for k in a.files:
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-10)


def test_cli_workers_starts_a_local_cluster(work, capsys):
    code, out, err = cli(capsys, "clf.toml", "--data", "clf.npz", "--workers", "1", "--epochs", "1", "--out", "w.npz")
    assert code == 0, err
    assert "on Dask: 1 worker(s)" in out and (work / "w.npz").exists()


@pytest.mark.parametrize("argv,words", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--scheduler", "tcp://127.0.0.1:9"], "--scheduler tcp://127.0.0.1:9: cannot connect to a Dask scheduler there"),
])
def test_cli_errors(work, capsys, monkeypatch, argv, words):
    monkeypatch.setattr(dtrain, "CONNECT_SECONDS", 1)
    code, out, err = cli(capsys, "clf.toml", "--data", "clf.npz", *argv)
    assert code == 2 and words in err
