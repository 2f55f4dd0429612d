"""Which ranks train and which serve the teacher under ``teacher.placement=remote``."""

import pytest

from parallel.remote import Roles


@pytest.mark.parametrize(
    "world, k, students, served",
    [
        (3, 1, [0, 1], {2: [0, 1]}),
        (4, 2, [0, 1], {2: [0], 3: [1]}),
        (6, 2, [0, 1, 2, 3], {4: [0, 2], 5: [1, 3]}),
    ],
)
def test_the_last_k_ranks_serve_the_students_round_robin(world, k, students, served):
    roles = Roles(world, k)
    assert roles.students == students
    assert [r for r in range(world) if roles.is_teacher(r)] == sorted(served)
    for teacher, served_students in served.items():
        assert roles.served_by(teacher) == served_students
        assert all(roles.server_of(s) == teacher for s in served_students)


@pytest.mark.parametrize("world, k", [(2, 2), (3, 0), (1, 1)])
def test_a_world_without_a_student_or_a_teacher_rank_is_refused(world, k):
    with pytest.raises(AssertionError, match="teacher ranks"):
        Roles(world, k)
