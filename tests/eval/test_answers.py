"""Answer extraction and equivalence against hand-written verdicts."""

import pytest

from ouro_train.eval.answers import AnswerKind, check_answer, extract_answer, is_equivalent, last_boxed

# (prediction, reference, equal?) — what a grader should say, written by hand.
MATH_TRIPLES = [
    (r"\frac12", "0.5", True),
    (r"\frac{1}{2}", "1/2", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    ("x=3", "3", True),
    ("y = -2", "-2", True),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("2, 3", "3, 2", True),
    (r"(0,1]", r"(0, 1]", True),
    (r"\text{(B)}", "B", True),
    ("3.0", "3", True),
    ("1,000", "1000", True),
    (r"90^\circ", "90", True),
    (r"5\text{ cm}", "5", True),
    (r"10\%", "10", True),
    ("x^2+2x+1", "(x+1)^2", True),
    (r"$\frac{14}{3}$", r"\frac{14}{3}", True),
    (r"\pi", r"\pi", True),
    (r"\text{Evelyn}", "Evelyn", True),
    # wrong answers, several of which match the reference partially as strings
    ("12", "123", False),
    ("123", "12", False),
    (r"\frac{1}{23}", r"\frac{1}{2}", False),
    ("-3", "3", False),
    ("0.333", r"\frac13", False),
    (r"[0,1)", r"(0,1]", False),
    (r"\{1,2,3\}", r"\{1,2\}", False),
    (r"2\sqrt{3}", r"2\sqrt{2}", False),
    ("x=4", "4x", False),
    (r"\text{Evelyn}", "Evelina", False),
    ("204", "240", False),
    (r"\pi", "3.14", False),
]


@pytest.mark.parametrize("prediction, reference, equal", MATH_TRIPLES)
def test_math_equivalence(prediction, reference, equal):
    assert is_equivalent(prediction, reference) is equal


@pytest.mark.parametrize("text, boxed", [
    (r"so \boxed{5}.", "5"),
    (r"first \boxed{3} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, \{2\}\}}", r"\{1, \{2\}\}"),
    (r"\boxed{\frac{\sqrt{3}}{2}} is it", r"\frac{\sqrt{3}}{2}"),
    (r"\fbox{7}", "7"),
    (r"no box here", None),
    (r"\boxed{unclosed", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("completion, answer", [
    ("<think>\nmaybe \\boxed{4}\n</think>\n\nSo $x = \\boxed{5}$.", "5"),
    ("<think>\nthe answer is 4\n</think>\n\nThe answer is: 92 km.", "92 km"),
    ("<think>\n\\boxed{4}\n</think>\n\nI am not sure.", None),  # reasoning's boxes do not count
    ("<think>\nstill thinking \\boxed{4}", None),  # cut off inside the think block
    ("A </think> B </think> \\boxed{9}", "9"),  # after the last </think>
    ("No think tags: \\boxed{-1}", "-1"),
    ("So the Answer is   42", "42"),
    ("The answer is 3, but \\boxed{4}", "4"),  # a box wins over a stated answer
])
def test_math_extraction(completion, answer):
    assert extract_answer(completion, AnswerKind.math) == answer


@pytest.mark.parametrize("completion, letter", [
    ("<think>\n(A) looks wrong\n</think>\n\n\\boxed{C}", "C"),
    ("\\boxed{\\text{(B)}}", "B"),
    ("\\boxed{(D)}", "D"),
    ("Answer: C", "C"),
    ("Therefore the answer is (A).", "A"),
    ("**Answer:** B", "B"),
    ("Options (A) and (B) fail, so (D) it is", "D"),
    ("<think>\nAnswer: B\n</think>\n\nno letter here", None),
    ("The answer is Carbon", None),  # a word starting with C is not the letter C
])
def test_choice_extraction(completion, letter):
    assert extract_answer(completion, AnswerKind.choice) == letter


@pytest.mark.parametrize("completion, reference, correct", [
    ("</think>\n\n\\boxed{\\frac12}", "0.5", True),
    ("</think>\n\nThe answer is $2\\sqrt{2}$.", "\\sqrt{8}", True),
    ("</think>\n\n\\boxed{123}", "12", False),
    ("<think>\n\\boxed{12}", "12", False),
])
def test_math_verdicts(completion, reference, correct):
    assert check_answer(completion, reference).correct is correct


def test_choice_verdicts():
    assert check_answer("</think> \\boxed{C}", "C", AnswerKind.choice).correct
    assert not check_answer("</think> \\boxed{C}", "B", AnswerKind.choice).correct
    verdict = check_answer("</think> nothing", "B", AnswerKind.choice)
    assert verdict.extracted is None and not verdict.correct
