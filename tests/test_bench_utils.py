"""`mamba_jax.bench_utils`: mean ± sd over seeds, and the markdown table, against hand computations."""
import math

import pytest

from mamba_jax.bench_utils import markdown_table, mean_and_sd


def test_mean_and_sd_by_hand():
    assert mean_and_sd([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(math.sqrt(7 / 3)))  # Σ(x−m)² = 14/3
    assert mean_and_sd([1.0, 2.0, 4.0], ddof=0)[1] == pytest.approx(math.sqrt(14 / 9))
    assert mean_and_sd([0.5]) == (0.5, 0.0)
    assert mean_and_sd([1.0, None]) == (None, None)       # a missing value is not averaged away
    assert mean_and_sd([]) == (None, None)


def test_markdown_table_rows_and_header():
    table = markdown_table(["a", "b"], [[1, 0.5], ["x", None]])
    lines = table.splitlines()
    assert lines[0].startswith("| a | b |") and set(lines[1]) <= set("|-: ")
    assert len(lines) == 4 and "| x |" in lines[3]
