"""MetaSchedule tuning: a tiny budget, the database on disk, reuse without new trials."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_relief.deploy import TuningConfig, compile_for_target, load_compiled


@pytest.mark.slow
def test_tuned_compile_matches_and_reuses_its_database(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU()).eval()
    x = torch.randn(4, 32)
    config = TuningConfig(trials=2, work_dir=tmp_path / "db", population_size=16, genetic_iters=1)
    compiled = compile_for_target(model, x, tuning=config)
    assert config.tuned_tasks >= 1
    records = (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()
    assert records and all(json.loads(line) for line in records)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert compiled.metadata["tuned"] and compiled.metadata["dynamic_batch"] is False
    # a second compile of the same workloads only applies the database
    again = TuningConfig(trials=2, work_dir=tmp_path / "db", population_size=16, genetic_iters=1)
    rebuilt = compile_for_target(model, x, tuning=again)
    assert again.tuned_tasks == 0
    # an empty database with no budget: the untuned operators are named, not silently left at default loops
    with pytest.warns(UserWarning, match=r"trials=0\): 1 operator\(s\) have no record for target"):
        compile_for_target(model, x, tuning=TuningConfig(trials=0, work_dir=tmp_path / "empty"))
    # pre-packed weights survive save and load
    loaded = load_compiled(rebuilt.save(tmp_path / "artifact"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    # tuned code has a fixed batch; run_batched splits other batch sizes
    big = torch.randn(10, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(loaded.run_batched(big)[0]), model(big), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected shape"):
        loaded(big)


class _TwoSizes(nn.Module):
    """A large and a tiny linear layer: two tuning tasks some thousand times apart in cost."""

    def __init__(self) -> None:
        super().__init__()
        self.big, self.small = nn.Linear(512, 512), nn.Linear(4, 4)

    def forward(self, x):
        return self.big(x[:, :512]).sum(1, keepdim=True) + self.small(x[:, 512:])


@pytest.mark.slow
def test_trials_go_to_the_costly_operator(tmp_path):
    """After one round each, MetaSchedule's gradient scheduler spends the rest of the budget where latency
    times weight is largest (the even split gave every operator ceil(trials / tasks))."""
    config = TuningConfig(trials=12, trials_per_round=4, work_dir=tmp_path / "db", population_size=8, genetic_iters=1)
    compile_for_target(_TwoSizes().eval(), torch.randn(16, 516), tuning=config)
    assert config.tuned_tasks == 2
    seconds: dict[int, list[float]] = {}  # measured run time of each candidate, by workload
    for line in (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines():
        workload, (_trace, run_secs, *_rest) = json.loads(line)
        seconds.setdefault(workload, []).append(min(run_secs))
    big, small = sorted(seconds, key=lambda w: min(seconds[w]), reverse=True)
    assert (len(seconds[big]), len(seconds[small])) == (8, 4), seconds


def test_tuning_config_validates():
    assert TuningConfig.coerce(None) is None and TuningConfig.coerce(8).trials == 8
    with pytest.raises(ValueError, match="trials must be"):
        TuningConfig(trials=-1)
    with pytest.raises(ValueError, match="trials_per_round"):
        TuningConfig(trials_per_round=0)
    with pytest.raises(ValueError, match="dynamic_batch=True cannot be tuned"):
        compile_for_target(nn.Linear(2, 2), torch.zeros(1, 2), tuning=1, dynamic_batch=True)
