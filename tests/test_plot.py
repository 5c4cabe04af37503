"""fnn.plot figures inspected as matplotlib objects (issue 18, defect 12): labelled y-axes,
the restored best epoch marked, no panel for a constant learning rate, a decision-boundary
plot with axis labels and a class legend."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")
from fnn import plot  # noqa: E402

HISTORY = {"epoch": [1, 2, 3, 4], "loss": [1.0, 0.6, 0.5, 0.45],
           "val_loss": [1.1, 0.7, 0.65, 0.7], "accuracy": [0.5, 0.7, 0.8, 0.85],
           "val_accuracy": [0.45, 0.65, 0.75, 0.7], "grad_norm": [2.0, 1.0, 0.8, 0.7]}


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save, kept open for inspection."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        return path
    monkeypatch.setattr(plot, "_save", keep)
    yield kept
    import matplotlib.pyplot as plt
    for fig in kept:
        plt.close(fig)


def titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_every_panel_has_a_y_label_and_the_best_epoch_is_marked(figures):
    plot.training_curves({**HISTORY, "lr": [1e-3, 5e-4, 2e-4, 1e-4]}, "c.png", best_epoch=3)
    fig, = figures
    assert titles(fig) == ["loss", "accuracy", "learning rate", "gradient norm"]
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert fig.axes[0].get_ylabel().startswith("loss") and "learning rate" in \
        fig.axes[2].get_ylabel()
    for ax in fig.axes:
        marks = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [3, 3]]
        assert len(marks) == 1, ax.get_title()
        assert "best epoch 3 (restored)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_constant_learning_rate_gets_no_panel(figures):
    plot.training_curves({**HISTORY, "lr": [0.05] * 4}, "c.png")
    fig, = figures
    assert len(fig.axes) == 3 and "learning rate" not in titles(fig)
    assert "constant learning rate 0.05" in fig.axes[0].get_title()
    assert all(not ln.get_xdata().size or list(ln.get_xdata()) != [3, 3]
               for ax in fig.axes for ln in ax.get_lines())                 # no best mark


def test_decision_boundary_has_axis_labels_and_class_legend(figures):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 2)), np.arange(30) % 3
    plot.decision_boundary(lambda g: np.stack([g[:, 0], g[:, 1], -g[:, 0]], axis=1), x, y,
                           "b.png", resolution=20)
    plot.decision_boundary(lambda g: 1 / (1 + np.exp(-g[:, 0])), x, (y > 0)[:, None] * 1.0,
                           "b2.png", resolution=20, xlabel="x1", ylabel="x2",
                           class_names=["XOR 0", "XOR 1"])
    multi, binary = figures
    ax = multi.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("$x_1$", "$x_2$")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["class 0", "class 1",
                                                                   "class 2"]
    ax = binary.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x1", "x2")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["XOR 0", "XOR 1"]
    assert len(binary.axes) == 2                                 # the plot and its colour bar
