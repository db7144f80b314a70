//! Chat templates: a model folder's Jinja chat template, found and rendered as transformers'
//! `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does, and the chat
//! prompts lm-evaluation-harness builds with `--apply_chat_template`.
//!
//! # Where the template comes from (transformers 5.x, `PreTrainedTokenizerBase.from_pretrained`)
//!
//! `chat_template.jinja` in the folder, when it exists, is the template (named `default`), with the
//! named templates of `additional_chat_templates/NAME.jinja` beside it; otherwise `chat_template` in
//! `tokenizer_config.json`: a string, or a list of `{"name": ..., "template": ...}` objects. With
//! several templates the one used is the requested name, else `default` (without one it is an error,
//! as in transformers' `get_chat_template`). The template sees the tokenizer's named special tokens
//! (`special_tokens_map`: `bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`,
//! `cls_token`, `mask_token`) as strings: in `tokenizer_config.json` each is a string or an
//! `AddedToken` object (its `content`); `special_tokens_map.json` fills those the config lacks.
//!
//! # How it renders (`utils/chat_template_utils.py`: `_cached_compile_jinja_template`, `render_jinja_template`)
//!
//! transformers compiles the template in an `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])` (and Jinja's default of dropping
//! one trailing newline of the source), with globals `raise_exception(message)` (a `TemplateError`),
//! `strftime_now(format)`, `dict` and `namespace`, and its own `tojson` filter (`json.dumps(x,
//! ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, not Jinja's HTML-escaping
//! one); it renders with `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the
//! special tokens. Here minijinja renders it with the same settings, Python's `str`/`dict`/`list`
//! methods from minijinja-contrib's `pycompat`, a `tojson` that writes what `json.dumps` writes, and
//! `{% generation %}` blocks (the assistant-mask tag) rendered as their body. `strftime_now` formats
//! the current UTC time (Python's `datetime.now()` is local time; the machines here run in UTC).
//!
//! # Chat prompts (lm-eval 0.4.13, `api/task.py` `fewshot_context`, `build_qa_turn`, `construct_requests`; `api/utils.py`)
//!
//! Messages: a system message when the system prompt is not empty (`maybe_delimit(system_instruction,
//! description, fewshot_delimiter)`: joined by the delimiter unless either side has white space at the
//! join; icl's `prompt_string` plays lm-eval's task `description`); per shot a user message (the shot's
//! question) and an assistant message (its gold answer); then a user message with the example's
//! question. With `fewshot_as_multiturn` these are the turns; without, `multiturn_to_singleturn` folds
//! everything after the system message into one user message, each shot written `question +
//! target_delimiter + answer + fewshot_delimiter` (icl's `continuation_delimiter` and
//! `example_delimiter`), then the question. The conversation is rendered with
//! `add_generation_prompt=True` (lm-eval's `partial(chat_template, add_generation_prompt=not
//! gen_prefix)`; icl has no `gen_prefix`); when rendering fails and there is a system message,
//! lm-eval's `HFLM.apply_chat_template` renders again without it (a template that refuses the
//! system role), and so does icl.
//!
//! Targets: multiple choice drops the target delimiter under a chat template (`construct_requests`:
//! `target_delimiter = ""` without a `gen_prefix`), so a choice is scored as `strip(choice)` right
//! after the rendered prompt; schema tasks (lm-eval's multiple-input mode) likewise score
//! `strip(continuation)` after each rendered context option; language modelling keeps its target
//! `" " + strip(continuation)` (lm-eval's `loglikelihood` requests use `doc_to_target` as it is).
//! The rendered prompt is not stripped: its trailing white space (SmolLM2's `<|im_start|>assistant\n`)
//! moves to the front of the continuation when tokenized ([`crate::encode_requests`], lm-eval's
//! `_encode_pair`), and a generation prompt is tokenized whole. lm-eval's HF backend tokenizes a
//! rendered prompt that starts with the BOS text without adding special tokens; icl never adds them.
//!
//! Without a chat template, a system instruction is put before the whole prompt with nothing between
//! (lm-eval renders its system `Message` with an empty delimiter).

