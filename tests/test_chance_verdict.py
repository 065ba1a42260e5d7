"""The last line of a run names the figure its 2x-chance verdict is about and never contradicts the ratios
beside it (a newcomer read "mAP@all 2.4x chance, P@100 1.8x chance ... BELOW 2x chance" as a contradiction)."""
import pytest

from utils.metrics import chance_ratios, chance_verdict, final_summary


@pytest.mark.parametrize("ratios,verdict", [
    ({"mAP@all": 2.4, "P@100": 1.8}, "P@100 below 2x chance (mAP@all reaches it)"),
    ({"mAP@all": 1.5, "P@100": 2.1}, "mAP@all below 2x chance (P@100 reaches it)"),
    ({"mAP@all": 6.2, "P@100": 3.0}, "mAP@all and P@100 both at least 2x chance"),
    ({"mAP@all": 1.2, "P@100": 1.1}, "mAP@all and P@100 both below 2x chance"),
    ({"mAP@all": 1.996, "P@100": 2.0}, "mAP@all and P@100 both at least 2x chance"),  # printed as 2.00x
    ({"mAP@all": float("nan"), "P@100": 2.5}, "mAP@all below 2x chance (P@100 reaches it)"),  # nan reaches no bar
    ({"mAP@all": float("nan"), "P@100": float("nan")}, "mAP@all and P@100 both below 2x chance"),
])
def test_the_verdict_names_its_figures(ratios, verdict):
    assert chance_verdict(ratios) == verdict


def test_the_final_line_of_the_newcomers_run():
    metrics = {"mAP@all": 0.0955, "P@100": 0.0702, "chance_mAP": 0.0398}
    ratios, _ = chance_ratios(metrics)
    line = final_summary(metrics, {"mAP@all": 0.0955, "epoch": 9})
    assert f"({ratios['mAP@all']:.2f}x chance)" in line and "BELOW" not in line
    assert "P@100 below 2x chance (mAP@all reaches it)" in line


def test_the_final_line_without_a_chance_level_gives_no_ratio():
    assert chance_ratios({"mAP@all": 0.0, "P@100": 0.0, "chance_mAP": 0.0}) is None
    line = final_summary({"mAP@all": 0.0, "P@100": 0.0, "chance_mAP": 0.0}, {"mAP@all": 0.0, "epoch": 0})
    assert "x chance" not in line and "no chance level" in line and "Best mAP@all 0.0000 at epoch 0." in line
