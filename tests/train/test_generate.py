"""`unipeft generate`: real subprocesses on a tiny causal_lm run and on an adapter folder; the library's
streaming, stop strings and sampling settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from unipeft.cli import main
from unipeft.core.errors import ConfigError

from ._helpers import make_tiny_gpt2, tiny_config, write_config

COLOURS = ["red", "blue", "green", "black", "white"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unipeft", "generate", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny GPT-2 LoRA run that learned to answer 'yes indeed' (made by `unipeft train`)."""
    tmp = tmp_path_factory.mktemp("gen")
    model = make_tiny_gpt2(tmp / "gpt2")
    data = tmp / "pairs.txt"
    data.write_text("".join(f"is {w} a colour?\tyes indeed\n" for w in COLOURS * 4))
    config = write_config(tmp / "lm.yaml", **tiny_config(
        model, data, tmp / "lm", task="causal_lm", method={"name": "lora", "r": 8, "alpha": 16,
                                                           "target_modules": ["c_attn", "c_fc"]},
        epochs=10, batch_size=4))
    assert main(["train", str(config), "--quiet"]) == 0
    return tmp / "lm", model


def test_generate_on_a_run_folder_streams_the_learned_completion(lm_run):
    run, _ = lm_run
    res = cli(str(run), "is red a colour?", "is pink a colour?", "--max-new-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["yes indeed", "yes indeed"]  # ends at the end-of-sequence token
    res = cli(str(run), "is red a colour?", "--no-stream", "--max-new-tokens", "6")
    assert res.stdout == "yes indeed\n"


def test_stop_strings_cut_the_output_and_file_reads_prompts(lm_run, tmp_path):
    run, _ = lm_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("is red a colour?\n\nis blue a colour?\n")
    res = cli(str(run), "--file", str(prompts), "--stop", " ind", "--max-new-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["yes", "yes"]  # the stop string itself is never printed
    res = cli(str(run), "--file", "-", "--stop", "s", "--stop", "ye", stdin="is red a colour?\n")
    assert res.stdout == "\n"  # the earliest stop string wins


def test_adapter_folder_with_base(lm_run, tmp_path):
    run, model = lm_run
    res = cli(str(run / "adapter"), "is green a colour?", "--base", str(model), "--max-new-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["yes indeed"]
    res = cli(str(run / "adapter"), "is green a colour?")
    assert res.returncode == 2 and "names no base model" in res.stderr and "--base" in res.stderr
    res = cli(str(tmp_path), "hi")
    assert res.returncode == 2 and "neither a finished unipeft run" in res.stderr


def test_chat_template_and_its_absence(lm_run, tmp_path):
    run, model = lm_run
    res = cli(str(run), "is red a colour?", "--chat")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "has no chat template" in res.stderr and str(model) in res.stderr
    chat_model = tmp_path / "chat"
    make_tiny_gpt2(chat_model)
    cfg = json.loads((chat_model / "tokenizer_config.json").read_text())
    (chat_model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    res = cli(str(run / "adapter"), "is red a colour?", "--chat", "--base", str(chat_model), "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1


def test_over_long_prompt_is_refused_with_the_numbers(lm_run):
    run, _ = lm_run
    long = " ".join(["red"] * 130)  # the tiny GPT-2 has 128 positions
    res = cli(str(run), "is red a colour?", long, "--max-new-tokens", "8")
    assert res.returncode == 2 and res.stdout == ""  # nothing written, not even for the first prompt
    assert "prompt 2 has 131 tokens" in res.stderr and "context of 128" in res.stderr
    assert "at most 120 prompt tokens fit" in res.stderr


def test_help_explains_every_option():
    res = subprocess.run([sys.executable, "-m", "unipeft", "generate", "--help"], capture_output=True, text=True)
    for flag in ("--file", "--chat", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop",
                 "--no-stream", "--base", "examples:"):
        assert flag in res.stdout


# ---- library ----------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character (ids 1..), no special tokens: for exact stop-string tests."""

    pad_token_id = eos_token_id = sep_token_id = bos_token_id = cls_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids)


def test_text_stream_never_emits_a_stop_string_even_across_tokens():
    from unipeft.train.generate import TextStream

    chunks = []
    stream = TextStream(CharTokenizer(), ["cde", "x"], chunks.append)
    tokens = [1, 2, 3, 4]  # "abcd": "cd" may begin "cde", so only "ab" is out
    for k in range(1, len(tokens) + 1):
        assert not stream.update(tokens[:k])
    assert "".join(chunks) == "ab"
    assert stream.update(tokens + [5])  # "abcde": stop reached
    assert stream.text == "ab" and "".join(chunks) == "ab"
    other = []
    s2 = TextStream(CharTokenizer(), ["cde"], other.append)
    s2.update([1, 2, 3, 4])
    s2.update([1, 2, 3, 4, 6], final=True)  # "abcdf": the held "cd" was not a stop after all
    assert "".join(other) == "abcdf" == s2.text


def test_library_generate_sampling_settings(lm_run):
    from unipeft.train.artifacts import load_run
    from unipeft.train.generate import GenerationOptions, generate

    loaded = load_run(lm_run[0])
    m, tok = loaded.model, loaded.tokenizer
    prompts = ["is red a colour?", "is tea a colour?"]
    greedy = generate(m, tok, prompts, max_new_tokens=8)
    assert greedy == ["yes indeed", "yes indeed"]
    hot = GenerationOptions(max_new_tokens=8, temperature=5.0, seed=3)
    first, again = generate(m, tok, prompts, hot), generate(m, tok, prompts, hot)
    assert first == again and first != greedy
    assert generate(m, tok, prompts, hot, top_p=1e-6) == greedy  # only the likeliest token is left
    assert generate(m, tok, prompts, hot, top_k=1) == greedy
    seen = []
    out = generate(m, tok, prompts[:1], on_text=lambda i, c: seen.append((i, c)), max_new_tokens=8)
    assert "".join(c for _, c in seen) == out[0] and len(seen) >= 2  # streamed in pieces
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        generate(m, tok, prompts, temperature=-1)
    with pytest.raises(ConfigError, match="top_p must be in"):
        generate(m, tok, prompts, temperature=1.0, top_p=0.0)


@pytest.mark.slow
def test_smollm2_chat_generates_a_few_tokens(tmp_path):
    from unipeft import LoraConfig, adapt
    from unipeft.train.models import model_path

    from transformers import AutoModelForCausalLM

    path = model_path("smollm2")
    base = AutoModelForCausalLM.from_pretrained(str(path))
    adapted = adapt(base, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    adapted.save_pretrained(tmp_path / "adapter")  # LoRA B is zero: the base model's own answer
    res = cli(str(tmp_path / "adapter"), "What is the capital of France?", "--chat", "--base", "smollm2",
              "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr
    assert "paris" in res.stdout.lower()