use crate::{prompts, py_strip, Error, Prompt, PromptOptions, Result, Task, TaskExamples};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// The named special tokens transformers passes to every chat template (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.to_owned(), content: content.into() }
    }
}

/// A model's chat template and the special tokens it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    source: String,
    /// The file the template was read from; errors name it.
    path: PathBuf,
    /// `(name, text)` of the special tokens the folder defines.
    special_tokens: Vec<(String, String)>,
}

impl ChatTemplate {
    /// A template given as text; `path` names it in errors.
    pub fn new(source: impl Into<String>, path: impl Into<PathBuf>, special_tokens: Vec<(String, String)>) -> Self {
        Self { source: source.into(), path: path.into(), special_tokens }
    }

    /// The chat template of a Hugging Face model folder, by transformers' rules (see the module doc):
    /// `name` picks one of several named templates. `Ok(None)` when the folder has none.
    pub fn from_model_dir(dir: &Path, name: Option<&str>) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?;
        let mut special_tokens = special_tokens(&config_path, &config)?;
        let map_path = dir.join("special_tokens_map.json");
        if let Some(map) = read_json_object(&map_path)? {
            for (key, text) in special_tokens_from(&map_path, &map)? {
                if !special_tokens.iter().any(|(k, _)| *k == key) {
                    special_tokens.push((key, text));
                }
            }
        }
        // Named templates: (name, source, file).
        let mut templates: Vec<(String, String, PathBuf)> = Vec::new();
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            templates.push(("default".into(), read_text(&jinja)?, jinja));
            let extra = dir.join("additional_chat_templates");
            if extra.is_dir() {
                let entries = std::fs::read_dir(&extra).map_err(|source| Error::Io { path: extra.clone(), source })?;
                let mut files: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
                    .collect();
                files.sort();
                for file in files {
                    let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    templates.push((name, read_text(&file)?, file));
                }
            }
        } else if let Some(value) = config.as_ref().and_then(|c| c.get("chat_template")) {
            let field_error = |message: String| Error::File {
                path: config_path.clone(),
                message: format!("key chat_template: {message}"),
            };
            match value {
                Json::String(s) => templates.push(("default".into(), s.clone(), config_path.clone())),
                Json::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let (Some(Json::String(name)), Some(Json::String(source))) =
                            (item.get("name"), item.get("template"))
                        else {
                            return Err(field_error(format!(
                                "entry {i} is not an object with string `name` and `template`"
                            )));
                        };
                        templates.push((name.clone(), source.clone(), config_path.clone()));
                    }
                }
                Json::Null => {}
                other => {
                    return Err(field_error(format!(
                        "expected a string or a list of named templates, found {}",
                        json_kind(other)
                    )))
                }
            }
        }
        if templates.is_empty() {
            return Ok(None);
        }
        let names = || templates.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>().join(", ");
        let chosen = match name {
            Some(name) => templates.iter().position(|(n, _, _)| n == name).ok_or_else(|| Error::File {
                path: dir.to_owned(),
                message: format!("no chat template named `{name}` (the folder has: {})", names()),
            })?,
            // chat_template.jinja and a string in the config are `default`; a list must name one so.
            None => templates.iter().position(|(n, _, _)| n == "default").ok_or_else(|| Error::File {
                path: templates[0].2.clone(),
                message: format!("key chat_template: no template named `default` (name one of: {})", names()),
            })?,
        };
        let (_, source, path) = templates.swap_remove(chosen);
        Ok(Some(Self { source, path, special_tokens }))
    }

    /// The file the template came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The conversation as transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` writes it. Errors name the template file and give Jinja's message
    /// (a syntax error, `raise_exception`'s message, an undefined value used wrongly).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.compile()?.render(messages, add_generation_prompt)
    }

    /// The template parsed once, to render many conversations.
    pub fn compile(&self) -> Result<CompiledChatTemplate<'_>> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let name = self.path.file_name().map_or_else(|| "chat_template".into(), |n| n.to_string_lossy().into_owned());
        env.add_template_owned(name.clone(), without_generation_tags(&self.source)).map_err(|e| self.error(&e))?;
        Ok(CompiledChatTemplate { env, name, template: self })
    }

    fn error(&self, e: &minijinja::Error) -> Error {
        let mut message = e.to_string();
        // A `raise_exception` message is the template author's: give it without minijinja's prefix.
        if e.kind() == ErrorKind::InvalidOperation {
            if let Some(detail) = e.detail() {
                message = match e.line() {
                    Some(line) => format!("{detail} (line {line})"),
                    None => detail.to_owned(),
                };
            }
        }
        Error::ChatTemplate { path: self.path.clone(), message }
    }
}

