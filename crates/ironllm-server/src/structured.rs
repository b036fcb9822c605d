//! Structured-output request fields, parsed at the edge into one [`StructuredOutputsParams`]:
//! OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs` object
//! (`json`, `regex`, `choice`, `grammar`, `json_object`, with `disable_any_whitespace` and
//! `disable_additional_properties`), the older `guided_json` / `guided_regex` / `guided_choice` /
//! `guided_grammar` fields (mapped to the same thing, so an old client never gets silently
//! unconstrained text), and forced tool calls (`tools` with `tool_choice` naming a function or
//! `"required"`). A request may use exactly one constraint; two are a 400 naming both fields.
//!
//! The grammar itself is compiled later, by the input processor (cached per constraint); its errors
//! come back as 400s that name the field recorded here.

use ironllm_core::structured::{StructuredConstraint, StructuredOutputsParams};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::server::random_uuid;

/// The structured-output fields of a generation request, as they came over the wire.
#[derive(Debug, Default, Clone, Copy)]
pub struct StructuredFields<'a> {
    pub response_format: Option<&'a Value>,
    pub structured_outputs: Option<&'a Value>,
    pub guided_json: Option<&'a Value>,
    pub guided_regex: Option<&'a Value>,
    pub guided_choice: Option<&'a Value>,
    pub guided_grammar: Option<&'a Value>,
}

fn bad(field: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).with_param(field.split('.').next().unwrap_or(field))
}

fn string_of(field: &str, v: &Value) -> Result<String, ApiError> {
    v.as_str().map(str::to_string).ok_or_else(|| bad(field, format!("`{field}` must be a string, got {v}")))
}

fn choices_of(field: &str, v: &Value) -> Result<Vec<String>, ApiError> {
    let items = v.as_array().ok_or_else(|| bad(field, format!("`{field}` must be a list of strings, got {v}")))?;
    if items.is_empty() {
        return Err(bad(field, format!("`{field}` must contain at least one choice, got an empty list.")));
    }
    items
        .iter()
        .map(|c| c.as_str().map(str::to_string).ok_or_else(|| bad(field, format!("`{field}` choices must be strings"))))
        .collect()
}

/// A JSON schema given as an object (or boolean), or as a string holding one (vLLM accepts both).
fn schema_of(field: &str, v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        Value::String(s) => {
            serde_json::from_str::<Value>(s).ok().filter(|s| s.is_object() || s.is_boolean()).ok_or_else(|| {
                bad(field, format!("`{field}` is not a valid JSON schema: the string is not a JSON object"))
            })
        }
        other => Err(bad(field, format!("`{field}` must be a JSON schema object, got {other}"))),
    }
}

fn with_field(constraint: StructuredConstraint, field: &str) -> StructuredOutputsParams {
    StructuredOutputsParams { field: field.to_string(), ..StructuredOutputsParams::new(constraint) }
}

