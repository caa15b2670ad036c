"""JSON-Schema-constrained decoding (runtimes/constrain.py) in both runtimes: every answer is
one JSON value the schema accepts, greedy answers are the argmax over the allowed tokens (the
unconstrained-first shortcut changes nothing), the schema travels from the task to the export,
and every bad schema is one clean error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_model, has_module, schema_valid, schema_validator
from edgeqlora.errors import InputError
from edgeqlora.tasks import iot

pytestmark = pytest.mark.skipif(not has_module("llguidance"), reason="needs llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = iot.json_schema()
_, HELD_OUT = iot.generate(0, 200, 40)
COMMANDS = [r["messages"][:2] for r in HELD_OUT]


def valid(text: str, schema=SCHEMA) -> bool:
    return schema_valid(text, schema)


@pytest.fixture(scope="module")
def gguf_rt():
    pytest.importorskip("llama_cpp")
    from edgeqlora import runtimes
    from edgeqlora.base import embedded_gguf_path

    with runtimes.load(embedded_gguf_path(), n_ctx=512) as rt:
        yield rt


@pytest.fixture(scope="module")
def tiny_gguf_rt(tmp_path_factory, tokenizer_dir):
    """A random tiny model as a GGUF (noise, not prose): for what does not need the real
    model's answers, 20x quicker to decode."""
    pytest.importorskip("llama_cpp")
    from edgeqlora import runtimes
    from edgeqlora.exporters.gguf import write_model_gguf

    tiny = build_tiny_model(tmp_path_factory.mktemp("structured-tiny-gguf"), tokenizer_dir,
                            seed=5)
    path = tiny / "model.f32.gguf"
    write_model_gguf(tiny, path, "f32")
    with runtimes.load(path, n_ctx=512) as rt:
        yield rt


@pytest.fixture(scope="module")
def onnx_rt(tmp_path_factory, tokenizer_dir):
    if not (has_module("onnx") and has_module("onnxruntime")):
        pytest.skip("needs onnx + onnxruntime")
    from edgeqlora import runtimes
    from edgeqlora.export import export_merged

    tiny = build_tiny_model(tmp_path_factory.mktemp("structured-tiny"), tokenizer_dir, seed=5)
    out = tmp_path_factory.mktemp("structured-onnx") / "fp32"
    export_merged(tiny, out, target="onnx", quant="fp32", eval_tokens=64, context_length=256)
    with runtimes.load(out) as rt:
        yield rt