/// A [`ChatTemplate`] parsed, ready to render.
#[derive(Debug)]
pub struct CompiledChatTemplate<'a> {
    env: Environment<'static>,
    name: String,
    template: &'a ChatTemplate,
}

impl CompiledChatTemplate<'_> {
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(&self.name).map_err(|e| self.template.error(&e))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_iter([("role", Value::from(m.role.as_str())), ("content", Value::from(m.content.as_str()))])
            })
            .collect();
        let mut context: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from(messages)),
            ("tools".into(), Value::from(())),
            ("documents".into(), Value::from(())),
            ("add_generation_prompt".into(), Value::from(add_generation_prompt)),
        ];
        context.extend(self.template.special_tokens.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))));
        template.render(Value::from_iter(context)).map_err(|e| self.template.error(&e))
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })
}

/// A JSON object file; `None` when the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Json>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read_text(path)?;
    match serde_json::from_str::<Json>(&text) {
        Ok(Json::Object(map)) => Ok(Some(map)),
        Ok(other) => Err(Error::File {
            path: path.to_owned(),
            message: format!("expected a JSON object, found {}", json_kind(&other)),
        }),
        Err(e) => Err(Error::Json { path: path.to_owned(), line: e.line(), message: e.to_string() }),
    }
}

fn special_tokens(path: &Path, config: &Option<serde_json::Map<String, Json>>) -> Result<Vec<(String, String)>> {
    match config {
        Some(config) => special_tokens_from(path, config),
        None => Ok(Vec::new()),
    }
}

/// The named special tokens of a tokenizer config: strings, or `AddedToken` objects (`content`).
fn special_tokens_from(path: &Path, config: &serde_json::Map<String, Json>) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for key in SPECIAL_TOKENS {
        let text = match config.get(key) {
            None | Some(Json::Null) => continue,
            Some(Json::String(s)) => s.clone(),
            Some(Json::Object(o)) => match o.get("content") {
                Some(Json::String(s)) => s.clone(),
                _ => {
                    return Err(Error::File {
                        path: path.to_owned(),
                        message: format!("key {key}: an AddedToken object without a string `content`"),
                    })
                }
            },
            Some(other) => {
                return Err(Error::File {
                    path: path.to_owned(),
                    message: format!(
                        "key {key}: expected a string or an AddedToken object, found {}",
                        json_kind(other)
                    ),
                })
            }
        };
        out.push((key.to_owned(), text));
    }
    Ok(out)
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// transformers' `raise_exception(message)`: the render fails with the template's message.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `{% generation %}`...`{% endgeneration %}` (transformers' `AssistantTracker` tag, which only
/// records where assistant text lies) becomes `{% if true %}`...`{% endif %}`: the same body, and the
/// same white-space control marks on the tags.
fn without_generation_tags(source: &str) -> String {
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
        let (open_trim, body) = inner.strip_prefix('-').map_or(("", inner), |b| ("-", b));
        let (body, close_trim) = body.strip_suffix('-').map_or((body, ""), |b| (b, "-"));
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{open_trim} if true {close_trim}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open_trim} endif {close_trim}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson` filter: Python's `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each keyword settable.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::Number => {
            Some(" ".repeat(usize::try_from(i64::try_from(v)?.max(0)).unwrap_or(0)))
        }
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                ))
            }
        },
    };
    // json.dumps: (', ', ': ') by default, (',', ': ') with an indent.
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_owned(), b.as_str().unwrap_or_default().to_owned())
                }
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
    };
    let options = PyJson {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    options.write(&value, 0, &mut out)?;
    Ok(Value::from(out))
}

struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, value: &Value, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => match value.as_i64() {
                Some(i) if !is_float(value) => out.push_str(&i.to_string()),
                _ => out.push_str(&py_float_repr(f64::try_from(value.clone())?)),
            },
            ValueKind::String => self.write_str(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container('[', ']', items.len(), level, out, |i, out| {
                    self.write(&items[i], level + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut pairs: Vec<(Value, Value)> =
                    value.try_iter()?.map(|k| (k.clone(), value.get_item(&k).unwrap_or_default())).collect();
                if self.sort_keys {
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container('{', '}', pairs.len(), level, out, |i, out| {
                    let (k, v) = &pairs[i];
                    match k.as_str() {
                        Some(s) => self.write_str(s, out),
                        // json.dumps writes int, float, bool and None keys as strings.
                        None => self.write_str(&py_key(k), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(v, level + 1, out)
                })?;
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: {} is not JSON serializable", value.kind()),
                ))
            }
        }
        Ok(())
    }

    fn write_container(
        &self,
        open: char,
        close: char,
        len: usize,
        level: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(level + 1, out);
            item(i, out)?;
        }
        self.newline(level, out);
        out.push(close);
        Ok(())
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

fn is_float(value: &Value) -> bool {
    // minijinja keeps floats and integers apart; an integer converts to i64 exactly.
    value.as_i64().is_none() || value.to_string().contains(['.', 'e', 'E', 'n', 'N', 'i'])
}

/// A non-string dict key as `json.dumps` writes it.
fn py_key(k: &Value) -> String {
    match k.kind() {
        ValueKind::None | ValueKind::Undefined => "null".into(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number if is_float(k) => py_float_repr(f64::try_from(k.clone()).unwrap_or(f64::NAN)),
        _ => k.to_string(),
    }
}

/// Python's `float.__repr__` (what `json.dumps` writes): the shortest round-trip digits, positional
/// for exponents -4..16 (with `.0` when integral), else `d.ddde+XX`.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let (head, tail) = digits.split_at(1);
        let tail = if tail.is_empty() { String::new() } else { format!(".{tail}") };
        let esign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{head}{tail}e{esign}{:02}", exponent.unsigned_abs())
    }
}

/// transformers' `strftime_now(format)`: the current time (UTC here) in C `strftime` codes.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    Ok(Value::from(strftime(&format, secs)))
}

