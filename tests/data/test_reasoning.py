"""The verifiable arithmetic task of the M1 pipeline: solutions checked against Python's own arithmetic,
the binary reward on hand-written completions, determinism, disjoint splits, completion-only SFT rows."""
import numpy as np
import pytest

from mamba_jax.data import CharTokenizer, TextLMData, pack_documents
from mamba_jax.data import reasoning as r

TOK = r.tokenizer()


def test_solution_is_worked_by_hand():
    p = r.solve(12, [("-", (7, 3)), ("+", (45,))])
    assert p.prompt == "12-7*3+45="
    assert p.completion == "7*3=21;12-21=-9;-9+45=36;#36"
    assert p.answer == 36
    assert r.solve(-5, [("-", (0,))]) == r.Problem("-5-0=", "-5-0=-5;#-5", -5)


@pytest.mark.parametrize("task", [r.ArithmeticTask(), r.ArithmeticTask(max_terms=6, max_digits=3, product_prob=0.4,
                                                                       product_digits=2)])
def test_answers_equal_python_arithmetic_and_every_step_is_right(task):
    for i in range(300):
        p = task.problem(3, i)
        assert p.answer == eval(p.prompt[:-1])          # Python's precedence: products first
        steps = p.completion.split(";")[:-1]
        for step in steps:                              # each step a true equation
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs), step
        assert r.reward(p.completion, p.answer) == 1.0
        assert set(p.prompt + p.completion) <= set(r.ALPHABET)


@pytest.mark.parametrize("completion, value", [
    ("41-9=32;#32", 1.0),            # correct
    ("#32", 1.0),                    # no steps: still well formed
    ("41-9=31;#32", 1.0),            # a wrong step, right answer: only the answer is rewarded (as M1)
    ("41-9=32;#31", 0.0),            # wrong answer
    ("41-9=32;", 0.0),               # missing marker
    ("41-9=32;#", 0.0),              # marker without a number
    ("41-9=32;#32;", 0.0),           # trailing text
    ("41-9=32;#32#32", 0.0),         # two markers
    ("41-9=32;#032", 0.0),           # not canonical
    ("41-9=32#32", 0.0),             # a step without its ';'
    ("41-9;#32", 0.0),               # a step without '='
    ("", 0.0),
])
def test_reward_on_hand_written_completions(completion, value):
    assert r.reward(completion, 32) == value


def test_reward_negative_and_zero_answers():
    assert r.reward("5-9=-4;#-4", -4) == 1.0
    assert r.reward("5-5=0;#0", 0) == 1.0
    assert r.reward("5-5=0;#-0", 0) == 0.0     # "-0" is not canonical
    assert r.parse_answer("3+4=7;#7") == 7 and r.parse_answer("3+4=7;#7x") is None


def test_problems_are_deterministic_and_depend_on_seed_and_index():
    task = r.ArithmeticTask(max_digits=3)
    a = task.problems(7, 50)
    assert a == task.problems(7, 50)
    assert a != task.problems(8, 50)
    assert len({p.prompt for p in a}) > 40


def test_splits_are_disjoint_by_construction():
    # a small problem space (1-digit terms, 2 terms: 10 * 2 * 10 * ~1.25 prompts), so that a split rule that
    # did not hold would show: the raw generator does produce prompts of both splits
    task = r.ArithmeticTask(max_terms=2, max_digits=1, eval_fraction=0.3)
    rng = np.random.default_rng(0)
    raw = {task.draw(rng).prompt for _ in range(2000)}
    assert {r.split_of_prompt(p, 0.3) for p in raw} == {"train", "eval"}
    train = {p.prompt for p in task.problems(0, 2000, "train")}
    held_out = {p.prompt for p in task.problems(1, 40, "eval", distinct=True)}
    assert len(held_out) == 40
    assert not train & held_out
    assert all(r.split_of_prompt(p, 0.3) == "eval" for p in held_out)
    with pytest.raises(ValueError, match="distinct"):
        task.problems(0, 500, "eval", distinct=True)     # ~380 prompts in all, ~30 % of them eval


