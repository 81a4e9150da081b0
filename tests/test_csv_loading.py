"""CSV data files read the same, and fail with the same line/column messages, whichever reader
parses the numbers: pandas' C reader (when installed), numpy.loadtxt, or the careful csv-module
reader that explains faults (issue 15, item 4)."""
import sys

import numpy as np
import pytest

import compiler
from compiler.train import data
from compiler.train.loop import TrainError

READERS = ["pandas", "loadtxt", "careful"]


@pytest.fixture(scope="module")
def module():
    # x: 2 numbers per sample, y: a class label of 3 classes
    return compiler.compile_model(compiler.mlp([2, 4, 3], loss="softmax_cross_entropy")).load()


@pytest.fixture(params=READERS)
def read(request, monkeypatch, module):
    if request.param == "pandas":
        pytest.importorskip("pandas")
    elif request.param == "loadtxt":
        monkeypatch.setitem(sys.modules, "pandas", None)      # import pandas raises ImportError
    else:
        monkeypatch.setattr(data, "_fast_values", lambda *a: None)
    return lambda path: data.load_data(path, module)


GOOD = [
    ("header", "x0,x1,y\n1,2,0\n3.5,-4e-3,2\n"),
    ("no header", "1,2,0\n3.5,-4e-3,2\n"),
    ("comments and blank lines", "# made by hand\nx0,x1,y\n\n1,2,0\n# a note\n3.5,-4e-3,2\n\n"),
    ("spaces around numbers", "x0, x1, y\n1 , 2,0\n 3.5,-4e-3 ,2\n"),
    ("CRLF line ends", "x0,x1,y\r\n1,2,0\r\n3.5,-4e-3,2\r\n"),
    ("byte order mark", "\ufeffx0,x1,y\n1,2,0\n3.5,-4e-3,2\n"),
    ("columns in another order", "y,x1,x0\n0,2,1\n2,-4e-3,3.5\n"),
    ("x_0 names", "x_0,x_1,y\n1,2,0\n3.5,-4e-3,2\n"),
    ("quoted numbers", 'x0,x1,y\n"1","2",0\n3.5,-4e-3,"2"\n'),
]


@pytest.mark.parametrize("name, text", GOOD, ids=[g[0] for g in GOOD])
def test_good_files_read_the_same(tmp_path, read, name, text):
    path = tmp_path / "d.csv"
    path.write_bytes(text.encode("utf-8"))
    arrays = read(path)
    np.testing.assert_array_equal(arrays["x"], [[1, 2], [3.5, -4e-3]])
    np.testing.assert_array_equal(arrays["y"], [0, 2])


BAD = [
    ("not a number", "x0,x1,y\n1,2,0\n3,abc,1\n", "line 3, column 2 ('x1'): 'abc' is not a number"),
    ("ragged row", "x0,x1,y\n1,2,0\n3,1\n", "line 3 has 2 columns, expected 3"),
    ("empty cell", "x0,x1,y\n1,,0\n", "line 2, column 2 ('x1'): '' is not a number"),
    ("a comment after a number", "x0,x1,y\n1,2 # two,0\n", "line 2, column 2 ('x1'): '2 # two' is not a number"),
    ("NaN", "x0,x1,y\n1,2,0\nnan,1,1\n", "'x' holds NaN or Inf"),
    ("no rows", "# nothing\n\n", "no data rows"),
    ("header only", "x0,x1,y\n", "a header but no data rows"),
    ("unknown column", "x0,x1,y,id\n1,2,0,7\n", "'id' match no input or target"),
    ("too few columns without a header", "1,2\n", "line 1 has 2 columns; without a header the model needs 3"),
    ("label out of range", "x0,x1,y\n1,2,5\n", "y"),
]


@pytest.mark.parametrize("name, text, message", BAD, ids=[b[0] for b in BAD])
def test_bad_files_fail_with_the_same_message(tmp_path, read, name, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises((TrainError, ValueError)) as info:
        read(path)
    assert message in str(info.value)


def test_a_file_that_is_not_utf8_further_down(tmp_path, read):
    path = tmp_path / "d.csv"
    path.write_bytes(b"x0,x1,y\n1,2,0\n" + b"3,\xff\xfe,1\n")
    with pytest.raises(TrainError, match="not a text CSV file"):
        read(path)