/// `strftime` on a UTC time given as seconds since 1970, in the C locale.
fn strftime(format: &str, unix_seconds: i64) -> String {
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
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_seconds.div_euclid(86_400);
    let second_of_day = unix_seconds.rem_euclid(86_400);
    let (hour, minute, second) = (second_of_day / 3600, second_of_day % 3600 / 60, second_of_day % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday).
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const BEFORE_MONTH: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = BEFORE_MONTH[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('u') => out.push_str(&(weekday + 1).to_string()),
            Some('w') => out.push_str(&((weekday + 1) % 7).to_string()),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// lm-eval's `maybe_delimit(prefix, suffix, delimiter)`: the two joined by `delimiter` unless one is
/// empty or either has white space at the join.
fn maybe_delimit(prefix: &str, suffix: &str, delimiter: &str) -> String {
    match (prefix.chars().last(), suffix.chars().next()) {
        (None, _) => suffix.to_owned(),
        (_, None) => prefix.to_owned(),
        (Some(a), Some(b)) if a.is_whitespace() || b.is_whitespace() => format!("{prefix}{suffix}"),
        _ => format!("{prefix}{delimiter}{suffix}"),
    }
}

/// The chat prompts of the first `limit` examples (see the module doc): `options.chat_template` must
/// be set. The shots are those of [`prompts`] (its sampler, its errors); perplexity documents are
/// scored after no context, as plain (lm-eval's rolling log-likelihood has no prompt to template).
pub fn chat_prompts(task: &Task, options: &PromptOptions, limit: Option<usize>) -> Result<Vec<Prompt>> {
    let Some(template) = &options.chat_template else {
        return Err(Error::Example {
            task: task.name.clone(),
            index: 0,
            message: "chat prompts asked for without a chat template".into(),
        });
    };
    let compiled = template.compile()?;
    let (cd, ed) = (options.continuation_delimiter.as_str(), options.example_delimiter());
    let system = maybe_delimit(options.system_instruction.as_deref().unwrap_or(""), &options.prompt_string, ed);
    // A row's (question, gold answer) as a shot.
    let shot = |i: usize| -> (&str, &str) {
        match &task.examples {
            TaskExamples::LanguageModeling(v) => (py_strip(&v[i].context), py_strip(&v[i].continuation)),
            TaskExamples::MultipleChoice(v) => (py_strip(&v[i].query), py_strip(&v[i].choices[v[i].gold])),
            TaskExamples::Schema(v) => (py_strip(&v[i].context_options[v[i].gold]), py_strip(&v[i].continuation)),
            TaskExamples::GenerationWithAnswers(v) => (py_strip(&v[i].context), py_strip(&v[i].answer)),
            TaskExamples::Perplexity(v) => (v[i].text.as_str(), ""),
        }
    };
    let render = |example: usize, shots: &[usize], question: &str| -> Result<String> {
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        if options.fewshot_as_multiturn {
            for &i in shots {
                let (q, a) = shot(i);
                messages.push(ChatMessage::new("user", q));
                messages.push(ChatMessage::new("assistant", a));
            }
            messages.push(ChatMessage::new("user", question));
        } else {
            let mut content = String::new();
            for &i in shots {
                let (q, a) = shot(i);
                content.push_str(&format!("{q}{cd}{a}{ed}"));
            }
            content.push_str(question);
            messages.push(ChatMessage::new("user", content));
        }
        compiled
            .render(&messages, true)
            .or_else(|e| {
                // lm-eval renders again without the system turn when the template fails.
                if messages.first().is_some_and(|m| m.role == "system") {
                    compiled.render(&messages[1..], true)
                } else {
                    Err(e)
                }
            })
            .map_err(|e| match e {
                Error::ChatTemplate { path, message } => Error::ChatTemplate {
                    path,
                    message: format!("{message} (rendering the prompt of {} example {example})", task.name),
                },
                other => other,
            })
    };
    prompts(task, options, limit)?
        .into_iter()
        .map(|mut p| {
            let (example, shots) = (p.example, p.shots.as_slice());
            match &task.examples {
                // lm-eval scores `doc_to_target` as it is after a loglikelihood context.
                TaskExamples::LanguageModeling(v) => {
                    p.contexts = vec![render(example, shots, py_strip(&v[example].context))?];
                }
                // No target delimiter under a template (`construct_requests`).
                TaskExamples::MultipleChoice(v) => {
                    p.contexts = vec![render(example, shots, py_strip(&v[example].query))?];
                    p.targets = v[example].choices.iter().map(|c| py_strip(c).to_owned()).collect();
                }
                TaskExamples::Schema(v) => {
                    p.contexts = v[example]
                        .context_options
                        .iter()
                        .map(|o| render(example, shots, py_strip(o)))
                        .collect::<Result<_>>()?;
                    p.targets = vec![py_strip(&v[example].continuation).to_owned()];
                }
                TaskExamples::GenerationWithAnswers(v) => {
                    p.contexts = vec![render(example, shots, py_strip(&v[example].context))?];
                }
                TaskExamples::Perplexity(_) => {}
            }
            Ok(p)
        })
        .collect()
}

/// The prompts of the first `limit` examples as `options` asks: chat prompts ([`chat_prompts`]) under
/// a chat template, else [`prompts`] with the system instruction, if any, right before each context
/// (lm-eval writes its system `Message` with an empty delimiter; perplexity documents have no
/// context and get none).
pub fn build_prompts(task: &Task, options: &PromptOptions, limit: Option<usize>) -> Result<Vec<Prompt>> {
    if options.chat_template.is_some() {
        return chat_prompts(task, options, limit);
    }
    let mut plain = prompts(task, options, limit)?;
    let perplexity = matches!(task.examples, TaskExamples::Perplexity(_));
    if let Some(instruction) = options.system_instruction.as_deref().filter(|s| !s.is_empty() && !perplexity) {
        for c in plain.iter_mut().flat_map(|p| &mut p.contexts) {
            c.insert_str(0, instruction);
        }
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ChatTemplate {
        let source = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}\n";
        ChatTemplate::new(source, "chat_template.jinja", vec![("bos_token".into(), "<|im_start|>".into())])
    }

    #[test]
    fn renders_smollm2() {
        let t = smollm2();
        let out = t.render(&[ChatMessage::new("user", "hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "hi")], false).unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn raise_exception_names_the_file_and_message() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Roles must be user or assistant') }}{% endif %}{{ m.content }}{% endfor %}",
            "/m/chat_template.jinja",
            vec![],
        );
        let e = t.render(&[ChatMessage::new("system", "x")], true).unwrap_err().to_string();
        assert!(e.starts_with("chat template /m/chat_template.jinja: Roles must be user or assistant"), "{e}");
        let e = ChatTemplate::new("{% if %}", "/m/t.jinja", vec![]).render(&[], true).unwrap_err().to_string();
        assert!(e.starts_with("chat template /m/t.jinja: syntax error"), "{e}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = ChatTemplate::new(
            "{{ {'a': [1, 2.5, none, true], 'é': 'x\"\n'} | tojson }}|{{ [1e20, 0.0001, 1e-05, 3.0] | tojson }}|{{ {'b': 1, 'a': {}} | tojson(indent=2, sort_keys=true) }}|{{ 'é' | tojson(ensure_ascii=true) }}",
            "t",
            vec![],
        );
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"a\": [1, 2.5, null, true], \"é\": \"x\\\"\\n\"}|[1e+20, 0.0001, 1e-05, 3.0]|{\n  \"a\": {},\n  \"b\": 1\n}|\"\\u00e9\""
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        assert_eq!(
            without_generation_tags("a{%- generation -%} b {% endgeneration %}{% if x %}"),
            "a{%- if true -%} b {% endif %}{% if x %}"
        );
    }

    #[test]
    fn strftime_matches_c() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %a %b %j %I%p %%", t), "2024-02-29 13:05:09 Thu Feb 060 01PM %");
        assert_eq!(strftime("%d %B %Y %A", 0), "01 January 1970 Thursday");
    }

    #[test]
    fn maybe_delimit_follows_lm_eval() {
        assert_eq!(maybe_delimit("a", "b", "\n\n"), "a\n\nb");
        assert_eq!(maybe_delimit("a ", "b", "\n\n"), "a b");
        assert_eq!(maybe_delimit("", "b", "\n\n"), "b");
        assert_eq!(maybe_delimit("a", "", "\n\n"), "a");
    }

    fn piqa_like() -> Task {
        use crate::ChoiceExample;
        let row = |q: &str, a: &str, b: &str, gold| ChoiceExample {
            query: format!(" {q}\n"),
            choices: vec![format!("{a} "), b.into()],
            gold,
        };
        Task {
            name: "mc".into(),
            path: PathBuf::new(),
            examples: TaskExamples::MultipleChoice(vec![
                row("Q0", "a0", "b0", 0),
                row("Q1", "a1", "b1", 1),
                row("Q2", "a2", "b2", 1),
            ]),
        }
    }

    /// A template that shows every turn plainly.
    fn plain_template() -> ChatTemplate {
        ChatTemplate::new(
            "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]\n{% endif %}",
            "t.jinja",
            vec![],
        )
    }

    #[test]
    fn chat_prompts_follow_lm_eval() {
        let task = piqa_like();
        let options = PromptOptions { chat_template: Some(plain_template()), ..Default::default() };
        let p = build_prompts(&task, &options, Some(1)).unwrap();
        // Zero-shot: one user turn with the stripped question; choices without the target delimiter.
        assert_eq!(p[0].contexts, vec!["[user]Q0[assistant]\n".to_owned()]);
        assert_eq!(p[0].targets, vec!["a0".to_owned(), "b0".to_owned()]);

        let text = |i: usize| [("Q0", "a0"), ("Q1", "b1"), ("Q2", "b2")][i];
        let multiturn = PromptOptions {
            num_fewshot: 2,
            fewshot_as_multiturn: true,
            system_instruction: Some("Sys".into()),
            prompt_string: "About:".into(),
            example_delimiter: Some("\n\n".into()),
            ..options.clone()
        };
        let p = build_prompts(&task, &multiturn, None).unwrap();
        let shots = &prompts(&task, &multiturn, None).unwrap()[2].shots;
        assert_eq!(p[2].shots, *shots);
        let (s0, s1) = (text(shots[0]), text(shots[1]));
        // System: maybe_delimit(system_instruction, description = prompt_string, fewshot_delimiter).
        assert_eq!(
            p[2].contexts[0],
            format!(
                "[system]Sys\n\nAbout:[user]{}[assistant]{}[user]{}[assistant]{}[user]Q2[assistant]\n",
                s0.0, s0.1, s1.0, s1.1
            )
        );
        let single = PromptOptions { fewshot_as_multiturn: false, continuation_delimiter: " A: ".into(), ..multiturn };
        let p = build_prompts(&task, &single, None).unwrap();
        assert_eq!(
            p[2].contexts[0],
            format!("[system]Sys\n\nAbout:[user]{} A: {}\n\n{} A: {}\n\nQ2[assistant]\n", s0.0, s0.1, s1.0, s1.1)
        );
    }

    #[test]
    fn a_template_that_refuses_the_system_turn_renders_without_it() {
        let template = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}<{{ m.content }}>{% endfor %}",
            "t.jinja",
            vec![],
        );
        let options = PromptOptions {
            chat_template: Some(template),
            system_instruction: Some("Sys".into()),
            ..Default::default()
        };
        assert_eq!(build_prompts(&piqa_like(), &options, Some(1)).unwrap()[0].contexts, vec!["<Q0>".to_owned()]);
        // Without a template the instruction goes right before the plain prompt.
        let options = PromptOptions { system_instruction: Some("Sys: ".into()), ..Default::default() };
        let p = build_prompts(&piqa_like(), &options, Some(1)).unwrap();
        assert_eq!((p[0].contexts[0].as_str(), p[0].targets[0].as_str()), ("Sys: Q0", " a0"));
    }

    #[test]
    fn finds_templates_like_transformers() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ChatTemplate::from_model_dir(dir.path(), None).unwrap(), None);
        let config = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &config,
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "chat_template": [{"name": "default", "template": "D{{ bos_token }}"}, {"name": "rag", "template": "R"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_model_dir(dir.path(), None).unwrap().unwrap();
        assert_eq!((t.source(), t.path()), ("D{{ bos_token }}", config.as_path()));
        assert_eq!(t.render(&[], false).unwrap(), "D<s>");
        assert_eq!(ChatTemplate::from_model_dir(dir.path(), Some("rag")).unwrap().unwrap().source(), "R");
        let e = ChatTemplate::from_model_dir(dir.path(), Some("x")).unwrap_err().to_string();
        assert!(e.contains("no chat template named `x` (the folder has: default, rag)"), "{e}");
        // chat_template.jinja wins over the config's key.
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}\n").unwrap();
        let t = ChatTemplate::from_model_dir(dir.path(), None).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "J</s>");
        std::fs::write(&config, r#"{"chat_template": 3}"#).unwrap();
        std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
        let e = ChatTemplate::from_model_dir(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json: key chat_template: expected a string"), "{e}");
    }
}