def test_task_schema_accepts_every_target_and_nothing_else():
    train, held = iot.generate(0, 2000, 200)
    validator = schema_validator(SCHEMA)  # jsonschema.validate, the schema checked once
    for row in train + held:
        validator.validate(row["target"])
        assert json.loads(iot.to_json(row["target"])) == row["target"]
    for bad in ({"device": "toaster", "action": "turn_on"},
                {"device": "light", "action": "turn_on", "colour": "red"},
                {"device": "light", "action": "turn_on", "time": "25:00"},
                {"device": "light", "action": "set_brightness", "value": True},
                {"room": "kitchen", "action": "turn_on"}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


# The real SmolLM2 runs are `slow` (its decoding is most of this file's time); the quick loop
# runs the same code on the tiny random GGUF.
RUNTIMES = ["tiny_gguf_rt", pytest.param("gguf_rt", marks=pytest.mark.slow), "onnx_rt"]


@pytest.mark.parametrize("name", RUNTIMES)
def test_every_constrained_answer_is_a_valid_action(name, request):
    """The untrained SmolLM2 (GGUF) answers in prose and random tiny models (GGUF, ONNX) in
    noise; under the schema each writes one valid action every time, and says it stopped."""
    from edgeqlora.runtimes.base import Completion

    rt = request.getfixturevalue(name)
    free = [rt.chat(m, max_new_tokens=24) for m in COMMANDS[:4]]
    assert sum(valid(t) for t in free) <= 1
    for messages in COMMANDS[:4]:
        result = Completion()
        text = "".join(rt.complete(rt.chat_ids(messages), max_new_tokens=96, json_schema=SCHEMA,
                                   result=result))
        assert valid(text), text
        assert result.finish_reason == "stop" and result.completion_tokens > 4
        assert rt.chat(messages, max_new_tokens=96, json_schema=SCHEMA) == text
        assert "".join(rt.chat(messages, max_new_tokens=96, json_schema=SCHEMA,
                               stream=True)) == text


@pytest.mark.parametrize("name", RUNTIMES)
def test_each_token_is_the_models_pick_when_the_grammar_takes_it(name, request):
    """Replayed step by step: every token of a greedy constrained answer is the model's argmax
    when the grammar accepts that, else the argmax over llguidance's mask; so an answer the
    model writes validly on its own is never changed."""
    from edgeqlora.runtimes.base import Completion, allowed_mask

    rt = request.getfixturevalue(name)
    grammar, strayed = rt.grammar(SCHEMA), 0
    for messages in COMMANDS[6:9]:
        result = Completion()
        "".join(rt.complete(rt.chat_ids(messages), max_new_tokens=96, json_schema=SCHEMA,
                            result=result))
        matcher, steps = grammar.matcher(), rt._logit_steps(rt.chat_ids(messages))
        logits = next(steps)
        for token in result.token_ids:
            best = int(np.argmax(logits))
            if matcher.validate_tokens([best]) == 1:
                assert token == best
            else:
                strayed += 1
                mask = allowed_mask(matcher, logits.shape[-1])
                assert token == int(np.argmax(np.where(mask, logits, -np.inf)))
            assert matcher.consume_token(token)
            logits = steps.send(token)
        steps.close()
        assert matcher.is_stopped()
    assert strayed > 0  # the untrained / random model needed the mask


@pytest.mark.parametrize("name", RUNTIMES)
def test_seeded_sampling_under_the_schema_is_valid_and_reproducible(name, request):
    rt = request.getfixturevalue(name)
    kw = dict(max_new_tokens=96, json_schema=SCHEMA, temperature=1.0, seed=7)
    a = rt.chat(COMMANDS[0], **kw)
    assert valid(a) and rt.chat(COMMANDS[0], **kw) == a
    b = rt.chat(COMMANDS[0], max_new_tokens=96, json_schema=SCHEMA, temperature=0.8,
                top_k=20, top_p=0.9, seed=3)
    assert valid(b)


@pytest.mark.slow  # the real model: a noise model writes whitespace inside an object forever
def test_json_object_mode_and_other_schemas(gguf_rt):
    from edgeqlora.runtimes.base import Completion

    # Any one object (OpenAI's json_object): a rambling base model may run out of tokens
    # inside it; when it says it stopped, the object is complete.
    for messages in COMMANDS[:4]:
        result = Completion()
        text = "".join(gguf_rt.complete(gguf_rt.chat_ids(messages), max_new_tokens=120,
                                        json_schema="json_object", result=result))
        assert text.lstrip().startswith("{")
        if result.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    assert json.loads(gguf_rt.generate("Answer:", max_new_tokens=20, json_schema=schema)) \
        in ({"ok": True}, {"ok": False})


def test_a_schema_string_path_and_mapping_compile_once(tiny_gguf_rt):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    path = Path(__file__).parent / "assets" / "structured_schema.json"
    assert json.loads(path.read_text()) == schema
    assert tiny_gguf_rt.grammar(json.dumps(schema)) is tiny_gguf_rt.grammar(schema) \
        is tiny_gguf_rt.grammar(path)


def test_budget_cut_says_length(gguf_rt):
    from edgeqlora.runtimes.base import Completion

    result = Completion()
    text = "".join(gguf_rt.complete(gguf_rt.chat_ids(COMMANDS[2]), max_new_tokens=3,
                                    json_schema=SCHEMA, result=result))
    assert result.finish_reason == "length" and result.completion_tokens == 3
    assert text.startswith("{")


@pytest.mark.parametrize("schema, match", [
    ({"type": "nonsense"}, "Invalid type"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
      "required": ["a"]}, "nsatisfiable"),
    ({"enum": []}, "nsatisfiable"),
    ({"type": "string", "pattern": "("}, "regex"),
    ({"$ref": "#/defs/missing"}, "does not exist"),
    ("[1, 2]", "must be a JSON object"),
    ("{not json", "not valid JSON"),
    ("no/such/schema.json", "does not exist"),
])
def test_bad_schemas_are_one_line_errors(gguf_rt, schema, match):
    with pytest.raises(InputError, match=match) as err:
        gguf_rt.chat(COMMANDS[0], max_new_tokens=8, json_schema=schema)
    assert "\n" not in str(err.value)