/// Every constraint the request gives, as `(field, params)`.
fn collect(f: &StructuredFields<'_>) -> Result<Vec<StructuredOutputsParams>, ApiError> {
    let mut found = Vec::new();
    if let Some(rf) = f.response_format.filter(|v| !v.is_null()) {
        let kind = rf.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "text" => {}
            "json_object" => found.push(with_field(StructuredConstraint::JsonObject, "response_format")),
            "json_schema" => {
                let js = rf.get("json_schema").filter(|v| v.is_object()).ok_or_else(|| {
                    bad("response_format", "`response_format.json_schema` is required when `type` is `json_schema`")
                })?;
                // OpenAI's field is `schema`; some clients send `json_schema` inside it (vLLM accepts it).
                let schema = js.get("schema").or_else(|| js.get("json_schema")).unwrap_or(&Value::Null);
                let field = "response_format.json_schema.schema";
                let schema = if schema.is_null() { json!({}) } else { schema_of(field, schema)? };
                found.push(with_field(StructuredConstraint::Json(schema), field));
            }
            "structural_tag" => {
                return Err(bad("response_format", "`response_format` of type `structural_tag` is not supported"))
            }
            _ => {
                return Err(bad(
                    "response_format",
                    "`response_format.type` must be one of `text`, `json_object`, `json_schema`",
                ))
            }
        }
    }
    if let Some(so) = f.structured_outputs.filter(|v| !v.is_null()) {
        let obj = so
            .as_object()
            .ok_or_else(|| bad("structured_outputs", format!("`structured_outputs` must be an object, got {so}")))?;
        let flag = |k: &str| -> Result<bool, ApiError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => {
                    Err(bad("structured_outputs", format!("`structured_outputs.{k}` must be a boolean, got {v}")))
                }
            }
        };
        let (no_ws, no_extra) = (flag("disable_any_whitespace")?, flag("disable_additional_properties")?);
        let mut kinds = Vec::new();
        for (key, value) in obj {
            let field = format!("structured_outputs.{key}");
            if value.is_null() {
                continue;
            }
            let constraint = match key.as_str() {
                "json" => StructuredConstraint::Json(schema_of(&field, value)?),
                "regex" => StructuredConstraint::Regex(string_of(&field, value)?),
                "choice" => StructuredConstraint::Choice(choices_of(&field, value)?),
                "grammar" => StructuredConstraint::Grammar(string_of(&field, value)?),
                "json_object" => match value {
                    Value::Bool(true) => StructuredConstraint::JsonObject,
                    Value::Bool(false) => continue,
                    v => return Err(bad(&field, format!("`{field}` must be a boolean, got {v}"))),
                },
                "disable_any_whitespace" | "disable_additional_properties" | "disable_fallback" | "whitespace_pattern"
                | "backend" | "_backend" => continue,
                "structural_tag" => return Err(bad(&field, format!("`{field}` is not supported"))),
                other => {
                    return Err(bad(
                        "structured_outputs",
                        format!("Unknown field `structured_outputs.{other}`; expected json, regex, choice, grammar or json_object"),
                    ))
                }
            };
            let mut p = with_field(constraint, &field);
            p.disable_any_whitespace = no_ws;
            p.disable_additional_properties = no_extra;
            kinds.push(p);
        }
        if kinds.is_empty() {
            return Err(bad(
                "structured_outputs",
                "`structured_outputs` must set one of json, regex, choice, grammar or json_object",
            ));
        }
        found.extend(kinds);
    }
    if let Some(v) = f.guided_json.filter(|v| !v.is_null()) {
        found.push(with_field(StructuredConstraint::Json(schema_of("guided_json", v)?), "guided_json"));
    }
    if let Some(v) = f.guided_regex.filter(|v| !v.is_null()) {
        found.push(with_field(StructuredConstraint::Regex(string_of("guided_regex", v)?), "guided_regex"));
    }
    if let Some(v) = f.guided_choice.filter(|v| !v.is_null()) {
        found.push(with_field(StructuredConstraint::Choice(choices_of("guided_choice", v)?), "guided_choice"));
    }
    if let Some(v) = f.guided_grammar.filter(|v| !v.is_null()) {
        found.push(with_field(StructuredConstraint::Grammar(string_of("guided_grammar", v)?), "guided_grammar"));
    }
    Ok(found)
}

/// The request's one constraint, if any. More than one is a 400 naming them.
pub fn parse(f: &StructuredFields<'_>) -> Result<Option<StructuredOutputsParams>, ApiError> {
    let mut found = collect(f)?;
    if found.len() > 1 {
        let names: Vec<String> = found.iter().map(|p| format!("`{}`", p.field)).collect();
        return Err(bad(
            &found[0].field,
            format!("Only one kind of structured output may be requested, got {}", names.join(" and ")),
        ));
    }
    Ok(found.pop())
}

/// How a chat request's `tools` / `tool_choice` constrain the output.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// No forced tool call (no tools, or `tool_choice: "none"`).
    None,
    /// `tool_choice` names one function: the output is its arguments object.
    Named(String),
    /// `tool_choice: "required"`: the output is a list of `{"name", "parameters"}` calls.
    Required,
}

fn function_of(tool: &Value) -> Option<(&str, Value)> {
    let f = tool.get("function")?;
    let name = f.get("name")?.as_str()?;
    let params = f.get("parameters").filter(|p| p.is_object()).cloned().unwrap_or_else(|| json!({"type": "object"}));
    Some((name, params))
}

