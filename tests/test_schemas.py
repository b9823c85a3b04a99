"""Every field of every config schema refuses a value of the wrong type: one line, exit 2, no run dir.

The cases are generated from the schemas themselves (`config.schemas()`), so a field added to a
dataclass is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from partial_lora import config
from partial_lora.errors import PlrError


def _takes_str(hint) -> bool:
    if hint is str:
        return True
    if typing.get_origin(hint) is typing.Literal:
        return any(isinstance(a, str) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes_str(a) for a in typing.get_args(hint))
    return False


def _cases() -> list[tuple[str, str]]:
    """(override, key) per field: a list where a string is expected, else a string."""
    out = []
    for group, cls in config.schemas().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            wrong = "[1]" if _takes_str(hints[f.name]) else "abc"
            out.append((f"++{group}.{f.name}={wrong}", f"{group}.{f.name}"))
    scalars = {"adapter.r": "abc", "adapter.alpha": "abc", "adapter.dropout": "abc", "seed": "abc"}
    return out + [(f"{k}={v}", k) for k, v in scalars.items()]


CASES = _cases()


def test_the_cases_cover_every_schema_field():
    fields = sum(len(dataclasses.fields(cls)) for cls in config.schemas().values())
    assert len(CASES) == fields + 4 and fields > 100


class TestValidate:
    """In one Hydra context (a class fixture: the CLI tests below start their own)."""

    @pytest.fixture(scope="class", autouse=True)
    def hydra_conf(self):
        from hydra import initialize_config_module

        with initialize_config_module("partial_lora.conf", version_base="1.3"):
            yield

    @pytest.mark.parametrize("override, key", CASES, ids=[c[0] for c in CASES])
    def test_validate_refuses_a_wrong_type_naming_the_key(self, override, key):
        from hydra import compose

        cfg = compose("config", overrides=["experiment=smoke", override])
        with pytest.raises(PlrError) as e:
            config.validate(cfg)
        assert key in str(e.value) and "\n" not in str(e.value) and "must be" in str(e.value), e.value


# Through the CLI: the first field of each schema, and the top-level scalars.
CLI_CASES = [next(c for c in CASES if c[1].startswith(g + ".")) for g in config.schemas()] + CASES[-4:]


@pytest.mark.parametrize("override, key", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_a_wrong_type_is_one_line_exit_2_and_no_run_dir(override, key, tmp_path, capsys, monkeypatch):
    from partial_lora import cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "experiment=smoke", override, f"run_dir={run_dir}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plr: error:") and "\n" not in err and "Traceback" not in err, err
    assert key in err, err
    assert not run_dir.exists()
