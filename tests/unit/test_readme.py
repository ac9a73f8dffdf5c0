"""README opens with the two commands and documents every setting."""

from __future__ import annotations

import dataclasses
import pathlib

from common.config import EncoderConfig, LanguageConfig

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_opens_with_make_demo_and_make_test():
    block = README.split("```", 2)[1]
    assert "make demo" in block and "make test" in block


def test_every_setting_is_in_the_readme_table():
    for cls in (EncoderConfig, LanguageConfig):
        for f in dataclasses.fields(cls):
            assert f"`--{f.name.replace('_', '-')}`" in README, f.name
            assert f"`EPD_{f.name.upper()}`" in README, f.name
