"""Structured output over HTTP with the official openai client: response_format (json_object,
json_schema), vLLM's structured_outputs, the legacy guided_* fields, forced tool calls, streaming
equal to non-streaming, and every invalid constraint answered with a 400 naming the field."""

import json
import re

import httpx
import openai
import pytest

from apiutil import MODEL_NAME

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def check(schema, v):
    """A small validator for the keywords these tests use."""
    t = schema.get("type")
    if t == "object":
        assert isinstance(v, dict)
        for k in schema.get("required", []):
            assert k in v, k
        for k, x in v.items():
            if k in schema.get("properties", {}):
                check(schema["properties"][k], x)
            else:
                assert schema.get("additionalProperties", True) is not False, k
    elif t == "array":
        assert isinstance(v, list)
        assert schema.get("minItems", 0) <= len(v) <= schema.get("maxItems", 10**9)
        for x in v:
            check(schema.get("items", {}), x)
    elif t == "string":
        assert isinstance(v, str) and len(v) <= schema.get("maxLength", 10**9)
        if "pattern" in schema:
            assert re.search(schema["pattern"], v), (schema["pattern"], v)
    elif t == "integer":
        assert isinstance(v, int) and schema.get("minimum", -(10**18)) <= v <= schema.get("maximum", 10**18)
    if "enum" in schema:
        assert v in schema["enum"]


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 120)
    extra = kw.pop("extra_body", {})
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": content}], temperature=0, extra_body=extra, **kw
    )


def stream_text(client, content, **kw):
    kw.setdefault("max_tokens", 120)
    extra = kw.pop("extra_body", {})
    text, finish = "", None
    for ch in client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": content}], temperature=0,
        extra_body=extra, stream=True, **kw
    ):
        for c in ch.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def test_json_schema_response_format_validates_and_streaming_agrees(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = chat(client, "Describe a person with pets as JSON.", response_format=rf)
    c = r.choices[0]
    assert c.finish_reason == "stop"
    check(PERSON, json.loads(c.message.content))
    text, finish = stream_text(client, "Describe a person with pets as JSON.", response_format=rf)
    assert text == c.message.content and finish == "stop"


def test_json_object(client):
    r = chat(client, "Give me a JSON object with your name.", response_format={"type": "json_object"})
    c = r.choices[0]
    # Any object is allowed, so a small model may ramble until max_tokens; a finished one must parse.
    assert c.message.content.startswith("{")
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)


@pytest.mark.parametrize("field", ["structured_outputs", "guided"])
def test_regex_choice_and_grammar_via_both_surfaces(client, field):
    def body(kind, value):
        return {"structured_outputs": {kind: value}} if field == "structured_outputs" else {f"guided_{kind}": value}

    r = chat(client, "What is your phone number?", extra_body=body("regex", r"[0-9]{3}-[0-9]{4}"), max_tokens=20)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", r.choices[0].message.content)
    choices = ["positive", "negative", "neutral"]
    r = chat(client, "Sentiment of 'I love it'?", extra_body=body("choice", choices), max_tokens=10)
    assert r.choices[0].message.content in choices
    grammar = "start: expr\nexpr: NUM | NUM \"+\" NUM | NUM \"+\" NUM \"+\" NUM\nNUM: /[0-9]{1,3}/"
    r = chat(client, "Write a sum of numbers.", extra_body=body("grammar", grammar), max_tokens=30)
    assert re.fullmatch(r"[0-9]{1,3}(\+[0-9]{1,3})*", r.choices[0].message.content)


def test_completions_endpoint_constrained_and_streaming_agrees(client):
    extra = {"structured_outputs": {"json": PERSON}}
    r = client.completions.create(model=MODEL_NAME, prompt="A person as JSON:", temperature=0, max_tokens=120,
                                  extra_body=extra)
    check(PERSON, json.loads(r.choices[0].text))
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model=MODEL_NAME, prompt="A person as JSON:", temperature=0, max_tokens=120, extra_body=extra,
            stream=True) if c.choices
    )
    assert streamed == r.choices[0].text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def test_named_tool_choice_returns_tool_calls(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, "What's the weather in Oslo?", tools=[WEATHER], tool_choice=choice)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    check(WEATHER["function"]["parameters"], args)
    # Streaming sends the same call in the last chunk.
    calls, finish = [], None
    for ch in client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content":
                                             "What's the weather in Oslo?"}], temperature=0, max_tokens=120,
                                             tools=[WEATHER], tool_choice=choice, stream=True):
        for x in ch.choices:
            calls += x.delta.tool_calls or []
            finish = x.finish_reason or finish
    assert finish == "tool_calls" and json.loads(calls[0].function.arguments) == args


def test_required_tool_choice(client):
    r = chat(client, "What's the weather in Oslo?", tools=[WEATHER], tool_choice="required", max_tokens=150)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    for call in c.message.tool_calls:
        assert call.function.name == "get_weather"
        check(WEATHER["function"]["parameters"], json.loads(call.function.arguments))


@pytest.mark.parametrize(
    "body,field",
    [
        ({"structured_outputs": {"json": {"type": "wrong"}}}, "structured_outputs.json"),
        ({"guided_json": {"type": "object", "properties": {"a": {"minimum": "x"}}}}, "guided_json"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"guided_regex": "[z-a]"}, "guided_regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"grammar": "start: ( unclosed"}}, "structured_outputs.grammar"),
        ({"guided_grammar": "this is not a grammar"}, "guided_grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_invalid_constraints_are_400_naming_the_field(http, body, field):
    for path, base in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})]:
        r = http.post(path, json={"model": MODEL_NAME, "max_tokens": 5, **base, **body})
        assert r.status_code == 400, (path, r.text)
        msg = r.json()["error"]["message"]
        assert f"`{field}" in msg, msg


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", extra_body={"guided_regex": "(x"})
