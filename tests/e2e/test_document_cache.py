"""A teacher cache kept by document (``teacher.cache_layout=documents``): ``python -m trainer.cache`` runs a small
Llama of a 380-token BPE over the corpus's documents once, and two students of two other tokenizers (a 300-token
BPE, and one trained on the same text in upper case) train from that one cache through span alignment, at their own
block sizes and seeds. A cache of another teacher, corpus, k or temperature is refused in one line."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.conftest import preflight_in_process, read_metrics, run_cli, stopped_and_resumed
from tests.data_files import documents, save_llama, save_tokenizer
from tests.e2e.test_cross_tokenizer import RUN as LIVE_RUN

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

CACHE = ["teacher.placement=cache", "teacher.cache_layout=documents", "teacher.cache_dtype=compact",
         "teacher.cache_dir=documents_cache", "distill.top_k=8", "teacher.cache_window=24"]  # fmt: skip
RUN = [  # the live cross-tokenizer runs', less what each student sets
    *(arg for arg in LIVE_RUN if not arg.startswith(("data.tokenizer=", "student.path=", "student.block_size="))),
    *CACHE,
]
STUDENTS = {  # each student's tokenizer, block size and seed: none of them is the cache's concern
    "student_a": ["data.tokenizer=tok300", "student.path=student_a", "student.block_size=16", "train.seed=1"],
    "student_b": ["data.tokenizer=tok300_upper", "student.path=student_b", "student.block_size=12", "train.seed=2"],
}
# the share of its positions each student meets the teacher at, at least: the first's BPE was trained on the same
# text (its tokens end where the teacher's do, but where the teacher merged further); the upper-case one reads the
# corpus's lower case nearly byte by byte, and meets the teacher at word ends only
ALIGNED = {"student_a": 0.3, "student_b": 0.1}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("document_cache")
    save_llama(root / "teacher", 420, seed=1, tokenizer=save_tokenizer(root / "tok420", 420))  # the BPE stops at 380
    save_llama(root / "student_a", 300, seed=0, tokenizer=save_tokenizer(root / "tok300", 300))
    save_llama(root / "student_b", 300, seed=3, tokenizer=save_tokenizer(root / "tok300_upper", 300, other=True))
    (root / "corpus").mkdir()
    for i, text in enumerate(documents(40)):
        (root / "corpus" / f"{i:03d}.md").write_text(text)
    return root


@pytest.fixture(scope="module")
def built(root) -> str:
    """The cache, built once with the first student's overrides; the line it ends with."""
    proc = run_cli(root, *RUN, *STUDENTS["student_a"], "hydra.run.dir=build", module="trainer.cache")
    return proc.stderr.strip().splitlines()[-1]


def test_the_cache_holds_every_document_in_the_teachers_tokens(built):
    match = re.fullmatch(
        r"teacher cache documents_cache: kept by document, 40 documents, (\d+) teacher tokens in (\d+) windows of "
        r"at most 24, top-8 of 380 \(compact\), ([\d.]+) bytes per teacher token on disk",
        built,
    )
    assert match, built
    tokens, windows, on_disk = int(match[1]), int(match[2]), float(match[3])
    assert windows >= 40 and tokens >= 40 * 20  # every document, each at least a window; ~100 words each
    # a position's rows: 6 + 6 value bytes, the ids of 8 of 380 (Elias-Fano: 10 bytes), the tail, its key, checksums,
    # its token; and the teacher's 380 token keys in vocab.json
    assert 40 < on_disk < 80


@pytest.mark.parametrize("student", sorted(STUDENTS))
def test_two_students_of_other_tokenizers_train_from_the_one_cache(root, built, student):
    proc = run_cli(root, *RUN, *STUDENTS[student], f"hydra.run.dir={student}")
    said = [line for line in proc.stderr.splitlines() if "kept by document, read through span" in line]
    assert len(said) == 1 and said[0].startswith("teacher cache documents_cache: kept by document, read through "
                                                 "span alignment (the teacher's tokenizer has 380 tokens, the "
                                                 "student's 300; ")  # fmt: skip
    shared = int(said[0].split("; ")[1].split()[0])
    # the same text's 300-token BPE is all in the 380-token one; the upper-case one shares its bytes and a little more
    assert shared == 300 if student == "student_a" else 50 <= shared < 300
    assert not list((root / "documents_cache").glob("*.tmp"))
    rows = read_metrics(root / student)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert ALIGNED[student] < row["distill/aligned_fraction"] <= 1 and 0 < row["distill/shared_mass"] <= 1
        assert math.isfinite(row["distill/kd"]) and row["distill/kd"] > 0
    assert (root / student / "final" / "config.json").is_file()


