"""Answer extraction and matching on tricky model outputs."""

from __future__ import annotations

import pytest

from vlorp_lightning.data.answers import extract_number, normalize_number, numbers_match
from vlorp_lightning.data.commonsense import parse_answer_format
from vlorp_lightning.data.gsm8k import gsm8k_final_answer
from vlorp_lightning.data.records import unknown_name_message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("So she earns 18 dollars.\n#### 1,234", "1234", id="hash-thousands"),
        pytest.param("####   -5", "-5", id="hash-spaces-negative"),
        pytest.param("#### $1,234.50", "1234.5", id="hash-dollar-decimal"),
        pytest.param("#### 18\n\nQuestion: how many? #### 6", "18", id="first-hash-wins"),
        pytest.param("Step 1: 3 + 4 = 7. The answer is 12 apples.", "12", id="answer-is-with-unit"),
        pytest.param("THE ANSWER IS: **42**", "42", id="answer-is-case-bold"),
        pytest.param("The final answer is $7.", "7", id="final-answer-is-dollar-period"),
        pytest.param("The answer is -3.25%.", "-3.25", id="answer-is-percent"),
        pytest.param("I bought 3 apples and 4 pears, so 7 fruits.", "7", id="last-number"),
        pytest.param("10 - 5 = 5", "5", id="subtraction-not-negative"),
        pytest.param("x = -4.", "-4", id="negative-trailing-period"),
        pytest.param("It costs 12.0 dollars", "12", id="integral-decimal"),
        pytest.param("about 0.50 of it", "0.5", id="trailing-zero"),
        pytest.param("half is .5", "0.5", id="leading-dot"),
        pytest.param("The total is 1,000,000 grains", "1000000", id="millions"),
        pytest.param("She has 5 cats and 1,2,3 lists", "3", id="comma-list-not-thousands"),
        pytest.param("-$3 is the change", "-3", id="negative-dollar"),
        pytest.param("no digits at all", None, id="no-number"),
        pytest.param("", None, id="empty"),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", "1234"),
        ("$ 12", "12"),
        ("-0", "0"),
        ("0.500", "0.5"),
        ("100", "100"),
        ("1e3", "1000"),
        ("12.", "12"),
        ("abc", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_numbers_match_by_value():
    assert numbers_match("1,000", "1000.0")
    assert numbers_match("-7", "-7.00")
    assert not numbers_match("7", "-7")
    assert not numbers_match(None, "7")
    assert not numbers_match("seven", "7")


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert gsm8k_final_answer("Total 1,234 + 1 = 1,235\n#### 1,235") == "1235"
    assert gsm8k_final_answer("He loses 3.\n#### -3") == "-3"
    assert gsm8k_final_answer("no marker 18") is None
    assert gsm8k_final_answer("#### eighteen") is None


def test_parse_answer_format():
    instruction = "Please choose ... Answer2: x\n\nAnswer format: answer1/answer2/answer3"
    assert parse_answer_format(instruction) == ("answer1", "answer2", "answer3")
    assert parse_answer_format("Option1: a Option2: b Answer format: option1/option2") == ("option1", "option2")
    assert parse_answer_format("Answer format: true/false\n") == ("true", "false")
    assert parse_answer_format("no format line") is None


def test_unknown_name_message_close_matches():
    message = unknown_name_message("Owner", "task", "boolqq", ["boolq", "piqa"])
    assert "unknown task 'boolqq'" in message
    assert "Did you mean ['boolq']?" in message
    assert "Valid names: ['boolq', 'piqa']" in message
    listed = unknown_name_message("Owner", "task", "zzz", ["boolq"], listing="the docs")
    assert "Did you mean" not in listed
    assert "See the docs for the 1 valid names." in listed
