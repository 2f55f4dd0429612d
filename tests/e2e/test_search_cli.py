"""``python -m trainer.search`` on a small random Llama teacher (4 layers, 64 wide): it enumerates the cuts within the
budget, scores each as cut, trains the best two briefly, ranks them after training and names the winner; a rerun
reads its plan back and trains nothing again; a student not cut from the teacher, or a budget no cut meets, is one
config-error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST, preflight_in_process, run_cli, save_hf_student
from trainer import search
from trainer.config import SearchConfig
from trainer.cut import CutConfig
from trainer.cut import cut as cut_model

pytestmark = pytest.mark.e2e
transformers = pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

RUN = [
    *(arg for arg in FAST if not arg.startswith("student.")),
    "student=from_teacher", "student.block_size=16", "student.calib_batches=2", "teacher=hf",
    "teacher.checkpoint=llama", "distill=kd", "data.eval_batches=2",
]  # fmt: skip
SEARCH = ["search.budget=0.5", "search.top=2", "search.tokens=1280", "search.evals=2", "search.layers=[2,3,4]"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search")
    save_hf_student(root / "llama", "llama")
    return root


def test_the_best_cuts_as_cut_are_trained_ranked_after_training_and_a_rerun_trains_nothing(root):
    proc = run_cli(root, *RUN, *SEARCH, module="trainer.search")
    result = json.loads((root / "search" / "search.json").read_text())
    rows = result["candidates"]
    assert len(rows) >= 4 and all(0.85 * result["budget"] <= r["non_embedding"] <= result["budget"] for r in rows)
    trained = [r for r in rows if r["loss_after"] is not None]
    assert sorted(r["rank_as_cut"] for r in trained) == [1, 2]  # the two best as cut
    assert sorted(r["rank_after"] for r in trained) == [1, 2]
    for row in trained:
        assert row["curve"][0] == [0, row["loss_as_cut"]] and row["curve"][-1] == [1280, row["loss_after"]]
        assert row["loss_after"] < row["loss_as_cut"]
        assert row["gap_recovered"] is None or row["gap_recovered"] > 0  # None: the random teacher is worse as cut
        config = json.loads((root / "search" / row["name"] / "final" / "config.json").read_text())
        assert (config["num_hidden_layers"], config["hidden_size"]) == (row["layers"], round(64 * row["hidden_width"]))
    winner = min(trained, key=lambda r: r["loss_after"])
    assert result["winner"]["name"] == winner["name"]
    assert f"winner: {winner['name']}: student.layers={winner['layers']} " in proc.stdout
    assert (root / "search" / "search.png").stat().st_size > 0
    again = run_cli(root, *RUN, *SEARCH, module="trainer.search")
    assert "candidates of at most" not in again.stderr  # the plan was read back, not scored again
    assert again.stderr.count("holds this run, finished") == 2
    assert json.loads((root / "search" / "search.json").read_text()) == result


def test_candidates_are_the_largest_cut_within_the_budget_at_each_depth_and_width():
    """Counted on the meta device (parameters linear in the depth) and equal to the real cut's count."""
    import torch

    from tests.conftest import small_hf_config
    from trainer import models

    torch.manual_seed(0)
    teacher = models.build("hf", hf_config=small_hf_config("llama").to_dict())
    config = SearchConfig(budget=0.5, layers=[2, 3, 4])
    base = CutConfig(block_size=16)
    with torch.device("meta"):
        meta = models.build("hf", hf_config=small_hf_config("llama").to_dict())
    budget = search.budget_of(config, search.parameters(meta))
    assert budget == int(0.5 * search.parameters(teacher)[1])
    found = search.enumerate_candidates(meta, base, config)
    assert found and all(0.85 * budget <= c.non_embedding <= budget for c in found)
    for c in found:
        assert search.parameters(cut_model(teacher, c.cut_config(base), [])) == (c.params, c.non_embedding)
        bigger = [
            search.parameters(cut_model(teacher, CutConfig(layers=c.layers, width=w, mlp_width=m,
                                                           hidden_width=c.hidden_width), []))[1]
            for w in (0.5, 1.0) for m in config.mlp_widths
        ]  # fmt: skip
        assert max(n for n in bigger if n <= budget) == c.non_embedding  # nothing larger fits at that shape


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["student=tiny"], "config error: student: python -m trainer.search cuts the student out of the teacher: "
         "use student=from_teacher"),
        (["search.count=all"], "config error: search.count: must be one of non_embedding, total (got 'all')"),
        (["search.slack=1"], "config error: search.slack: must be in [0, 1) (got 1.0)"),
    ],
)  # fmt: skip
def test_bad_searches_are_one_config_error_line(root, monkeypatch, overrides, line):
    from trainer.cli.search import check

    run = [a for a in RUN if not a.startswith("student")] if overrides[0].startswith("student=") else RUN
    code, lines = preflight_in_process(root, monkeypatch, *run, *SEARCH, *overrides, check=check)
    assert code == 2 and lines == [line], lines


def test_a_budget_no_cut_meets_is_one_line_before_any_training(root):
    proc = run_cli(root, *RUN, *SEARCH, "search.budget=10", "search.dir=bad", module="trainer.search", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "config error: search.budget: no cut of the grid holds between 0.85 and 1 x the budget of 10 non_embedding "
        "parameters (widen search.slack or the grids)"
    ), proc.stderr
    assert not (root / "bad").exists()


@pytest.mark.slow  # a rerun after every candidate finished runs in the default tier (the first test)
def test_a_killed_search_goes_on_with_the_candidates_it_had_not_finished(root):
    """SIGKILL once the first candidate's run is finished and the second's has begun: the same command keeps the
    first (its metrics byte for byte), finishes the second and ranks both."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import cli_env

    args = [*RUN, *SEARCH, "search.tokens=6400", "search.dir=killed"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.search", *args], cwd=root, env=cli_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        plan = root / "killed" / "plan.json"
        if plan.is_file():
            names = sorted(json.loads(plan.read_text())["candidates"], key=lambda c: c["loss_as_cut"])[:2]
            first, second = (root / "killed" / search.from_json(c).name for c in names)
            if (first / "report.json").is_file() and (second / "metrics.jsonl").is_file():
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "killed" / "search.json").exists()
    kept = (first / "metrics.jsonl").read_bytes()
    again = run_cli(root, *args, module="trainer.search")
    assert again.stderr.count("holds this run, finished") == 1  # the first candidate; the second resumed or restarted
    assert (first / "metrics.jsonl").read_bytes() == kept
    result = json.loads((root / "killed" / "search.json").read_text())
    assert sorted(r["rank_after"] for r in result["candidates"] if r["rank_after"]) == [1, 2]
