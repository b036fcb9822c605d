//! Structured output on the default model (CPU): JSON-schema, regex, choice and grammar constraints
//! through the offline API. Every constrained output must parse and satisfy its constraint; a
//! constrained request must not change the tokens of unconstrained requests in the same batch; invalid
//! constraints are refused before they reach the engine, with a message naming the field.

mod common;

use ironllm::{LlmError, Prompt, SamplingParams, LLM};
use ironllm_core::outputs::FinishReason;
use ironllm_core::structured::StructuredOutputsParams;
use std::time::Duration;

use ironllm_model::loader::DType;
use ironllm_model::structured::StructuredOutputCompiler;
use serde_json::{json, Value};

fn llm() -> LLM {
    common::llm(common::test_args(common::default_gguf(), DType::Auto))
}

fn chat(question: &str) -> Prompt {
    Prompt::Text(format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"))
}

fn constrained(structured: StructuredOutputsParams, max_tokens: usize) -> SamplingParams {
    SamplingParams { structured_outputs: Some(structured), ..SamplingParams::greedy(max_tokens) }
}

/// A small JSON-schema validator for the keywords the suite uses (type, properties, required,
/// additionalProperties, enum, const, items, minItems/maxItems, minimum/maximum (exclusive too),
/// minLength/maxLength, pattern, anyOf). Returns the first violation.
fn validate(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    let fail = |m: String| Err(format!("{path}: {m} (value {v})"));
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        if !options.iter().any(|s| validate(s, v, path).is_ok()) {
            return fail("matches no anyOf branch".into());
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return fail(format!("not in enum {e:?}"));
        }
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            return fail(format!("not the const {c}"));
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            return fail(format!("not of type {types:?}"));
        }
    }
    if let Some(n) = v.as_f64() {
        let num = |k: &str| schema.get(k).and_then(Value::as_f64);
        if num("minimum").is_some_and(|m| n < m) || num("maximum").is_some_and(|m| n > m) {
            return fail("out of [minimum, maximum]".into());
        }
        if num("exclusiveMinimum").is_some_and(|m| n <= m) || num("exclusiveMaximum").is_some_and(|m| n >= m) {
            return fail("out of the exclusive bounds".into());
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if schema.get("minLength").and_then(Value::as_u64).is_some_and(|m| len < m)
            || schema.get("maxLength").and_then(Value::as_u64).is_some_and(|m| len > m)
        {
            return fail("length out of bounds".into());
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
            if !regex::Regex::new(p).unwrap().is_match(s) {
                return fail(format!("does not match /{p}/"));
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if schema.get("minItems").and_then(Value::as_u64).is_some_and(|m| n < m)
            || schema.get("maxItems").and_then(Value::as_u64).is_some_and(|m| n > m)
        {
            return fail("item count out of bounds".into());
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item_schema, item, &format!("{path}[{i}]"))?;
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !obj.contains_key(key.as_str().unwrap_or_default()) {
                return fail(format!("missing required {key}"));
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, val, &format!("{path}.{k}"))?,
                None => {
                    if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
                        return fail(format!("unexpected property {k}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The schema suite: nesting, enums, arrays with bounds, required and optional properties, string
/// patterns and lengths, numbers with ranges.
fn schemas() -> Vec<(&'static str, Value)> {
    let s = |max: u64| json!({"type": "string", "maxLength": max});
    vec![
        (
            "a person",
            json!({"type": "object", "properties": {"name": s(20), "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]}),
        ),
        (
            "a colour",
            json!({"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]}),
        ),
        (
            "a boolean answer",
            json!({"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}),
        ),
        (
            "a temperature",
            json!({"type": "object", "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 60}}, "required": ["celsius"]}),
        ),
        (
            "three fruits",
            json!({"type": "object", "properties": {"fruits": {"type": "array", "items": s(12), "minItems": 3, "maxItems": 3}}, "required": ["fruits"]}),
        ),
        (
            "a list of numbers",
            json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 5}),
        ),
        (
            "a book",
            json!({"type": "object", "properties": {"title": s(30), "author": s(30), "year": {"type": "integer", "minimum": 1400, "maximum": 2025}}, "required": ["title", "author", "year"], "additionalProperties": false}),
        ),
        (
            "a phone contact",
            json!({"type": "object", "properties": {"name": s(20), "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}}, "required": ["name", "phone"]}),
        ),
        (
            "an address",
            json!({"type": "object", "properties": {"street": s(30), "city": s(20), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city", "zip"]}),
        ),
        (
            "a company with an address",
            json!({"type": "object", "properties": {"name": s(20), "address": {"type": "object", "properties": {"city": s(20), "country": s(20)}, "required": ["city", "country"]}}, "required": ["name", "address"]}),
        ),
        (
            "a team of people",
            json!({"type": "object", "properties": {"team": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {"name": s(15), "role": {"enum": ["dev", "pm", "qa"]}}, "required": ["name", "role"]}}}, "required": ["team"]}),
        ),
        (
            "an optional nickname",
            json!({"type": "object", "properties": {"name": s(20), "nickname": s(10)}, "required": ["name"]}),
        ),
        (
            "a rating",
            json!({"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": s(40)}, "required": ["stars", "comment"]}),
        ),
        (
            "a probability",
            json!({"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["p"]}),
        ),
        (
            "a yes/no with reason",
            json!({"type": "object", "properties": {"decision": {"enum": ["yes", "no"]}, "reason": s(40)}, "required": ["decision", "reason"]}),
        ),
        (
            "a point",
            json!({"type": "object", "properties": {"x": {"type": "integer", "minimum": -100, "maximum": 100}, "y": {"type": "integer", "minimum": -100, "maximum": 100}}, "required": ["x", "y"], "additionalProperties": false}),
        ),
        (
            "a matrix",
            json!({"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}),
        ),
        (
            "a product",
            json!({"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"}, "price": {"type": "number", "minimum": 0, "maximum": 1000}, "in_stock": {"type": "boolean"}}, "required": ["sku", "price", "in_stock"]}),
        ),
        (
            "an email",
            json!({"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}}, "required": ["email"]}),
        ),
        (
            "a date",
            json!({"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}, "required": ["date"]}),
        ),
        ("a weekday", json!({"type": "string", "enum": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]})),
        ("a small integer", json!({"type": "integer", "minimum": 10, "maximum": 20})),
        (
            "a nullable middle name",
            json!({"type": "object", "properties": {"first": s(15), "middle": {"type": ["string", "null"], "maxLength": 15}}, "required": ["first", "middle"]}),
        ),
        (
            "a shape",
            json!({"type": "object", "properties": {"shape": {"anyOf": [{"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["kind", "r"]}, {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["kind", "side"]}]}}, "required": ["shape"]}),
        ),
        (
            "tags",
            json!({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "pattern": "^#[a-z]{1,8}$"}, "minItems": 1, "maxItems": 4}}, "required": ["tags"]}),
        ),
        (
            "a recipe",
            json!({"type": "object", "properties": {"name": s(25), "ingredients": {"type": "array", "items": {"type": "object", "properties": {"item": s(15), "grams": {"type": "integer", "minimum": 1, "maximum": 1000}}, "required": ["item", "grams"]}, "minItems": 1, "maxItems": 3}, "minutes": {"type": "integer", "minimum": 1, "maximum": 240}}, "required": ["name", "ingredients", "minutes"]}),
        ),
        (
            "a deeply nested config",
            json!({"type": "object", "properties": {"server": {"type": "object", "properties": {"http": {"type": "object", "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535}, "tls": {"type": "boolean"}}, "required": ["port", "tls"]}}, "required": ["http"]}}, "required": ["server"]}),
        ),
        (
            "a movie",
            json!({"type": "object", "properties": {"title": s(30), "genre": {"enum": ["drama", "comedy", "action", "horror"]}, "rating": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["title", "genre", "rating"], "additionalProperties": false}),
        ),
        ("a short word", json!({"type": "string", "minLength": 3, "maxLength": 8, "pattern": "^[a-z]+$"})),
        (
            "an exclusive range",
            json!({"type": "object", "properties": {"v": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}, "required": ["v"]}),
        ),
        (
            "a flight",
            json!({"type": "object", "properties": {"from": {"type": "string", "pattern": "^[A-Z]{3}$"}, "to": {"type": "string", "pattern": "^[A-Z]{3}$"}, "seats": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["from", "to", "seats"]}),
        ),
        (
            "an empty-able list",
            json!({"type": "object", "properties": {"items": {"type": "array", "items": s(10), "maxItems": 2}}, "required": ["items"]}),
        ),
        (
            "a user with optional fields",
            json!({"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 100000}, "admin": {"type": "boolean"}, "bio": s(30)}, "required": ["id"]}),
        ),
    ]
}

#[test]
fn every_json_schema_output_parses_and_validates() {
    let mut llm = llm();
    let suite = schemas();
    assert!(suite.len() >= 30);
    let prompts: Vec<Prompt> = suite.iter().map(|(what, _)| chat(&format!("Give me {what} as JSON."))).collect();
    // Closed objects (vLLM's `disable_additional_properties`): with open ones a 135M model tends to
    // invent an extra key whose free-form string never ends.
    let params: Vec<SamplingParams> = suite
        .iter()
        .map(|(_, schema)| {
            let mut p = StructuredOutputsParams::json(schema.clone());
            p.disable_additional_properties = true;
            constrained(p, 256)
        })
        .collect();
    let outs = llm.generate_each(&prompts, &params).unwrap();
    for ((what, schema), out) in suite.iter().zip(&outs) {
        let o = &out.outputs[0];
        assert_eq!(o.finish_reason, Some(FinishReason::Stop), "{what}: {:?}", o.text);
        let v: Value = serde_json::from_str(&o.text).unwrap_or_else(|e| panic!("{what}: {e}: {:?}", o.text));
        validate(schema, &v, "$").unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

#[test]
fn regex_choice_and_grammar_outputs_satisfy_their_constraint() {
    let mut llm = llm();
    let regexes = [r"[0-9]{3}-[0-9]{4}", r"(cat|dog|bird)s?", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}", r"0x[0-9a-f]{4}"];
    let choices: Vec<Vec<&str>> = vec![vec!["yes", "no"], vec!["red", "green", "blue"], vec!["a.b", "(x)", "1+1"]];
    // Bounded: an unbounded sum lets a small model count on until it runs out of tokens.
    let grammar = "start: expr\nexpr: NUM | NUM OP NUM | NUM OP NUM OP NUM\nOP: \"+\" | \"-\"\nNUM: /[0-9]{1,3}/";
    let mut prompts = Vec::new();
    let mut params = Vec::new();
    for r in regexes {
        prompts.push(chat("Answer with a short code."));
        params.push(constrained(StructuredOutputsParams::regex(r), 24));
    }
    for c in &choices {
        prompts.push(chat("Pick one."));
        params.push(constrained(StructuredOutputsParams::choice(c.iter().copied()), 12));
    }
    prompts.push(chat("Write an arithmetic expression."));
    params.push(constrained(StructuredOutputsParams::grammar(grammar), 40));
    let outs = llm.generate_each(&prompts, &params).unwrap();
    for (r, out) in regexes.iter().zip(&outs) {
        let text = &out.outputs[0].text;
        assert!(regex::Regex::new(&format!("^(?:{r})$")).unwrap().is_match(text), "{r}: {text:?}");
    }
    for (c, out) in choices.iter().zip(&outs[regexes.len()..]) {
        assert!(c.contains(&out.outputs[0].text.as_str()), "{c:?}: {:?}", out.outputs[0].text);
    }
    let text = &outs.last().unwrap().outputs[0].text;
    assert!(regex::Regex::new(r"^[0-9]{1,3}([+-][0-9]{1,3}){0,2}$").unwrap().is_match(text), "{text:?}");
}

#[test]
fn unconstrained_requests_keep_their_tokens_in_a_mixed_batch() {
    let mut llm = llm();
    let plain: Vec<Prompt> =
        ["Tell me about the sea.", "Write a haiku about rust.", "Count to ten."].iter().map(|q| chat(q)).collect();
    let free = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(24) };
    let seeded = SamplingParams {
        temperature: 0.8,
        seed: Some(7),
        ignore_eos: true,
        max_tokens: Some(24),
        ..Default::default()
    };
    let alone = llm.generate_each(&plain, &[free.clone(), seeded.clone(), free.clone()]).unwrap();
    let mut prompts = plain.clone();
    let mut params = vec![free.clone(), seeded, free];
    for (i, (what, schema)) in schemas().into_iter().take(6).enumerate() {
        prompts.insert(i % 3, chat(&format!("Give me {what} as JSON.")));
        params.insert(i % 3, constrained(StructuredOutputsParams::json(schema), 64));
    }
    let mixed = llm.generate_each(&prompts, &params).unwrap();
    let unconstrained: Vec<&Vec<u32>> = mixed
        .iter()
        .zip(&params)
        .filter(|(_, p)| p.structured_outputs.is_none())
        .map(|(o, _)| &o.outputs[0].token_ids)
        .collect();
    for (a, b) in alone.iter().zip(unconstrained) {
        assert_eq!(&a.outputs[0].token_ids, b);
    }
}

#[test]
fn invalid_constraints_are_refused_naming_the_field() {
    let mut llm = llm();
    let cases = [
        (StructuredOutputsParams::json(json!({"type": "wrong"})), "structured_outputs.json"),
        (StructuredOutputsParams::json(json!({"type": "integer", "minimum": "x"})), "structured_outputs.json"),
        (StructuredOutputsParams::regex("(unclosed"), "structured_outputs.regex"),
        (StructuredOutputsParams::choice(Vec::<String>::new()), "structured_outputs.choice"),
        (StructuredOutputsParams::grammar("start: ( unclosed"), "structured_outputs.grammar"),
        (StructuredOutputsParams::grammar("no rules here"), "structured_outputs.grammar"),
    ];
    for (structured, field) in cases {
        let err = llm.generate(&[chat("hi")], &constrained(structured.clone(), 4)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LlmError::InvalidRequest(_)), "{structured:?}: {msg}");
        assert!(msg.contains(&format!("`{field}`")), "{structured:?}: {msg}");
    }
}

#[test]
fn a_cached_constraint_compiles_once() {
    let llm = llm();
    let tok = llm.engine().tokenizer().unwrap();
    let eos = tok.eos_token_id().into_iter().collect::<Vec<_>>();
    let compiler = StructuredOutputCompiler::new(tok, tok.vocab_size(), &eos, Duration::from_secs(10)).unwrap();
    let p = StructuredOutputsParams::json(json!({"type": "object", "properties": {"k": {"type": "integer"}}}));
    assert!(!compiler.is_cached(&p));
    let a = compiler.compile(&p).unwrap();
    assert!(compiler.is_cached(&p));
    assert_eq!(compiler.compile(&p).unwrap(), a);
}
