"""Size limits before work (issue 10, item 5): compile time grows linearly with the number of
parameters and layers, `bpc check` samples the entries of big parameters (seeded, every
parameter included, with progress and a statement of what was checked), and parameters that
would need more memory than the limit are refused with an estimate before anything is
allocated."""
import io
import time

import numpy as np
import pytest
import sympy as sp
from sympy.core.cache import clear_cache

import compiler as bpc
from compiler import limits
from compiler.core import ir
from compiler.cli import main
from compiler.cli.check import _Progress
from compiler.gradcheck import check_gradients, random_batch, sample_entries
from compiler.spec.loader import loads_spec


def run(*argv):
    return main([str(a) for a in argv])


# ---- compile time against size --------------------------------------------------------------

def _declared_spec(n):
    """An expression spec with n declared parameters, two of them used (a legal spec: unused
    scalar parameters get a zero gradient)."""
    params = ", ".join(f"a{i} = 0.0" for i in range(n))
    return f'[expression]\nprediction = "a0*x + a1"\nparams = {{ {params} }}\ninputs = ["x"]\n'


def _declared(n):
    return loads_spec(_declared_spec(n), "declared.toml").model


def _summed(n):
    """One expression that uses every one of n parameters: a sum of n terms."""
    a, x = sp.symbols(f"a0:{n}"), sp.Symbol("x")
    return bpc.expression_model(sp.Add(*[ai * x**(i % 3) for i, ai in enumerate(a)]), params=list(a),
                                inputs=[x], name="summed")


def _tanh_of_sum(n):
    """A function of a sum of n parameters: each input's derivative holds the whole sum until
    the forward output replaces it."""
    a, x = sp.symbols(f"a0:{n}"), sp.Symbol("x")
    return bpc.expression_model(sp.tanh(sp.Add(*[ai * x**(i % 3) for i, ai in enumerate(a)])), params=list(a),
                                inputs=[x], name="tanh_sum")


def _deep(n):
    return bpc.mlp([2] + [4] * n + [1], activation="tanh", loss="mse", name="deep")


def _compile_numpy(model):
    return bpc.compile_model(model)


def _compile_c(model):
    from compiler.backends.c.backend import compile_model_c
    return compile_model_c(model)     # the C source only: no C compiler run


def _seconds(build, n, compile_fn, repeats=2):
    """The least CPU time of ``repeats`` cold compiles (CPU time of this process: other
    processes on the machine slow it far less than wall time). Cold means SymPy's cache too:
    its LRU holds 1000 entries, so a repeat of a small model ran from a warm cache while a repeat
    of a large one missed, a 2x step between 104 and 108 summed parameters that read as
    superlinear growth (CI, stop 21: 100 -> 0.064 s, 400 -> 0.791 s)."""
    best = float("inf")
    for _ in range(repeats):
        ir._intern.clear()
        clear_cache()
        t0 = time.process_time()
        compile_fn(build(n))
        best = min(best, time.process_time() - t0)
    return best


# (case, model builder, compile, n): the time at 4n must stay within 8x of the time at n
# (linear growth gives about 4x, quadratic 16x). Before the fix, 2000 -> 8000 declared
# parameters went from 0.5 s to 10 s (a list scan per parameter when ordering FORMULAS), and a
# sum of 65 or more parameters raised IndexError (64 argument symbols).
SCALING = [
    ("declared parameters, NumPy", _declared, _compile_numpy, 2000),
    ("declared parameters, C source", _declared, _compile_c, 1000),
    ("parameters in one sum, NumPy", _summed, _compile_numpy, 100),
    ("tanh of a sum of parameters, NumPy", _tanh_of_sum, _compile_numpy, 100),
    ("layers, NumPy", _deep, _compile_numpy, 16),
]


@pytest.mark.parametrize("case,build,compile_fn,n", SCALING, ids=[c[0] for c in SCALING])
def test_compile_time_grows_linearly(case, build, compile_fn, n):
    small = _seconds(build, n, compile_fn)
    large = _seconds(build, 4 * n, compile_fn)
    assert large <= 8 * max(small, 0.02), f"{case}: {n} -> {small:.3f} s, {4 * n} -> {large:.3f} s"


