"""``python -m benchmarks.llm_kd_study --quick`` on a small random Llama teacher: with no published CE rows for its
overrides it trains its own, then the chosen variants on the same seed, each after the variant it is paired with;
the JSON pairs each run with that seed's run of its reference and the results fragment is written under ``--out``
(docs/results.md and benchmarks/results stay as they are)."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.llm_kd_study import END, RESULTS_DOC, START, STUDY_JSON
from tests.conftest import run_cli
from tests.data_files import save_recipe_files

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="the recipe needs the `hf` extra")


def test_quick_study_pairs_every_variant_with_the_ce_run_of_its_seed(tmp_path):
    save_recipe_files(tmp_path)
    section = RESULTS_DOC.read_text().partition(START)[2].partition(END)[0]
    before = STUDY_JSON.read_bytes() if STUDY_JSON.exists() else None
    args = ["--quick", "--out", str(tmp_path), "--teacher", "llama", "--files", "corpus/*.py", "--seeds", "1",
            "--variants", "full_vocab", "t2_alpha0.5", "lr1e-3_kd"]  # fmt: skip
    keys = ["full_vocab", "t2_alpha0.5", "lr1e-3_ce", "lr1e-3_kd"]  # lr1e-3_kd's reference trained first
    proc = run_cli(tmp_path, *args, module="benchmarks.llm_kd_study", timeout=900)
    assert proc.stdout.startswith("plan: 4 variants x 1 seeds of 4 steps")
    results = json.loads((tmp_path / "llm_kd_study.json").read_text())
    assert results["ce_source"] == "runs of this study" and results["seeds"] == [1337]
    assert [v["key"] for v in results["variants"]] == keys
    loss = {v["key"]: v["runs"][0]["val_loss"] for v in results["variants"]} | {None: results["ce"][0]["val_loss"]}
    for variant in results["variants"]:
        assert variant["paired"]["deltas"] == [loss[variant["key"]] - loss[variant["against"]]]
    # the recipe trains at lr 1e-3 now: its lr variant's CE run is the study's own CE run again, to the bit
    assert results["variants"][3]["against"] == "lr1e-3_ce" and loss["lr1e-3_ce"] == loss[None]
    assert any("_T2.0_" in cache.name for cache in (tmp_path / "teacher_cache").iterdir())
    fragment = (tmp_path / "README_llm_kd_study.md").read_text()
    assert all(f"| {key} |" in fragment for key in keys) and "| pruned + CE |" in fragment
    again = run_cli(tmp_path, *args, "--reuse", module="benchmarks.llm_kd_study", timeout=900)
    trained = re.compile(r"^\S+: \d+ s$", re.MULTILINE)  # train() prints a line for each run it trains
    assert len(trained.findall(proc.stdout)) == 1 + len(keys) and not trained.search(again.stdout), again.stdout
    assert json.loads((tmp_path / "llm_kd_study.json").read_text())["variants"] == results["variants"]
    assert RESULTS_DOC.read_text().partition(START)[2].partition(END)[0] == section
    assert (STUDY_JSON.read_bytes() if STUDY_JSON.exists() else None) == before
