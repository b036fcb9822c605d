//! Chat templates: the Jinja programs that Hugging Face models ship to turn a list of messages into
//! the prompt text the model was trained on, rendered with minijinja.
//!
//! The invariant is that [`ChatTemplate::render`] gives the string transformers'
//! `apply_chat_template(..., tokenize=False)` gives, so we set up minijinja the way transformers sets
//! up its sandboxed Jinja environment:
//! - `trim_blocks` and `lstrip_blocks` on, a single trailing newline of the template dropped;
//! - loop controls (`{% break %}`, `{% continue %}`);
//! - `raise_exception(msg)`, which templates call to reject a conversation (becomes
//!   [`ChatTemplateError::Raised`] with that message), and `strftime_now(fmt)` (Llama 3.x prints
//!   today's date; we use UTC);
//! - `tojson` as transformers defines it: Python's `json.dumps` with `ensure_ascii=False`, so no HTML
//!   escaping and `", "`/`": "` separators, with `indent`, `separators` and `sort_keys`;
//! - Python string and dict methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, `.get()`,
//!   ...) from minijinja-contrib's `pycompat`;
//! - transformers' `{% generation %}` block (marks assistant text for training masks) renders as a
//!   plain block.
//!
//! The context is what transformers passes: `messages`, `tools` and `documents` (none unless given),
//! `add_generation_prompt`, `bos_token`/`eos_token`, then the caller's extra variables
//! (`chat_template_kwargs`, `tools`, ...), which win on a name clash.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. Syntax errors are reported here, not at the first render.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
            .map_err(|source| ChatTemplateError::Syntax { source })?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// Renders `messages` (an array of `{role, content, ...}` objects). `add_generation_prompt`
    /// appends the assistant header so the model answers; `extra` adds or overrides variables.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        if !messages.is_array() {
            return Err(ChatTemplateError::InvalidMessages { found: json_kind(messages) });
        }
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        // `tools`/`documents` are none rather than undefined, so `tools is not none` is false.
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        if let Some(t) = &self.bos_token {
            ctx.insert("bos_token".into(), t.clone().into());
        }
        if let Some(t) = &self.eos_token {
            ctx.insert("eos_token".into(), t.clone().into());
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|source| ChatTemplateError::Render { source })?;
        template.render(Value::from_serialize(&ctx)).map_err(|e| match raised_message(&e) {
            Some(message) => ChatTemplateError::Raised { message },
            None => ChatTemplateError::Render { source: e },
        })
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a bool",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The message of a `raise_exception` call, carried as the error's source so it survives
/// minijinja's wrapping.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RaisedException(String);

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedException(message)))
}

fn raised_message(e: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<RaisedException>() {
            return Some(r.0.clone());
        }
        source = s.source();
    }
    None
}

/// Turns transformers' `{% generation %}`/`{% endgeneration %}` into `{% if true %}`/`{% endif %}`,
/// keeping the whitespace-control markers so the rendered text is unchanged.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                let _ = write!(out, "{{%{left} {r} {right}%}}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn strftime_now(format: String) -> Result<Value, Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Ok(Value::from(strftime(&format, now)))
}

/// A civil date and time in UTC from Unix seconds.
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Sunday.
    weekday: u32,
    /// 1-based day of the year.
    yday: u32,
}

impl DateTime {
    fn from_unix(secs: i64) -> DateTime {
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400) as u32;
        // Howard Hinnant's days-to-civil algorithm.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUMULATIVE[month as usize - 1] + day + u32::from(leap && month > 2);
        DateTime {
            year,
            month,
            day,
            hour: tod / 3600,
            minute: tod / 60 % 60,
            second: tod % 60,
            weekday: (days + 4).rem_euclid(7) as u32,
            yday,
        }
    }
}

