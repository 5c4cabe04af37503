"""fnn.summary returns the table without printing it (issue 18, defect 6): a notebook shows the
returned value once, laid out, and a script prints it."""
import re

from fnn import summary
from fnn.layers import Dense, Relu, serial

MODEL = serial(Dense(100), Relu(), ("head", Dense(3)))


def test_summary_does_not_print_by_default(capsys):
    text = summary(MODEL, (4, 20))
    assert capsys.readouterr().out == ""
    assert isinstance(text, str)
    assert re.search(r"head\s+Dense\(3\)\s+\(4, 3\)\s+303", text)


def test_summary_repr_is_the_table_itself():
    text = summary(MODEL, (4, 20))
    assert repr(text) == str(text)                       # no quotes, no escaped newlines
    assert "\n" in repr(text) and "\\n" not in repr(text)
    lines = []

    class Printer:                                       # IPython's pretty-printer protocol
        def text(self, s):
            lines.append(s)
    text._repr_pretty_(Printer(), False)
    assert lines == [str(text)]


def test_summary_print_fn_called_once_when_given(capsys):
    text = summary(MODEL, (4, 20), print_fn=print)
    assert capsys.readouterr().out == str(text) + "\n"
