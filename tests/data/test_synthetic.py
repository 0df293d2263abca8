"""Synthetic tasks: answers checked independently of the generator, determinism, batches, errors."""
import numpy as np
import pytest

from mamba_jax.data import MQARTask, SelectiveCopyTask, example_rng, get_batch, make_dataset, make_task


def _examples(task, n=50, seed=0):
    return [task.example(seed, i) for i in range(n)]


def _check_lm_framing(ex, seq_len):
    assert ex["inputs"].shape == ex["targets"].shape == ex["loss_mask"].shape == (seq_len,)
    assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32 and ex["loss_mask"].dtype == bool
    # next-token targets: targets is inputs shifted left by one
    np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])


@pytest.mark.parametrize("seq_len,m,k", [(16, 2, 4), (64, 8, 8), (20, 10, 3)])
def test_selective_copy_answers_are_the_non_noise_tokens_in_order(seq_len, m, k):
    task = SelectiveCopyTask(seq_len=seq_len, n_tokens_to_copy=m, n_data_tokens=k)
    assert task.vocab_size == k + 2
    for ex in _examples(task):
        _check_lm_framing(ex, seq_len)
        inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
        (sep,) = np.flatnonzero(inputs == task.SEPARATOR)  # exactly one separator
        region = inputs[:sep]
        data_in_region = region[region != task.NOISE]
        answers = targets[mask]
        assert mask.sum() == m
        np.testing.assert_array_equal(answers, data_in_region)
        # the answers are read from the separator on, contiguously, and are data tokens
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(sep, sep + m))
        assert np.all((answers >= 2) & (answers < task.vocab_size))
        assert inputs.max() < task.vocab_size and targets.max() < task.vocab_size


@pytest.mark.parametrize("seq_len,m,k", [(16, 2, 4), (264, 4, 8)])
def test_selective_copy_without_teacher_forcing_feeds_only_markers(seq_len, m, k):
    """The Mamba paper's version: the answer region of the inputs is markers only, so no answer is visible
    when the next is predicted; the noise region, targets and mask are those of the teacher-forced example."""
    forced = SelectiveCopyTask(seq_len=seq_len, n_tokens_to_copy=m, n_data_tokens=k)
    paper = SelectiveCopyTask(seq_len=seq_len, n_tokens_to_copy=m, n_data_tokens=k, teacher_forced=False)
    for i in range(20):
        a, b = forced.example(0, i), paper.example(0, i)
        np.testing.assert_array_equal(b["targets"], a["targets"])
        np.testing.assert_array_equal(b["loss_mask"], a["loss_mask"])
        region = seq_len - m
        np.testing.assert_array_equal(b["inputs"][:region], a["inputs"][:region])
        np.testing.assert_array_equal(b["inputs"][region:], [paper.SEPARATOR] * m)
        # the answers are the data tokens of the noise region, in order, and none of them is in the input
        # after the region
        data = b["inputs"][:region][b["inputs"][:region] != paper.NOISE]
        np.testing.assert_array_equal(b["targets"][b["loss_mask"]], data)
        assert np.all(np.flatnonzero(b["loss_mask"]) >= region)
    with pytest.raises(ValueError, match="`teacher_forced`"):
        SelectiveCopyTask(teacher_forced="no")


def test_selective_copy_positions_vary():
    task = SelectiveCopyTask(seq_len=64, n_tokens_to_copy=8, n_data_tokens=8)
    layouts = {tuple(np.flatnonzero(ex["inputs"][:56] != 0)) for ex in _examples(task, 20)}
    assert len(layouts) == 20  # positions are random, not fixed (that would be the plain copying task)