def test_sft_rows_predict_the_completion_and_eos_only_and_keep_documents_whole():
    problems = r.ArithmeticTask(max_terms=5).problems(0, 30)
    rows = r.sft_rows(problems, TOK, 96)
    docs = []
    for i in range(rows["input_ids"].shape[0]):
        for s in np.unique(rows["seq_idx"][i]):
            at = rows["seq_idx"][i] == s
            ids = rows["input_ids"][i][at]
            if ids[0] == TOK.pad_id:
                assert not rows["loss_mask"][i][at].any()
                continue
            assert ids[0] == TOK.bos_id                     # every document starts in its row
            targets = rows["targets"][i][at][rows["loss_mask"][i][at]]
            assert targets[-1] == TOK.eos_id
            docs.append((TOK.decode(ids), TOK.decode(targets[:-1])))
    assert docs == [(p.prompt + p.completion, p.completion) for p in problems]
    with pytest.raises(ValueError, match="seq_len"):
        r.sft_rows(problems, TOK, 16)


def test_sft_rows_feed_the_grain_pipeline():
    rows = r.sft_rows(r.ArithmeticTask().problems(0, 64), TOK, 64)
    data = TextLMData(rows, TOK, seed=0, batch_size=4)
    b = data.batch(3)
    assert b["input_ids"].shape == b["seq_idx"].shape == (4, 64)
    assert data.batch(3)["input_ids"].tolist() == b["input_ids"].tolist()
    assert data.num_tokens == sum(len(p.completion) + 1 for p in r.ArithmeticTask().problems(0, 64))


def test_pack_documents_prompt_lengths_without_bos_by_hand():
    rows = pack_documents([np.array([5, 6, 7, 8])], 6, eos_id=1, pad_id=0, prompt_lengths=[2])
    # inputs 5 6 7 8, targets 6 7 8 EOS: token 6 is prompt (index 1 < 2), 7, 8 and EOS are predicted
    assert rows["targets"][0].tolist() == [6, 7, 8, 1, 0, 0]
    assert rows["loss_mask"][0].tolist() == [False, True, True, True, False, False]
    rows = pack_documents([np.array([5, 6, 7]), np.array([8, 9])], 4, eos_id=1, pad_id=0, bos_id=2,
                          prompt_lengths=[1, 0], split_documents=False)
    assert rows["input_ids"].tolist() == [[2, 5, 6, 7], [2, 8, 9, 0]]
    assert rows["loss_mask"].tolist() == [[False, True, True, True], [True, True, True, False]]
    assert rows["seq_idx"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="prompt_lengths"):
        pack_documents([np.array([5, 6])], 4, eos_id=1, pad_id=0, prompt_lengths=[3])


def test_prompt_batch_is_left_padded_and_completions_cut_at_eos():
    ids, mask = r.prompt_batch(["1+2=", "10-3*4="], TOK)
    assert ids.shape == mask.shape == (2, 8)
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]
    assert TOK.decode(ids[0]) == "1+2=" and ids[0, 3] == TOK.bos_id
    gen = np.full((3, 8), TOK.pad_id)
    gen[0, :7] = np.concatenate([TOK.encode("1+2=3;#3"[:6]), [TOK.eos_id]])         # "1+2=3;" then EOS
    gen[1, :4] = np.concatenate([TOK.encode("#3"), [TOK.eos_id], TOK.encode("7")])  # text after EOS ignored
    gen[2] = TOK.encode("1+2=3;#3")                                                 # no EOS: cut by the limit
    assert r.completion_texts(gen, TOK) == ["1+2=3;", "#3", None]
    assert r.completion_rewards(gen, [3, 3, 3], TOK).tolist() == [0.0, 1.0, 0.0]


def test_majority_vote():
    assert r.majority_vote([3, None, 4, 4, 3, 4]) == 4
    assert r.majority_vote([3, 4, 4, 3]) == 3          # a tie goes to the answer seen first
    assert r.majority_vote([None, None]) is None


def test_char_tokenizer():
    tok = CharTokenizer("ab;")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (6, 3, 4, 5)
    assert tok.encode("ba;").tolist() == [1, 0, 2]
    assert tok.decode([3, 1, 0, 4, 5]) == "ba"
    with pytest.raises(ValueError, match="'c'"):
        tok.encode("abc")
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer("aa")


@pytest.mark.parametrize("task", [r.ArithmeticTask(), r.ArithmeticTask(max_terms=6, max_digits=3, product_prob=0.5,
                                                                       product_digits=2, negative_first=1.0)])
def test_length_bounds_hold(task):
    problems = task.problems(0, 3000)
    assert max(len(p.prompt) for p in problems) <= task.max_prompt_chars
    assert max(len(p.completion) for p in problems) <= task.max_completion_chars
    # a bound, not a blank cheque: generation budgets are sized from it
    assert task.max_completion_chars <= 2 * max(len(p.completion) for p in problems)