/// Python's `strftime` for the directives chat templates use, in UTC and the C locale. Unknown
/// directives are kept as written, as glibc does.
fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    let t = DateTime::from_unix(unix_secs);
    let month = MONTHS[t.month as usize - 1];
    let weekday = DAYS[t.weekday as usize];
    let hour12 = match t.hour % 12 {
        0 => 12,
        h => h,
    };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{}", t.year),
            Some('y') => write!(out, "{:02}", t.year.rem_euclid(100)),
            Some('C') => write!(out, "{:02}", t.year.div_euclid(100)),
            Some('m') => write!(out, "{:02}", t.month),
            Some('d') => write!(out, "{:02}", t.day),
            Some('e') => write!(out, "{:2}", t.day),
            Some('-') => match chars.next() {
                // glibc's no-padding flag, common in templates ("%-d").
                Some('d') => write!(out, "{}", t.day),
                Some('m') => write!(out, "{}", t.month),
                Some('H') => write!(out, "{}", t.hour),
                Some('I') => write!(out, "{hour12}"),
                Some('M') => write!(out, "{}", t.minute),
                Some('S') => write!(out, "{}", t.second),
                Some('j') => write!(out, "{}", t.yday),
                Some(other) => write!(out, "%-{other}"),
                None => write!(out, "%-"),
            },
            Some('H') => write!(out, "{:02}", t.hour),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{:02}", t.minute),
            Some('S') => write!(out, "{:02}", t.second),
            Some('p') => write!(out, "{}", if t.hour < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{:03}", t.yday),
            Some('B') => write!(out, "{month}"),
            Some('b') | Some('h') => write!(out, "{}", &month[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('w') => write!(out, "{}", t.weekday),
            Some('u') => write!(out, "{}", if t.weekday == 0 { 7 } else { t.weekday }),
            Some('F') => write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day),
            Some('T') => write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            Some('D') => write!(out, "{:02}/{:02}/{:02}", t.month, t.day, t.year.rem_euclid(100)),
            Some('Z') => write!(out, "UTC"),
            Some('z') => write!(out, "+0000"),
            Some('n') => writeln!(out),
            Some('t') => write!(out, "\t"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    // ensure_ascii is accepted for compatibility; transformers always passes False by default.
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let item = v.get_item_by_index(0)?;
            let key = v.get_item_by_index(1)?;
            match (item.as_str(), key.as_str()) {
                (Some(i), Some(k)) => (i.to_string(), k.to_string()),
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
            }
        }
        // Python's defaults: no space before a newline when indenting.
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false) };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(unit) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(unit);
            }
        }
    }
}

fn write_json(out: &mut String, value: &Value, style: &JsonStyle, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String | ValueKind::Plain => write_json_string(out, value.as_str().unwrap_or(&value.to_string())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                style.newline(out, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            style.newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                style.newline(out, depth + 1);
                // JSON keys are strings; Python's json.dumps converts numbers and bools the same way.
                let key_text = match key.as_str() {
                    Some(s) => s.to_string(),
                    None if key.is_none() => "null".to_string(),
                    None => key.to_string(),
                };
                write_json_string(out, &key_text);
                out.push_str(&style.key_sep);
                write_json(out, &value.get_item(key)?, style, depth + 1)?;
            }
            style.newline(out, depth);
            out.push('}');
        }
        ValueKind::Bytes => {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: bytes are not JSON serializable"))
        }
        // Functions, macros and anything else Python's json.dumps would reject.
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {} value is not JSON serializable", value.kind()),
            ))
        }
    }
    Ok(())
}

