"""On-policy distillation's parts: incremental decoding with a key/value cache, sampling as a function of (seed,
step, sample index), the divergence on the student's samples against a float64 reference, and a teacher equal to
the student giving a zero loss and a zero gradient."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import small_hf_config
from tests.kd_reference import per_token_divergence
from trainer import data, models
from trainer.config import DataConfig, DistillConfig
from trainer.data import IGNORE_INDEX, Batches, Shard
from trainer.distill.interface import TeacherOutput
from trainer.distill.losses import logit_losses
from trainer.distill.on_policy import OnPolicy, Rollout, completion_labels, fused_mixed_losses, mixed
from trainer.distill.placement import LiveTeacher
from trainer.distill.sampling import Completions, generate, on_policy_rows, prompt_lengths, sample, sample_seed
from trainer.models.protocol import KVCache

VOCAB, BLOCK = 32, 16


def gpt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("gpt", vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK).eval()


def hf_model(kind: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    from trainer.models.hf import from_transformers

    torch.manual_seed(0)
    return from_transformers(transformers.AutoModelForCausalLM.from_config(small_hf_config(kind)), None).eval()


def generators(seed: int, step: int, rows: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, step, i)) for i in rows]


@pytest.mark.parametrize("family", ["gpt", "llama", "qwen2", "gpt2"])
def test_incremental_decoding_equals_the_full_forward(family):
    """The logits of a prompt read at once, then one position at a time through the cache, are the full forward's."""
    model = gpt() if family == "gpt" else hf_model(family)
    x = torch.randint(VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = KVCache()
        steps = [model(x[:, :5], cache=cache)]
        steps += [model(x[:, t : t + 1], cache=cache) for t in range(5, BLOCK)]
    assert cache.length == BLOCK
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_incremental_decoding_keeps_a_sliding_window():
    """A Mistral whose 4-position window is shorter than the sequence: each position read through the cache sees
    only its window, as in the full forward (transformers' sdpa attention drops the window when given no mask)."""
    transformers = pytest.importorskip("transformers")
    from trainer.models.hf import from_transformers

    base = small_hf_config("llama").to_dict()
    config = transformers.MistralConfig(**{**base, "sliding_window": 4, "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = from_transformers(transformers.AutoModelForCausalLM.from_config(config), None).eval()
    x = torch.randint(VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        unwindowed = from_transformers(
            transformers.AutoModelForCausalLM.from_config(
                transformers.MistralConfig(**{**config.to_dict(), "sliding_window": None})
            ),
            None,
        )
        unwindowed.load_state_dict(model.state_dict())
        assert not torch.allclose(unwindowed.eval()(x)[:, 4:], full[:, 4:], atol=1e-3)  # the window matters here
        cache = KVCache()
        steps = [model(x[:, :3], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(3, BLOCK)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_cache_changes_no_sampled_token():
    """Sampling with the cache writes what recomputing the whole prefix for every token writes."""
    model = gpt()
    x = torch.randint(VOCAB, (4, BLOCK + 1), generator=torch.Generator().manual_seed(2))
    prompts = torch.tensor([3, 5, 5, 8])
    options = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, eos=None, pad=0)
    with_cache = generate(model, x, prompts, generators(7, 3, [0, 1, 2, 3]), **options)

    class NoCache(torch.nn.Module):  # a family without a cache: the whole prefix every time
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return self.inner(idx)

    from trainer.models.protocol import FAMILIES, ModelFamily

    class NoCacheFamily(ModelFamily):
        name, model_class = "no_cache_test", NoCache

        def layers(self, model):
            return {}

        def width(self, model):
            return 32

        def vocab_size(self, model):
            return VOCAB

    FAMILIES["no_cache_test"] = NoCacheFamily()
    try:
        without = generate(NoCache(model), x, prompts, generators(7, 3, [0, 1, 2, 3]), **options)
    finally:
        del FAMILIES["no_cache_test"]
    assert torch.equal(with_cache.tokens, without.tokens)
    assert with_cache.lengths.tolist() == [6, 6, 6, 6]
    # each row keeps its prompt and pads after its completion
    for row, p in enumerate(prompts.tolist()):
        assert torch.equal(with_cache.tokens[row, :p], x[row, :p])
        assert (with_cache.tokens[row, p + 6 :] == 0).all()


def test_sampling_is_a_function_of_seed_step_and_sample_index():
    """A sample's completion does not depend on the rows decoded beside it; another step or index changes it."""
    model = gpt()
    x = torch.randint(VOCAB, (4, BLOCK + 1), generator=torch.Generator().manual_seed(3))
    prompts = torch.full((4,), 4)
    options = dict(max_new_tokens=10, temperature=1.0, top_p=1.0, eos=None, pad=0)
    together = generate(model, x, prompts, generators(1337, 5, [8, 9, 10, 11]), **options).tokens
    for row in range(4):
        alone = generate(model, x[row : row + 1], prompts[:1], generators(1337, 5, [8 + row]), **options).tokens
        assert torch.equal(alone[0], together[row])
    other_step = generate(model, x, prompts, generators(1337, 6, [8, 9, 10, 11]), **options).tokens
    assert not torch.equal(other_step, together)
    assert len({sample_seed(1337, 5, i) for i in range(100)} | {sample_seed(1337, 6, 0), sample_seed(1, 5, 0)}) == 102


def test_sampling_follows_the_distribution_with_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(sample(logits, uniforms, 1.0, 1.0), minlength=4).double() / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0].double(), -1), atol=0.01, rtol=0)
    nucleus = torch.bincount(sample(logits, uniforms, 1.0, 0.8), minlength=4).double() / 20000
    p = torch.softmax(logits[0].double(), -1)
    assert nucleus[2:].sum() == 0  # 0.665 + 0.245 reach 0.8: the last two are cut
    torch.testing.assert_close(nucleus[:2], p[:2] / p[:2].sum(), atol=0.01, rtol=0)
    assert sample(logits[:2], uniforms[:2], 0.0, 1.0).tolist() == [0, 0]  # temperature 0: greedy


def test_rows_chosen_per_step_and_prompts_of_chat_rows():
    rows = on_policy_rows(1337, 4, 8, 0.5)
    assert rows.sum() == 4 and torch.equal(rows, on_policy_rows(1337, 4, 8, 0.5))
    assert on_policy_rows(1337, 4, 8, 0.0).sum() == 0 and on_policy_rows(1337, 4, 8, 1.0).all()
    assert not all(torch.equal(rows, on_policy_rows(1337, s, 8, 0.5)) for s in range(5, 10))
    # chat: the prompt runs up to the last assistant turn (labels t predict token t + 1)
    y = torch.full((1, 10), IGNORE_INDEX)
    y[0, 2:4] = 1  # a first assistant turn: tokens 3-4
    y[0, 6:9] = 1  # the last one: tokens 7-9
    assert prompt_lengths(torch.zeros(1, 10), y, True, 4).tolist() == [7]
    assert prompt_lengths(torch.zeros(2, 10), y.repeat(2, 1), False, 4).tolist() == [4, 4]


def completions_of(student, x, prompts) -> Completions:
    return generate(
        student,
        x,
        prompts,
        generators(0, 0, list(range(len(x)))),
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
        eos=None,
        pad=0,
    )


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("fused", [False, True])
def test_divergence_on_samples_equals_a_float64_reference(kind, fused):
    """The on-policy part (lmbda = 1) is the mean, over the completion tokens only, of the per-token divergence of
    the two models' distributions at the sampled positions, computed here in float64 from the same ids and logits."""
    student, teacher = gpt(0), gpt(1)
    x = torch.randint(VOCAB, (3, BLOCK + 1), generator=torch.Generator().manual_seed(4))
    c = completions_of(student, x, torch.tensor([4, 6, 4]))
    inputs, labels = c.tokens[:, :-1], completion_labels(c)
    assert (labels != IGNORE_INDEX).sum() == 24
    d = DistillConfig(loss=kind, alpha=1.0, temperature=2.0, beta=0.3, lmbda=1.0)
    with torch.no_grad():
        s_logits, t_logits = student(inputs), teacher(inputs)
    rollout = Rollout(inputs, torch.full_like(labels, IGNORE_INDEX), labels, torch.ones(3, dtype=torch.bool), c)
    t_out = TeacherOutput(logits=t_logits)
    if fused:
        out = student(inputs, head=lambda h, w, b: fused_mixed_losses(h, w, b, rollout, t_out, d))
    else:
        on = logit_losses(student(inputs), labels, t_out, dataclasses.replace(d, alpha=1.0))
        out = mixed(None, on, rollout, torch.zeros(()))
    kept = labels != IGNORE_INDEX
    p_s = torch.softmax(s_logits[kept].double() / 2.0, -1)
    p_t = torch.softmax(t_logits[kept].double() / 2.0, -1)
    reference = 4.0 * per_token_divergence(p_s, p_t, kind, beta=0.3).mean()
    # fp32 log-softmax against float64: about 1e-7 per token (the tolerance of tests/unit/test_losses.py)
    assert float(out["train/loss"].detach()) == pytest.approx(float(reference), rel=1e-5, abs=1e-6)
    assert float(out["distill/on_policy"]) == pytest.approx(float(reference), rel=1e-5, abs=1e-6)
    # and it is that divergence, not another: the other kinds' references differ by more than the tolerance
    others = [4.0 * per_token_divergence(p_s, p_t, k, beta=0.3).mean() for k in ("reverse_kl", "forward_kl", "jsd")]
    assert sum(abs(float(o) - float(reference)) < 1e-6 for o in others) == 1


def synthetic_batches(batch_size: int = 4) -> Batches:
    dataset = data.build(DataConfig(name="synthetic"), BLOCK)
    return Batches(dataset, Shard(), 1337, batch_size, torch.device("cpu"))


@pytest.mark.parametrize("fused", [False, True])
def test_a_teacher_equal_to_the_student_gives_zero_loss_and_zero_gradient(fused):
    student = gpt(0).train()
    teacher = LiveTeacher(copy.deepcopy(student).eval().requires_grad_(False), "replicate", fused=fused)
    batches = synthetic_batches()
    d = DistillConfig(loss="reverse_kl", alpha=1.0, lmbda=1.0, max_new_tokens=8, prompt_tokens=4)
    on_policy = OnPolicy(d, batches)
    x, y = batches.train(0)
    out = on_policy.losses(student, student, teacher, x, y, 0, 0, fused, torch.autocast("cpu", enabled=False))
    out["train/loss"].backward()
    assert float(out["train/loss"].detach()) == pytest.approx(0.0, abs=1e-7)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) < 1e-7
    stats = on_policy.pop_stats()
    assert stats[2] == 4 * 8 and stats[3] == 4  # 4 rows of 8 completion tokens each
    assert student.training  # generation put the training mode back
    # a different teacher: a loss and a gradient (the test above could not pass by computing nothing)
    other = LiveTeacher(gpt(1).requires_grad_(False), "replicate", fused=fused)
    student.zero_grad()
    out = on_policy.losses(student, student, other, x, y, 0, 0, fused, torch.autocast("cpu", enabled=False))
    out["train/loss"].backward()
    assert float(out["train/loss"].detach()) > 1e-3
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) > 1e-4