@pytest.mark.parametrize("n", [65, 100, 150])
def test_an_expression_may_use_any_number_of_parameters(n):
    # a spec whose prediction sums n parameters (more than 64 was an IndexError traceback)
    params = ", ".join(f"a{i} = {i / n}" for i in range(n))
    terms = " + ".join(f"a{i}*x**{i % 3}" for i in range(n))
    model = loads_spec(f'[expression]\nprediction = "{terms}"\nparams = {{ {params} }}\ninputs = ["x"]\n',
                       "wide.toml").model
    module = bpc.compile_model(model, dtype="float64").load()
    params = module.init_params()
    rows = check_gradients(module, params, random_batch(module, batch=4))
    assert len(rows) == n and all(r.ok for r in rows)


@pytest.mark.parametrize("index,name", [(0, "_s0"), (63, "_s63"), (64, "_s64"), (5000, "_s5000")])
def test_argument_symbols_are_unbounded(index, name):
    seq = ir.Symbols("_s")
    assert seq[index] == sp.Symbol(name, real=True)
    assert seq[:3] == tuple(sp.Symbol(f"_s{i}", real=True) for i in range(3))


def test_argument_symbols_from_many_threads_keep_their_index():
    from concurrent.futures import ThreadPoolExecutor
    seq = ir.Symbols("_t")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: seq[k], range(2000, 0, -1)))
    assert all(seq[i].name == f"_t{i}" for i in range(2001))


def test_many_declared_parameters_compile_with_zero_gradients():
    module = bpc.compile_model(_declared(3000)).load()
    params = module.init_params()
    x, y = np.linspace(-1, 1, 5), np.zeros(5)
    _, grads = module.backward(params, x, y)
    assert len(grads) == 3000 and all(grads[f"a{i}"] == 0 for i in range(2, 3000))


# ---- bpc check: sampled entries, progress, what was checked ---------------------------------

MLP_SPEC = """
[network]
input = { size = 40 }
target = { size = 3 }
[[network.layers]]
units = 30
activation = "tanh"
[[network.layers]]
units = 3
"""


@pytest.mark.parametrize("size,entries,expected", [
    (10000, 64, 64),        # sampled
    (50, 64, 50),           # smaller than K: every entry
    (64, 64, 64),
    (1, 1, 1),
    (10000, None, 10000),   # entries=None: every entry
])
def test_sample_entries_sizes(size, entries, expected):
    idx = sample_entries("W1", size, entries, seed=0)
    assert len(idx) == expected and len(set(idx.tolist())) == expected
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < size


@pytest.mark.parametrize("a,b,same", [
    (("W1", 0), ("W1", 0), True),        # deterministic
    (("W1", 0), ("W1", 1), False),       # the seed chooses the sample
    (("W1", 0), ("W2", 0), False),       # each parameter its own sample
])
def test_sample_entries_are_seeded(a, b, same):
    ia = sample_entries(a[0], 100000, 64, seed=a[1])
    ib = sample_entries(b[0], 100000, 64, seed=b[1])
    assert np.array_equal(ia, ib) == same


def test_check_gradients_samples_every_parameter_and_reports_coverage():
    module = bpc.compile_model(loads_spec(MLP_SPEC, "mlp.toml").model, dtype="float64").load()
    params = module.init_params()
    rows = check_gradients(module, params, random_batch(module), entries=16)
    assert [(r.name, r.checked, r.size) for r in rows] == [("W1", 16, 1200), ("b1", 16, 30),
                                                           ("W2", 16, 90), ("b2", 3, 3)]
    assert all(r.ok for r in rows)
    assert [r.sampled for r in rows] == [True, True, True, False]


def test_a_wrong_sampled_entry_fails():
    module = bpc.compile_model(loads_spec(MLP_SPEC, "mlp.toml").model, dtype="float64").load()
    params = module.init_params()
    backward = module.backward
    hit = sample_entries("W1", 1200, 8, seed=0)[3]

    def bad(params, *arrays):
        loss, grads = backward(params, *arrays)
        grads["W1"] = grads["W1"].copy()
        grads["W1"].reshape(-1)[hit] += 1.0
        return loss, grads
    module.backward = bad
    rows = check_gradients(module, params, random_batch(module), entries=8, seed=0)
    assert [r.name for r in rows if not r.ok] == ["W1"]


