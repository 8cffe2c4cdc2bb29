"""Small data handled honestly: a manifest with fewer rows than the batch trains on batches of its rows, each row
once per batch (a repeated row would be its own negative), and says so."""

import pytest

from synergy.train.config import TrainConfig
from synergy.train.data import DataError, EpochBatches, batch_for_rows
from synergy.train.datasets.synth import synthesize_tiny

ROWS = 5


@pytest.fixture(scope="module")
def five_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize_tiny(out, missing_rate=0.0)
    lines = (out / "train.csv").read_text().splitlines()
    (out / "five.csv").write_text("\n".join(lines[: ROWS + 1]) + "\n")
    return out / "five.csv"


def test_a_manifest_smaller_than_the_batch_trains_on_batches_of_its_distinct_rows_and_warns(
    tmp_path, five_rows, monkeypatch
):
    import synergy.train.loop as loop

    batches, real_step = [], loop.train_step

    def record(model, batch, *args, **kwargs):
        batches.append(batch["indices"])
        return real_step(model, batch, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", record)
    config = TrainConfig(
        model="tiny", data=str(five_rows), out=str(tmp_path / "run"), batch_size=8, steps=3, warmup_steps=1,
        workers=0, save_every=100, seed=3,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="5 rows, fewer than batch_size 8: training on batches of 5"):
        loop.train(config, progress=False)
    assert len(batches) == 3
    for indices in batches:
        assert len(indices) == len(set(indices)) == ROWS, batches


def test_the_fitted_batch_is_a_multiple_of_processes_and_micro_batches():
    assert batch_for_rows(8, 100) == 8  # enough rows: untouched, no warning
    with pytest.warns(UserWarning, match="batches of 4"):
        assert batch_for_rows(8, 5, multiple=2) == 4
    with pytest.raises(DataError, match="fewer than the 4 processes x micro-batches"):
        batch_for_rows(8, 3, multiple=4)


def test_the_sampler_never_repeats_a_row_within_a_batch():
    with pytest.raises(DataError, match="batch_size 8 exceeds the 5 rows"):
        EpochBatches(5, 8, seed=0, start_step=0, total_steps=4)
    for batch in EpochBatches(7, 3, seed=0, start_step=0, total_steps=9):
        rows = [row for row, _ in batch]
        assert len(rows) == len(set(rows)) == 3
