"""Blocked terms: normalization (NFKC, case, zero-width), whole words, regular expressions,
the terms file's format and its startup errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from qwenserve.cli.compose import load_prompt_policy, screens
from qwenserve.config import Settings
from qwenserve.policy import PolicyConfigError
from qwenserve.policy.classifier import load_classifier
from qwenserve.policy.prompt import PromptPolicy, normalize, prompt_policy

TERMS = """
# a comment, then a blank line

forbidden fruit
Nsfw
x.x.x
re:\\bb[a@]d\\s*word\\b
"""


@pytest.fixture
def policy() -> PromptPolicy:
    return PromptPolicy.from_lines(TERMS.splitlines())


@pytest.mark.parametrize(
    "text",
    [
        "a still life with forbidden fruit",
        "FORBIDDEN FRUIT",  # case
        "Forbidden\tFruit",  # any whitespace between words
        "ｆｏｒｂｉｄｄｅｎ ｆｒｕｉｔ",  # full width
        "forb\u200bidden fr\u200duit",  # zero-width space and joiner
        "for\u00adbidden fruit",  # soft hyphen
        "\ufeffnsfw",  # a byte-order mark in front
        "ＮＳＦＷ art",
        "forbidden-fruit!",  # any punctuation between the words
        "rated X.X.X",  # a term with non-word characters
        "a b@d word here",  # regex
        "a Ｂ＠Ｄ WORD here",  # regex, after normalization
    ],
)
def test_blocked_spellings(policy: PromptPolicy, text: str) -> None:
    assert policy.blocks(text)


@pytest.mark.parametrize(
    "text",
    [
        "a bowl of fruit",
        "forbiddenfruit",  # not the term as whole words
        "unforbidden fruitcake",
        "nsfwish",
        "x.x.xy",
        "a notbadword",  # the regex wants a word boundary before 'b'
        "",
    ],
)
def test_allowed_texts(policy: PromptPolicy, text: str) -> None:
    assert not policy.blocks(text)


def test_normalize_folds_width_case_and_invisible_characters() -> None:
    assert normalize("Ｆｏ\u200bo\u2060Ｂａｒ ß") == "foobar ss"


def test_blocked_field_names_the_first_field_that_matches(policy: PromptPolicy) -> None:
    fields = {"prompt": "a cat", "negative_prompt": "NSFW, blurry"}
    assert policy.blocked_field(fields) == "negative_prompt"
    assert policy.blocked_field({"prompt": "a cat", "negative_prompt": None}) is None


def test_an_invalid_regex_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "terms.txt"
    path.write_text("ok term\n# comment\nre:(unclosed\n", encoding="utf-8")
    with pytest.raises(PolicyConfigError, match=r"terms.txt line 3: invalid regular expression"):
        PromptPolicy.load(path)
    settings = Settings(data_dir=tmp_path, content_policy="prompt", blocked_terms_file=path)
    with pytest.raises(SystemExit, match="line 3"):
        load_prompt_policy(settings)


def test_a_missing_terms_file_is_a_startup_error(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, content_policy="prompt", blocked_terms_file=tmp_path / "nope.txt"
    )
    with pytest.raises(SystemExit, match="cannot read the blocked terms file"):
        load_prompt_policy(settings)


@pytest.mark.parametrize("mode", ["prompt", "prompt+output", "all"])
def test_a_policy_without_a_terms_file_is_a_startup_error(tmp_path: Path, mode: str) -> None:
    settings = Settings(data_dir=tmp_path, content_policy=mode)  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="needs a blocked terms file"):
        load_prompt_policy(settings)


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="content_policy"):
        Settings(data_dir=tmp_path, content_policy="strict")  # type: ignore[arg-type]


def test_off_by_default_and_an_empty_file_blocks_nothing(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).content_policy == "off"
    assert prompt_policy(Settings(data_dir=tmp_path)) is None
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing blocked yet\n", encoding="utf-8")
    policy = prompt_policy(
        Settings(data_dir=tmp_path, content_policy="prompt", blocked_terms_file=empty)
    )
    assert policy is not None and not policy.blocks("anything at all")


def test_screens_follow_the_mode(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")

    def made(mode: str) -> tuple[bool, bool]:
        settings = Settings(
            data_dir=tmp_path,
            content_policy=mode,  # type: ignore[arg-type]
            blocked_terms_file=empty if mode != "off" else None,
            nsfw_classifier="tests.policy_classifiers:RedClassifier",
        )
        output, inputs = screens(settings)
        return output is not None, inputs is not None

    assert made("off") == (False, False)
    assert made("prompt") == (False, False)
    assert made("prompt+output") == (True, False)
    assert made("all") == (True, True)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_colon_here", "expected 'package.module:callable'"),
        ("tests.no_such_module:X", "cannot be loaded"),
        ("tests.policy_classifiers:Missing", "cannot be loaded"),
        ("tests.policy_classifiers:not_a_classifier", "no score method"),
    ],
)
def test_a_bad_classifier_name_is_a_clear_error(spec: str, needle: str) -> None:
    with pytest.raises(PolicyConfigError, match=needle):
        load_classifier(spec)


def test_a_factory_function_is_a_classifier_too() -> None:
    from PIL import Image

    classifier = load_classifier("tests.policy_classifiers:flag_everything")
    assert classifier.score(Image.new("RGB", (4, 4))) == 1.0