@pytest.mark.parametrize("argv,lines", [
    ([], ["checked 64 of 1200 entries of W1 (sampled, seed 0)", "checked 64 of 90 entries of W2 (sampled, seed 0)",
          "checked every entry of b1, b2", "on the entries checked"]),
    (["--entries", "10", "--seed", "3"], ["checked 10 of 1200 entries of W1 (sampled, seed 3)",
                                          "checked 10 of 30 entries of b1 (sampled, seed 3)",
                                          "checked 10 of 90 entries of W2 (sampled, seed 3)",
                                          "checked every entry of b2"]),
    (["--entries", "all"], ["checked every entry of W1, b1, W2, b2"]),
])
def test_check_command_states_what_was_checked(tmp_path, capsys, argv, lines):
    spec = tmp_path / "mlp.toml"
    spec.write_text(MLP_SPEC)
    assert run("check", spec, *argv) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out
    assert "sampled" not in out if argv == ["--entries", "all"] else True


@pytest.mark.parametrize("value", ["0", "-3", "many", "1.5"])
def test_check_entries_must_be_positive_or_all(tmp_path, capsys, value):
    spec = tmp_path / "mlp.toml"
    spec.write_text(MLP_SPEC)
    with pytest.raises(SystemExit) as e:
        run("check", spec, "--entries", value)
    assert e.value.code == 2
    assert "--entries" in capsys.readouterr().err


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty,step,expect_lines", [
    (True, 0.2, 0),       # a terminal: a tqdm bar, erased at the end
    (False, 0.2, 0),      # a log, quick steps: nothing within 10 s
    (False, 6.0, 10),     # a log, slow steps: a plain line every 10 s
])
def test_check_progress(tty, step, expect_lines):
    stream, clock = _Stream(tty), _Clock()
    p = _Progress(20, stream, clock, delay=0 if tty else 0.5, redraw=0)
    for name in ("W1", "b1"):
        for k in range(10):
            clock.t += step
            p(name, k, 10)
        p(name, 10, 10)
    p.close()
    text = stream.getvalue()
    assert ("\r" in text) == tty
    assert text.count("\n") == expect_lines
    if tty:
        assert "checking b1: entry" in text and "20/20 entries" in text
        assert text.rstrip(" ").endswith("\r")        # tqdm erases its line (leave=False)
    if expect_lines:
        assert "checking b1: entry 5 of 10; 15 of 20 entries\n" in text


# ---- memory limits before allocation --------------------------------------------------------

HUGE_DENSE = """
[network]
input = { size = 1000000 }
target = { size = 1 }
[[network.layers]]
units = 1000000
activation = "tanh"
[[network.layers]]
units = 1
"""

# three 8192x8192 matrices: 1.5 GiB of float64, under the default cap, over a 1 GiB one
BIG_MATRIX = """
[matrix]
inputs = { x = [8192, 1] }
targets = { y = [1, 1] }
params = { A = [8192, 8192], B = [8192, 8192], C = [8192, 8192], w = [1, 8192] }
output = "w*(A*x + B*x + C*x)"
"""

MEMORY = [
    # (spec, extra options, words the message must contain)
    (HUGE_DENSE, [], ["7.28 TiB in float64", "W1 1000000x1000000", "limit is 16 GiB", "--max-param-memory"]),
    (HUGE_DENSE, ["--dtype", "float32"], ["3.64 TiB in float32", "W1 1000000x1000000"]),
    (BIG_MATRIX, ["--max-param-memory", "1GiB"], ["1.5 GiB in float64", "A 8192x8192: 512 MiB", "limit is 1 GiB"]),
]