def test_schema_file_errors(tmp_path):
    from edgeqlora.schema import load_schema

    big = tmp_path / "big.json"
    big.write_text('{"enum": [' + ",".join(['"x"'] * 100000) + "]}")
    with pytest.raises(InputError, match="KiB"):
        load_schema(big)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match="UTF-8"):
        load_schema(binary)


def test_schema_resolution_from_the_training_config(tmp_path):
    from edgeqlora.errors import ConfigError
    from edgeqlora.schema import read_schema, resolve, write_schema

    assert resolve("embedded:iot", "") == (SCHEMA, "embedded:iot")
    assert resolve("embedded:iot", "none") == (None, None)
    assert resolve("my.jsonl", "") == (None, None)
    own = tmp_path / "s.json"
    own.write_text('{"type": "object"}')
    assert resolve("my.jsonl", str(own))[0] == {"type": "object"}
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("my.jsonl", str(tmp_path / "missing.json"))
    assert write_schema(tmp_path, SCHEMA) == "schema.json"
    assert read_schema(tmp_path) == SCHEMA and read_schema(tmp_path / "none") is None


@pytest.mark.slow  # four CLI runs of the real model (a noise model need not stop)
def test_cli_run_uses_the_export_schema_unless_told_not_to(tmp_path, gguf_rt):
    from edgeqlora.artifacts import write_manifest
    from edgeqlora.base import embedded_gguf_path
    from edgeqlora.schema import write_schema

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.gguf").symlink_to(embedded_gguf_path())
    write_schema(export, SCHEMA)
    write_manifest(export, "export", {"target": "gguf",
                                      "schema": {"file": "schema.json", "source": "test"}})
    cmd = [sys.executable, "-m", "edgeqlora", "run", str(export), "--chat", "--prompt",
           COMMANDS[3][1]["content"], "--system", iot.SYSTEM_PROMPT, "--max-new-tokens", "80"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert valid(out.stdout.strip()) and "JSON schema" in out.stderr
    free = subprocess.run(cmd + ["--no-schema"], capture_output=True, text=True, timeout=120)
    assert free.returncode == 0 and not valid(free.stdout.strip())
    other = tmp_path / "other.json"
    other.write_text('{"type": "object", "properties": {"n": {"type": "integer"}}, '
                     '"required": ["n"], "additionalProperties": false}')
    forced = subprocess.run(cmd + ["--json-schema", str(other)], capture_output=True, text=True,
                            timeout=120)
    assert forced.returncode == 0 and set(json.loads(forced.stdout)) == {"n"}
    bad = subprocess.run(cmd + ["--json-schema", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_answers_with_and_without_the_schema(tiny_gguf_rt):
    """What parity reports beside the gate's (unconstrained) figure: only answers the grammar
    does not already accept are decoded again, and those come out valid."""
    from edgeqlora.constrained_eval import accepted, answers

    prompts = COMMANDS[10:13]
    got = answers(tiny_gguf_rt, prompts, 80, SCHEMA)
    assert got["free"] == [tiny_gguf_rt.chat(m, max_new_tokens=80).strip() for m in prompts]
    assert got["constrained"] == [tiny_gguf_rt.chat(m, max_new_tokens=80, json_schema=SCHEMA)
                                  for m in prompts]
    assert all(got["valid_constrained"]) and not any(got["valid_free"])
    assert got["redecoded"] == len(prompts)
    grammar = tiny_gguf_rt.grammar(SCHEMA)
    good = tiny_gguf_rt.tokenize(iot.to_json(HELD_OUT[0]["target"]))
    assert accepted(grammar, good) and not accepted(grammar, good[:-1])
    assert answers(tiny_gguf_rt, prompts[:1], 8)["constrained"] == []


def test_prompt_cache_reuses_the_shared_system_prompt(onnx_rt, gguf_rt):
    """With prompt_cache a second request with the same system prompt decodes only what
    differs (ONNX: counted in tokens run), and answers as from scratch (fp32 here)."""
    from edgeqlora import runtimes

    with runtimes.load(onnx_rt.export_dir, prompt_cache=True) as rt:
        fed = []
        real = rt._run
        rt._run = lambda ids, past, start: (fed.append(len(ids)), real(ids, past, start))[1]
        first = rt.chat(COMMANDS[0], max_new_tokens=12)
        prompt0 = len(rt.chat_ids(COMMANDS[0]))
        fed.clear()
        second = rt.chat(COMMANDS[1], max_new_tokens=12, json_schema=SCHEMA)
        shared = len(rt.chat_ids([COMMANDS[1][0]], add_generation_prompt=False))  # system turn
        assert fed[0] <= len(rt.chat_ids(COMMANDS[1])) - shared
        assert first == onnx_rt.chat(COMMANDS[0], max_new_tokens=12)
        assert second == onnx_rt.chat(COMMANDS[1], max_new_tokens=12, json_schema=SCHEMA)
        assert prompt0 > shared
        # Another adapter (here: none) means other keys and values: the cache goes.
        assert rt._kv is not None
        rt.set_adapter(None)
        assert rt._kv is None


def test_trainer_evaluation_reports_both_ways(tiny_model_dir, tokenizer):
    """The trainer's final evaluation (transformers, batched greedy): with the schema every
    answer of a random tiny model is a valid action, and the figures sit beside the free ones."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeqlora.evaluate import SchemaGrammar, check_schema, evaluate_task
    from edgeqlora.errors import ConfigError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = HELD_OUT[:5]
    result = evaluate_task(model, tokenizer, rows, max_new_tokens=64, batch_size=4,
                           schema=SCHEMA)
    k = result["schema"]
    assert result["parse_rate"] == 0.0 and k["valid_json_unconstrained"] == 0.0
    assert k["valid_json"] == 1.0 and k["redecoded"] == 5
    grammar = SchemaGrammar(SCHEMA, tokenizer, model)
    assert grammar.accepts(iot.to_json(rows[0]["target"]))
    assert not grammar.accepts(iot.to_json(rows[0]["target"])[:-1])
    check_schema(SCHEMA)
    with pytest.raises(ConfigError, match="Invalid type"):
        check_schema({"type": "nonsense"})


def test_gguf_prompt_cache_under_the_schema():
    """serve's default: constrained answers with the KV cache of the shared prefix kept. Each
    stays valid, and a second command with the same system prompt decodes only its own part."""
    from edgeqlora import runtimes
    from edgeqlora.base import embedded_gguf_path

    with runtimes.load(embedded_gguf_path(), n_ctx=512, prompt_cache=True) as rt:
        fed = []
        real = rt._llm.eval
        rt._llm.eval = lambda tokens: (fed.append(len(tokens)), real(tokens))[1]
        assert valid(rt.chat(COMMANDS[0], max_new_tokens=96, json_schema=SCHEMA))
        fed.clear()
        assert valid(rt.chat(COMMANDS[1], max_new_tokens=96, json_schema=SCHEMA))
        system = len(rt.chat_ids([COMMANDS[1][0]], add_generation_prompt=False))
        assert fed[0] <= len(rt.chat_ids(COMMANDS[1])) - system