@pytest.mark.slow  # three runs; the rows a step reads are a function of the step's batch (the test above)
def test_a_run_from_the_cache_resumes_exactly(root, built):
    resumed, whole = stopped_and_resumed(root, "resume_cached", *RUN, *STUDENTS["student_b"])
    assert [row["step"] for row in resumed] == [row["step"] for row in whole] == [1, 2, 3]
    for got, want in zip(resumed, whole, strict=True):
        for key in ("train/loss", "distill/kd", "distill/aligned_fraction", "distill/shared_mass"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)


@pytest.mark.parametrize(
    "override, differs",
    [
        ("teacher.checkpoint=student_a", "teacher '"),
        ("data.files=[corpus/00*.md]", "corpus '"),
        ("distill.top_k=16", "k 8 != 16"),
        ("distill.temperature=1.0", "temperature 2.0 != 1.0"),
    ],
)
def test_a_cache_of_another_teacher_corpus_k_or_temperature_is_refused_in_one_line(root, built, monkeypatch,
                                                                                    override, differs):  # fmt: skip
    code, lines = preflight_in_process(root, monkeypatch, *RUN, *STUDENTS["student_a"], override, "hydra.run.dir=no")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("config error: teacher.cache_dir: documents_cache was written for another teacher, "
                               "corpus, k or temperature (cache vs this run: "), lines  # fmt: skip
    assert differs in lines[0]
    assert not (root / "no").exists()


@pytest.mark.slow  # the cache of batches' garbled row stops a run the same way in the default tier
def test_a_garbled_row_stops_the_run_in_one_line_naming_the_file(root, built, tmp_path):
    import shutil

    shutil.copytree(root / "documents_cache", tmp_path / "garbled")
    tail = tmp_path / "garbled" / "tail.bin"
    tail.write_bytes(bytes(byte ^ 1 for byte in tail.read_bytes()))  # every row's tail: the first read is garbled
    proc = run_cli(root, *RUN, *STUDENTS["student_a"], f"teacher.cache_dir={tmp_path / 'garbled'}",
                   "hydra.run.dir=garbled", check=False)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert f"{tail} is garbled at teacher position " in errors[0] and "Traceback" not in proc.stderr


def test_an_ensemble_of_a_cached_member_and_a_live_one_trains(root, built):
    """``teacher.members`` places each member: one read from the cache kept by document (its k the cache's:
    ``distill.top_k`` unset), one live; each member's KD and alignment are logged, the KD is their weighted sum."""
    members = ("[{checkpoint: teacher, weight: 0.3, placement: cache, cache_dir: documents_cache}, "
               "{checkpoint: teacher, weight: 0.7}]")  # fmt: skip
    run = [arg for arg in RUN if not arg.startswith(("teacher", "distill.top_k"))]
    run_cli(root, *run, *STUDENTS["student_a"], "teacher=ensemble", f"teacher.members={members}", "hydra.run.dir=ens")
    rows = read_metrics(root / "ens")
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        weighted = 0.3 * row["distill/kd/member0"] + 0.7 * row["distill/kd/member1"]
        assert row["distill/kd"] == pytest.approx(weighted, rel=1e-6) and row["distill/kd/member0"] > 0
        assert ALIGNED["student_a"] < row["distill/aligned_fraction/member0"] <= 1
        assert 0 < row["distill/aligned_fraction/member1"] <= 1


def test_a_cached_member_without_its_cache_is_refused_in_one_line(root, monkeypatch):
    run = [arg for arg in RUN if not arg.startswith(("teacher", "distill.top_k"))]
    members = "[{checkpoint: teacher, placement: cache}, {checkpoint: teacher}]"
    code, lines = preflight_in_process(root, monkeypatch, *run, *STUDENTS["student_a"], "teacher=ensemble",
                                       f"teacher.members={members}", "hydra.run.dir=no")  # fmt: skip
    assert code == 2 and lines == ["config error: teacher.members.0.cache_dir: a member with placement cache names its "
                                   "cache kept by document (python -m trainer.cache teacher.cache_layout=documents "
                                   "...)"], lines  # fmt: skip


@pytest.mark.slow  # the cache of batches is built the same way by a run in the default tier (test_teacher_cache.py)
def test_a_run_with_cache_build_writes_the_cache_kept_by_document_first(root):
    run = [arg for arg in RUN if not arg.startswith("teacher.cache_dir=")]
    proc = run_cli(root, *run, *STUDENTS["student_b"], "teacher.cache_dir=built_by_run", "teacher.cache_build=true",
                   "hydra.run.dir=cache_build")  # fmt: skip
    assert "teacher cache built_by_run missing or unfinished: building it" in proc.stderr
    assert (root / "built_by_run" / "manifest.json").is_file()
    assert [row["step"] for row in read_metrics(root / "cache_build")] == [1, 2, 3]