@pytest.mark.parametrize("seq_len,n,vocab,power_a", [(64, 8, 64, 0.01), (31, 8, 20, 1.0), (128, 16, 100, 0.5)])
def test_mqar_every_query_answer_is_the_value_paired_with_its_key(seq_len, n, vocab, power_a):
    task = MQARTask(seq_len=seq_len, num_kv_pairs=n, vocab_size=vocab, power_a=power_a)
    for ex in _examples(task):
        _check_lm_framing(ex, seq_len)
        inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
        context = inputs[:2 * n]
        keys, values = context[0::2], context[1::2]
        assert len(set(keys.tolist())) == n                         # keys distinct
        assert np.all((keys >= 1) & (keys < vocab // 2))
        assert np.all((values >= vocab // 2) & (values < vocab))
        pairs = dict(zip(keys.tolist(), values.tolist()))
        query_positions = np.flatnonzero(mask)
        assert np.all(query_positions >= 2 * n)                     # queries come after the context
        queried = inputs[query_positions]
        assert sorted(queried.tolist()) == sorted(keys.tolist())    # every key queried exactly once
        for t in query_positions:
            assert targets[t] == pairs[int(inputs[t])]
        # outside the context, only queries and their values are non-blank
        rest = np.ones(seq_len, bool)
        rest[:2 * n] = False
        rest[query_positions] = False
        value_positions = query_positions + 1
        rest[value_positions[value_positions < seq_len]] = False
        assert np.all(inputs[rest] == task.BLANK)


def test_mqar_query_slot_probabilities():
    uniform = MQARTask(seq_len=63, num_kv_pairs=4, vocab_size=32, power_a=1.0)
    np.testing.assert_allclose(uniform.query_slot_probabilities(), np.full(28, 1 / 28))
    skewed = MQARTask(seq_len=63, num_kv_pairs=4, vocab_size=32, power_a=0.01).query_slot_probabilities()
    assert skewed.sum() == pytest.approx(1.0) and np.all(np.diff(skewed) < 0)


def test_examples_are_deterministic_in_seed_split_and_index():
    task = MQARTask(seq_len=64, num_kv_pairs=8, vocab_size=64)
    a, b = task.example(3, 7), task.example(3, 7)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    differs = lambda x, y: not np.array_equal(x["inputs"], y["inputs"])
    assert differs(a, task.example(4, 7))
    assert differs(a, task.example(3, 8))
    assert differs(a, task.example(3, 7, split="eval"))


def test_generated_stream_is_pinned():
    """Golden examples: a change of the generator would silently change old runs' data on resume."""
    copy = SelectiveCopyTask(seq_len=16, n_tokens_to_copy=2, n_data_tokens=4).example(0, 0)["inputs"]
    assert copy.tolist() == [0, 0, 0, 5, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 5]
    mqar = MQARTask(seq_len=16, num_kv_pairs=2, vocab_size=16).example(0, 0)["inputs"]
    assert mqar.tolist() == [6, 10, 5, 9, 6, 10, 0, 0, 0, 0, 5, 9, 0, 0, 0, 0]
    first = example_rng(0, "train", 0).integers(1 << 30)
    assert first == example_rng(0, "train", 0).integers(1 << 30) != example_rng(0, "eval", 0).integers(1 << 30)


def test_batch_i_is_reproducible_and_made_of_examples_i_times_b_onwards():
    task = SelectiveCopyTask(seq_len=32, n_tokens_to_copy=4, n_data_tokens=6)
    ds1 = make_dataset(task, seed=5, batch_size=4, num_batches=10)
    ds2 = make_dataset(task, seed=5, batch_size=4, num_batches=10)
    assert len(ds1) == 10
    batch = get_batch(ds1, 7)
    assert batch["inputs"].shape == (4, 32) and batch["loss_mask"].dtype == bool
    again = ds2[7]
    for name in batch:
        np.testing.assert_array_equal(batch[name], again[name])
        np.testing.assert_array_equal(batch[name], np.stack([task.example(5, 28 + j)[name] for j in range(4)]))
    other_seed = get_batch(make_dataset(task, seed=6, batch_size=4, num_batches=10), 7)
    assert not np.array_equal(batch["inputs"], other_seed["inputs"])
    eval_batch = get_batch(make_dataset(task, seed=5, batch_size=4, num_batches=10, split="eval"), 7)
    assert not np.array_equal(batch["inputs"], eval_batch["inputs"])


def test_bad_arguments_raise_naming_the_argument():
    with pytest.raises(ValueError, match="n_tokens_to_copy"):
        SelectiveCopyTask(seq_len=10, n_tokens_to_copy=6)
    with pytest.raises(ValueError, match="n_data_tokens"):
        SelectiveCopyTask(n_data_tokens=0)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQARTask(seq_len=30, num_kv_pairs=8, vocab_size=64)
    with pytest.raises(ValueError, match="vocab_size"):
        MQARTask(seq_len=64, num_kv_pairs=8, vocab_size=16)
    with pytest.raises(ValueError, match="power_a"):
        MQARTask(power_a=0.0)
    with pytest.raises(ValueError, match="split"):
        SelectiveCopyTask().example(0, 0, split="valid")
    with pytest.raises(ValueError, match="seed"):
        SelectiveCopyTask().example(-1, 0)
    with pytest.raises(ValueError, match="name"):
        make_task("induction")
    ds = make_dataset(SelectiveCopyTask(), seed=0, batch_size=2, num_batches=3)
    with pytest.raises(ValueError, match="index"):
        get_batch(ds, 3)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(SelectiveCopyTask(), seed=0, batch_size=0, num_batches=3)