/// A JSON string literal escaped like Python's `json.dumps(ensure_ascii=False)`: quotes,
/// backslashes and control characters only.
fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for exponents in
/// [-4, 16), scientific (`1e-05`, `1.5e+20`) otherwise, and always a `.0` on whole numbers.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // `{:e}` gives Rust's shortest round-trip digits as `d.ddde±x`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{sign}{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("invalid chat template: {source:#}")]
    Syntax {
        #[source]
        source: minijinja::Error,
    },
    /// The template itself rejected the conversation through `raise_exception(message)`.
    #[error("{message}")]
    Raised { message: String },
    #[error("chat template rendering failed: {source:#}")]
    Render {
        #[source]
        source: minijinja::Error,
    },
    #[error("`messages` must be an array of messages, got {found}")]
    InvalidMessages { found: &'static str },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: serde_json::Value, add_generation_prompt: bool) -> String {
        ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))
            .unwrap()
            .render(&messages, add_generation_prompt, &serde_json::Map::new())
            .unwrap()
    }

    #[test]
    fn chatml_with_generation_prompt() {
        let t = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                 {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let out = render(t, json!([{"role": "user", "content": "Hi"}]), true);
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        // Block tags on their own lines leave no blank lines or indentation behind.
        let t = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let out = render(t, json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), false);
        assert_eq!(out, "[a]\n[b]\n");
    }

    #[test]
    fn raise_exception_becomes_a_typed_error() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}ok";
        let tpl = ChatTemplate::new(t, None, None).unwrap();
        let err =
            tpl.render(&json!([{"role": "assistant", "content": "x"}]), false, &serde_json::Map::new()).unwrap_err();
        match err {
            ChatTemplateError::Raised { message } => {
                assert_eq!(message, "Conversation roles must alternate user/assistant/user/assistant/...")
            }
            other => panic!("expected Raised, got {other:?}"),
        }
        let out = tpl.render(&json!([{"role": "user", "content": "x"}]), false, &serde_json::Map::new()).unwrap();
        assert_eq!(out, "ok");
    }

    #[test]
    fn syntax_errors_and_bad_messages() {
        assert!(matches!(ChatTemplate::new("{% for %}", None, None), Err(ChatTemplateError::Syntax { .. })));
        let tpl = ChatTemplate::new("{{ messages }}", None, None).unwrap();
        assert!(matches!(
            tpl.render(&json!({"role": "user"}), false, &serde_json::Map::new()),
            Err(ChatTemplateError::InvalidMessages { .. })
        ));
    }

    #[test]
    fn python_methods_loop_controls_and_namespace() {
        let t = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
                 {% if m.content.startswith('skip') %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}\
                 {{ m.content.strip().upper() }}|{{ m.content.split(',') | length }}|{% for k, v in m.items() %}{{ k }};{% endfor %}\n{% endfor %}{{ ns.n }}";
        let out = render(
            t,
            json!([{"role": "user", "content": "  a,b  "}, {"role": "user", "content": "skip"}, {"role": "user", "content": "never"}]),
            false,
        );
        assert_eq!(out, "A,B|2|content;role;1");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let tpl = ChatTemplate::new(
            "{{ tools | tojson }}\n{{ tools[0] | tojson(indent=2) }}\n{{ x | tojson(separators=(',', ':'), sort_keys=true) }}",
            None,
            None,
        )
        .unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert(
            "tools".into(),
            json!([{"name": "get<weather>", "description": "Ünïcode & \"quotes\"\n", "parameters": {"n": 1, "f": 0.5, "e": [], "o": {}, "big": 1e20, "small": 1e-5, "none": null}}]),
        );
        extra.insert("x".into(), json!({"b": [1, 2.0], "a": true}));
        let out = tpl.render(&json!([]), false, &extra).unwrap();
        let expected = concat!(
            r#"[{"description": "Ünïcode & \"quotes\"\n", "name": "get<weather>", "parameters": {"big": 1e+20, "e": [], "f": 0.5, "n": 1, "none": null, "o": {}, "small": 1e-05}}]"#,
            "\n",
            "{\n  \"description\": \"Ünïcode & \\\"quotes\\\"\\n\",\n  \"name\": \"get<weather>\",\n  \"parameters\": {\n    \"big\": 1e+20,\n    \"e\": [],\n    \"f\": 0.5,\n    \"n\": 1,\n    \"none\": null,\n    \"o\": {},\n    \"small\": 1e-05\n  }\n}",
            "\n",
            r#"{"a":true,"b":[1,2.0]}"#,
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn python_float_reprs() {
        for (f, s) in [
            (0.0, "0.0"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (123456789012345.0, "123456789012345.0"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(python_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %a %B %j %I%p %-d %%", t),
            "2024-07-26 13:25:09 Friday Fri July 208 01PM 26 %"
        );
        assert_eq!(strftime("%F %T", 0), "1970-01-01 00:00:00");
        assert_eq!(strftime("%F %a", 951_782_400), "2000-02-29 Tue");
        assert_eq!(strftime("%F", -86_400), "1969-12-31");
        let rendered = render("{{ strftime_now('%Y') }}", json!([]), false);
        assert!(rendered.len() == 4 && rendered.starts_with('2'), "{rendered}");
    }

    #[test]
    fn generation_blocks_render_as_plain_blocks() {
        let t = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{%- endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}";
        let out = render(t, json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]), false);
        // trim_blocks eats the newline after each block tag, as in Jinja.
        assert_eq!(out, "qa");
        assert_eq!(rewrite_generation_tags("{%- generation +%}x{% endgeneration%}"), "{%- if true +%}x{% endif %}");
    }

    #[test]
    fn context_has_special_tokens_and_extra_wins() {
        let t = "{{ bos_token }}{{ eos_token }}{{ tools is none }}{{ enable_thinking | default('unset') }}";
        let tpl = ChatTemplate::new(t, Some("<s>".into()), Some("</s>".into())).unwrap();
        assert_eq!(tpl.render(&json!([]), false, &serde_json::Map::new()).unwrap(), "<s></s>Trueunset");
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), json!(false));
        extra.insert("bos_token".into(), json!("[BOS]"));
        assert_eq!(tpl.render(&json!([]), false, &extra).unwrap(), "[BOS]</s>TrueFalse");
    }
}
