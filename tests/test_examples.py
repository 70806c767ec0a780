"""The example scripts run on the shipped pair and print what they promise."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(autouse=True)
def _own_grad_mode():
    """The scripts switch autograd off for their process, as scripts may; the tests after
    these run in this process, so grad mode is given back."""
    with torch.enable_grad():
        yield


def test_research_claims_example(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["research_claims.py"])
    runpy.run_path(str(EXAMPLES / "research_claims.py"), run_name="__main__")
    out = capsys.readouterr().out
    for marker in ("0. labels per part", "calibrated", "update energy labelled new",
                   "1. MLP: update energy share", "2. attention OV", "2. attention QK",
                   "3. representations on 64 prompts", "outside_share"):
        assert marker in out


def test_token_readouts_example(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["token_readouts.py"])
    runpy.run_path(str(EXAMPLES / "token_readouts.py"), run_name="__main__")
    out = capsys.readouterr().out
    for marker in ("== medical", "== math", "weight lens, best update direction",
                   "weight lens, best base direction", "activation-difference lens, layer 3"):
        assert marker in out