/// The tool mode and its constraint. `"auto"` and an absent `tool_choice` with tools are refused by
/// the caller (they need a tool-call parser), as vLLM does without `--enable-auto-tool-choice`.
pub fn tool_constraint(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
) -> Result<(ToolMode, Option<StructuredOutputsParams>), ApiError> {
    let tools: Vec<&Value> = match tools {
        Some(Value::Array(t)) => t.iter().collect(),
        _ => Vec::new(),
    };
    let functions: Vec<(&str, Value)> = tools.iter().filter_map(|t| function_of(t)).collect();
    match tool_choice {
        Some(Value::String(s)) if s == "required" => {
            if functions.is_empty() {
                return Err(bad("tool_choice", "`tool_choice` is `required` but no `tools` were given"));
            }
            let variants: Vec<Value> = functions
                .iter()
                .map(|(name, params)| {
                    json!({"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                           "required": ["name", "parameters"], "additionalProperties": false})
                })
                .collect();
            let schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": variants}});
            let c = with_field(StructuredConstraint::Json(schema), "tools");
            Ok((ToolMode::Required, Some(c)))
        }
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
                bad(
                    "tool_choice",
                    "A named `tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )
            })?;
            let (_, params) = functions
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| bad("tool_choice", format!("Tool '{name}' has not been passed in `tools`.")))?;
            let c = with_field(StructuredConstraint::Json(params.clone()), "tools");
            Ok((ToolMode::Named(name.to_string()), Some(c)))
        }
        _ => Ok((ToolMode::None, None)),
    }
}

/// One OpenAI tool call.
pub fn tool_call(name: &str, arguments: String) -> Value {
    json!({"id": format!("chatcmpl-tool-{}", random_uuid()), "type": "function",
           "function": {"name": name, "arguments": arguments}})
}

/// The tool calls a constrained output encodes, or `None` when it does not parse (a length cut-off).
pub fn tool_calls_from_text(mode: &ToolMode, text: &str) -> Option<Vec<Value>> {
    match mode {
        ToolMode::None => None,
        ToolMode::Named(name) => {
            let args: Value = serde_json::from_str(text).ok()?;
            Some(vec![tool_call(name, args.to_string())])
        }
        ToolMode::Required => {
            let calls: Value = serde_json::from_str(text).ok()?;
            calls
                .as_array()?
                .iter()
                .map(|c| Some(tool_call(c.get("name")?.as_str()?, c.get("parameters")?.to_string())))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(f: StructuredFields<'_>) -> Result<Option<StructuredOutputsParams>, ApiError> {
        parse(&f)
    }

    #[test]
    fn every_surface_maps_to_one_constraint() {
        let rf = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}});
        let p = parse_one(StructuredFields { response_format: Some(&rf), ..Default::default() }).unwrap().unwrap();
        assert_eq!(p.field, "response_format.json_schema.schema");
        let so = json!({"regex": "a+", "disable_any_whitespace": true});
        let p = parse_one(StructuredFields { structured_outputs: Some(&so), ..Default::default() }).unwrap().unwrap();
        assert_eq!(p.constraint, StructuredConstraint::Regex("a+".into()));
        assert!(p.disable_any_whitespace);
        let gc = json!(["a", "b"]);
        let p = parse_one(StructuredFields { guided_choice: Some(&gc), ..Default::default() }).unwrap().unwrap();
        assert_eq!(p.field, "guided_choice");
        let text = json!({"type": "text"});
        assert!(parse_one(StructuredFields { response_format: Some(&text), ..Default::default() }).unwrap().is_none());
    }

    #[test]
    fn two_kinds_or_empty_choices_are_400() {
        let so = json!({"regex": "a", "choice": ["x"]});
        let e = parse_one(StructuredFields { structured_outputs: Some(&so), ..Default::default() }).unwrap_err();
        assert!(e.message.contains("Only one kind"), "{}", e.message);
        let gr = json!("a");
        let rf = json!({"type": "json_object"});
        let e =
            parse_one(StructuredFields { guided_regex: Some(&gr), response_format: Some(&rf), ..Default::default() })
                .unwrap_err();
        assert!(e.message.contains("`guided_regex`") && e.message.contains("`response_format`"), "{}", e.message);
        let empty = json!([]);
        let e = parse_one(StructuredFields { guided_choice: Some(&empty), ..Default::default() }).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("guided_choice"));
    }

    #[test]
    fn tool_calls_come_from_the_constrained_text() {
        let tools =
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        let choice = json!({"type": "function", "function": {"name": "get_weather"}});
        let (mode, c) = tool_constraint(Some(&tools), Some(&choice)).unwrap();
        assert_eq!(mode, ToolMode::Named("get_weather".into()));
        assert!(c.is_some());
        let calls = tool_calls_from_text(&mode, r#"{"city": "Oslo"}"#).unwrap();
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let calls = tool_calls_from_text(&ToolMode::Required, r#"[{"name": "f", "parameters": {"a": 1}}]"#).unwrap();
        assert_eq!(calls[0]["function"]["arguments"], r#"{"a":1}"#);
        let missing = json!({"type": "function", "function": {"name": "nope"}});
        assert!(tool_constraint(Some(&tools), Some(&missing)).is_err());
    }
}
