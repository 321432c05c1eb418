"""The shared helpers every script uses: atomic writes, table rendering, ELECTRA's learning-rate schedule."""

import json
import os

import pandas as pd
import pytest
import torch

from optimization import make_schedule
from outputs import render_table, write_atomically, write_json_atomically, write_text_atomically


def rates(name: str, warmup: int, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_schedule(name, optimizer, warmup, total)
    out = []
    for _ in range(total + 1):
        out.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return out


def test_electra_schedule_decays_over_all_steps_times_warmup():
    # google-research/electra: lr * (1 - step / total) * min(1, step / warmup)
    warmup, total = 10, 100
    got = rates("electra", warmup, total)
    expected = [(1 - s / total) * min(1.0, s / warmup) for s in range(total + 1)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[warmup] == pytest.approx(0.9) and got[-1] == 0.0
    # transformers' linear schedule peaks at 1.0 after warmup: every post-warmup rate is higher.
    linear = rates("linear", warmup, total)
    assert linear[warmup] == pytest.approx(1.0)
    assert all(lin > ele for lin, ele in zip(linear[warmup:-1], got[warmup:-1], strict=True))
    assert linear[55] / got[55] == pytest.approx(1 / 0.9)
    assert rates("electra", 0, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="schedule must be one of"):
        rates("cosine", 1, 2)


def test_atomic_writes_leave_no_partial_output(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_json_atomically(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomically(target, crash)
    assert json.loads(target.read_text()) == {"a": 1}  # old content kept
    assert os.listdir(target.parent) == ["result.json"]  # no temporary left behind
    write_text_atomically(target, "new")
    assert target.read_text() == "new"

    folder = tmp_path / "model"
    write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "w.bin").write_bytes(b"1")))
    write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "w.bin").write_bytes(b"2")))
    assert (folder / "w.bin").read_bytes() == b"1"  # an existing folder is never half-replaced
    assert sorted(os.listdir(tmp_path)) == ["model", "sub"]
    # replace=True swaps the whole folder: no file of the old one survives, no temporary is left.
    write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "v.bin").write_bytes(b"3")), replace=True)
    assert os.listdir(folder) == ["v.bin"] and sorted(os.listdir(tmp_path)) == ["model", "sub"]


def test_render_table_markdown_and_latex():
    frame = pd.DataFrame({"model": ["dense", "moe-8x2"], "score": [71.25, 72.5]})
    markdown = render_table(frame, "markdown", floatfmt=".1f")
    assert markdown.splitlines()[0].split("|")[1:3] == [" model   ", "   score "]
    assert "72.5" in markdown and "71.2" in markdown
    latex = render_table(frame, "latex", floatfmt=".1f")
    assert "\\toprule" in latex and "moe-8x2 & 72.5" in latex
    with pytest.raises(ValueError, match="table format"):
        render_table(frame, "html")