@pytest.mark.parametrize("target", ["numpy", "c"])
@pytest.mark.parametrize("text,options,words", MEMORY)
def test_compile_refuses_parameters_over_the_limit(tmp_path, capsys, text, options, words, target):
    spec = tmp_path / "big.toml"
    spec.write_text(text)
    # refused from the declared shapes, before any allocation or sizing loop: CPU time (this
    # process's own, which other processes on a loaded machine hardly change) stays small
    t0 = time.process_time()
    assert run("compile", spec, "--target", target, "-o", tmp_path / ("out" if target == "c" else "big.py"),
               *options) == 2
    assert time.process_time() - t0 < 30
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert "Traceback" not in err and not list(tmp_path.glob("out*")) and not (tmp_path / "big.py").exists()


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize("text,options,words", [m for m in MEMORY if "--dtype" not in m[1]])
def test_check_and_train_refuse_before_allocating(tmp_path, capsys, command, text, options, words):
    spec = tmp_path / "big.toml"
    spec.write_text(text)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 1)), y=np.zeros((2, 1)))
    argv = ["check", spec] if command == "check" else ["train", spec, "--data", data, "--out", tmp_path / "p.npz"]
    assert run(*argv, *options) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("command", ["check", "train"])
def test_physical_memory_bounds_the_commands_that_allocate(tmp_path, capsys, monkeypatch, command):
    # under the cap (none), but more than this (pretend) machine holds
    monkeypatch.setattr(limits, "physical_memory", lambda: 1024**3)
    spec = tmp_path / "big.toml"
    spec.write_text(BIG_MATRIX)
    argv = ["check", spec] if command == "check" else ["train", spec, "--data", tmp_path / "d.npz"]
    assert run(*argv, "--max-param-memory", "none") == 2
    err = capsys.readouterr().err
    assert "more than this machine's 1 GiB of memory" in err and "copies of 1.5 GiB" in err


@pytest.mark.parametrize("text,expected", [
    ("16GiB", 16 * 1024**3), ("500MB", 500 * 1000**2), ("2e9", 2 * 10**9), ("1024", 1024),
    ("1.5k", 1500), ("64 gib", 64 * 1024**3), ("none", None), ("unlimited", None),
])
def test_parse_size(text, expected):
    assert limits.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "abc", "16 GB of RAM", "0", "inf", "nan"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        limits.parse_size(text)


def test_a_model_under_the_limit_is_untouched(tmp_path, capsys):
    spec = tmp_path / "mlp.toml"
    spec.write_text(MLP_SPEC)
    assert run("compile", spec, "-o", tmp_path / "mlp.py", "--max-param-memory", "100KB") == 0
    assert run("compile", spec, "-o", tmp_path / "mlp.py", "--max-param-memory", "10KB") == 2
    assert "the parameters would need 10.3 KiB in float64" in capsys.readouterr().err


def test_over_the_cap_compiles_when_raised_and_a_generated_module_is_checked_before_training(tmp_path, capsys):
    spec = tmp_path / "big.toml"
    spec.write_text(HUGE_DENSE)
    module = tmp_path / "big.py"
    # compiling allocates nothing: with the cap lifted, the module is written
    assert run("compile", spec, "-o", module, "--max-param-memory", "none") == 0
    capsys.readouterr()
    # training that module would: its PARAMS are estimated before init_params
    assert run("train", module, "--data", tmp_path / "d.npz", "--out", tmp_path / "p.npz") == 2
    err = capsys.readouterr().err
    assert "big.py: the parameters would need 7.28 TiB in float64" in err and "W1 1000000x1000000" in err


def test_training_progress_bar_and_log_lines(capsys):
    # bpc train's reporter on a terminal: a tqdm bar on stderr with the status after it, log
    # lines on stdout (drawn above the bar), the bar erased at the end
    from compiler.train.loop import _Reporter
    stream = _Stream(True)
    r = _Reporter(True, 4, stream)
    r.progress.bar.mininterval = r.progress.bar.delay = 0
    for step in range(4):
        r.advance(1, f"epoch 1/1 loss {1.0 / (step + 1):.4g}")
    r.log("epoch 1/1  loss 0.25")
    r.close()
    bar = stream.getvalue()
    assert "4/4 steps" in bar and "loss 0.25" in bar and bar.rstrip(" ").endswith("\r")
    assert capsys.readouterr().out == "epoch 1/1  loss 0.25\n"


def test_training_progress_off_a_terminal_is_silent(capsys):
    from compiler.train.loop import _Reporter
    stream = _Stream(False)
    r = _Reporter(True, 4, stream)
    r.advance(4, "epoch 1/1")
    r.log("epoch 1/1  loss 0.25")
    r.close()
    assert stream.getvalue() == "" and capsys.readouterr().out == "epoch 1/1  loss 0.25\n"
