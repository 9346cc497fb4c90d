"""Built-in tasks: fixed, disjoint splits whose answers their default rewards accept."""
import pytest

from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec


@pytest.mark.parametrize("name", ["arithmetic", "sorting", "countdown"])
def test_splits_are_fixed_disjoint_and_verifiable(name):
    task = registry("task").get(name)
    train, test = task.split("train"), task.split("test")
    assert len(test) == 500 and len(train) >= 10_000
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert task.split("test")[:5] == test[:5]  # the same problems every time
    rewards = RewardSet([RewardSpec(n) for n in task.default_rewards])
    right = [{**r, "completion": r["answer"]} for r in test[:100]]
    components, _ = rewards.compute(right)
    assert components[:, 0].tolist() == [1.0] * 100
    wrong = [{**r, "completion": r["answer"] + "9"} for r in test[:20]]
    assert rewards.compute(wrong)[0][:, 0].sum() < 20


def test_arithmetic_answers_are_sums():
    for record in registry("task").get("arithmetic").split("test")[:50]:
        a, b = record["prompt"].rstrip("=").split("+")
        assert int(record["answer"]) == int(a) + int(b)


def test_unknown_split_is_an_error():
    from rlgen.errors import RlgenError

    with pytest.raises(RlgenError, match="unknown split 'dev'"):
        registry("task").get("sorting").split("dev")