def test_teacher_logprob_is_the_teachers_log_probability_of_the_sampled_tokens():
    student, teacher_model = gpt(0).train(), gpt(1).requires_grad_(False)
    batches = synthetic_batches()
    on_policy = OnPolicy(DistillConfig(loss="reverse_kl", alpha=1.0, lmbda=0.5, prompt_tokens=5), batches)
    x, y = batches.train(3)
    autocast = torch.autocast("cpu", enabled=False)
    on_policy.losses(student, student, LiveTeacher(teacher_model, "replicate"), x, y, 3, 0, False, autocast)
    stats = on_policy.pop_stats()
    rows = on_policy.rows(3, 0)
    assert rows.sum() == 2 and stats[3] == 2
    tokens = torch.stack([torch.tensor(t) for _, t, _, _ in on_policy.examples])
    with torch.no_grad():
        log_p = F.log_softmax(teacher_model(tokens[:, :-1]).double(), -1)
    written = [(i, t) for i, (_, _, p, n) in enumerate(on_policy.examples) for t in range(p, p + n)]
    expected = sum(float(log_p[i, t - 1, tokens[i, t]]) for i, t in written)
    assert float(stats[1]) == pytest.approx(expected, rel=1e-5)
    assert [index for index, *_ in on_policy.examples] == rows.nonzero().flatten().tolist()
