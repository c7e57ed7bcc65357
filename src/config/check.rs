//! Typed reading of the merged settings table, section by section, collecting every problem
//! (unknown key, wrong type, value out of range) instead of stopping at the first.
//!
//! Each problem names the full key (`batch.max_requests`), where its value came from (the file
//! or the `BATCHD_*` variable) and what to write instead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use super::layers::{Origins, env_var_name};

/// Shortest similarity (Jaro-Winkler, 0 to 1) at which an unknown key is offered as a typo.
const SUGGESTION_SIMILARITY: f64 = 0.8;

/// Collects the problems of a whole config and the keys that were read.
pub(super) struct Checker<'o> {
    origins: &'o Origins,
    pub(super) problems: Vec<String>,
    /// Every key the validation reads, as `section.key`, in reading order.
    pub(super) known_keys: Vec<String>,
}

/// One `[section]` being read. Keys are removed from `table` as they are read, so whatever
/// remains when [`Section::finish`] runs is unknown.
pub(super) struct Section<'c, 'o> {
    checker: &'c mut Checker<'o>,
    name: &'static str,
    table: Table,
    read: Vec<&'static str>,
}

/// Returns the closest of `candidates` to `name`, if any is close enough to be a typo.
pub(super) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score >= SUGGESTION_SIMILARITY)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Returns a TOML value's type as problem messages name it.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "a whole number",
        Value::Float(_) => "a fractional number",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

impl<'o> Checker<'o> {
    pub(super) fn new(origins: &'o Origins) -> Self {
        Checker {
            origins,
            problems: Vec::new(),
            known_keys: Vec::new(),
        }
    }

    /// Records a problem of `key`, prefixed with where its value came from.
    pub(super) fn problem(&mut self, key: &str, message: String) {
        match self.origins.describe(key) {
            Some(origin) => self.problems.push(format!("{origin}: {message}")),
            None => self.problems.push(message),
        }
    }

    /// Takes the section `name` out of `root` for reading. A missing section reads as empty.
    pub(super) fn section<'c>(
        &'c mut self,
        root: &mut Table,
        name: &'static str,
    ) -> Section<'c, 'o> {
        let table = match root.remove(name) {
            None => Table::new(),
            Some(Value::Table(table)) => table,
            Some(other) => {
                self.problem(
                    name,
                    format!(
                        "`{name}` = {other} is {}, expected a table: write it as a [{name}] section",
                        type_name(&other)
                    ),
                );
                Table::new()
            }
        };
        Section {
            checker: self,
            name,
            table,
            read: Vec::new(),
        }
    }

    /// Reports whatever is left in `root` after every known section was taken out.
    pub(super) fn unknown_sections(&mut self, root: Table, known: &[&str]) {
        for (name, value) in root {
            let hint = match closest(&name, known.iter().copied()) {
                Some(section) => format!("did you mean [{section}]?"),
                None => format!("the sections are {}", sections_list(known)),
            };
            match value {
                Value::Table(table) if !table.is_empty() => {
                    for key in table.keys() {
                        let full = format!("{name}.{key}");
                        self.problem(
                            &full,
                            format!("`{full}` is in an unknown section [{name}]: {hint}"),
                        );
                    }
                }
                _ => self.problem(&name, format!("`{name}` is not a known section: {hint}")),
            }
        }
    }
}

fn sections_list(known: &[&str]) -> String {
    known
        .iter()
        .map(|s| format!("[{s}]"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Section<'_, '_> {
    fn full(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }

    /// Removes `key` from the section and remembers it as known.
    fn take(&mut self, key: &'static str) -> Option<Value> {
        self.read.push(key);
        self.checker.known_keys.push(self.full(key));
        self.table.remove(key)
    }

    /// Records a problem of `key` in this section.
    pub(super) fn problem(&mut self, key: &str, message: String) {
        let full = self.full(key);
        self.checker.problem(&full, message);
    }

    fn wrong_type(&mut self, key: &str, value: &Value, expected: &str) {
        let full = self.full(key);
        let message = format!(
            "`{full}` = {value} is {}, expected {expected}",
            type_name(value)
        );
        self.checker.problem(&full, message);
    }

    /// Reads a duration in seconds: a positive number, fractions allowed.
    pub(super) fn secs(&mut self, key: &'static str, default: f64) -> Duration {
        Duration::from_secs_f64(self.positive(key, default, "seconds"))
    }

    /// Reads a duration in days: a positive number, fractions allowed.
    pub(super) fn days(&mut self, key: &'static str, default: f64) -> Duration {
        Duration::from_secs_f64(self.positive(key, default, "days") * 86_400.0)
    }

    /// Reads a positive number of `unit`, up to 1e9.
    fn positive(&mut self, key: &'static str, default: f64, unit: &str) -> f64 {
        let value = match self.take(key) {
            None => return default,
            Some(Value::Integer(n)) => n as f64,
            Some(Value::Float(x)) => x,
            Some(other) => {
                self.wrong_type(key, &other, &format!("a number of {unit}"));
                return default;
            }
        };
        if !value.is_finite() || value <= 0.0 || value > 1e9 {
            let full = self.full(key);
            self.problem(
                key,
                format!("`{full}` = {value} is out of range: expected a positive number of {unit} up to 1e9"),
            );
            return default;
        }
        value
    }

    /// Reads a whole number from 1 to `max`.
    pub(super) fn count(&mut self, key: &'static str, default: i64, max: i64) -> i64 {
        self.whole(key, default, 1, max)
    }

    /// Reads a whole number from `min` to `max`.
    pub(super) fn whole(&mut self, key: &'static str, default: i64, min: i64, max: i64) -> i64 {
        let n = match self.take(key) {
            None => return default,
            Some(Value::Integer(n)) => n,
            Some(other) => {
                self.wrong_type(key, &other, &format!("a whole number from {min} to {max}"));
                return default;
            }
        };
        if n < min || n > max {
            let full = self.full(key);
            self.problem(
                key,
                format!(
                    "`{full}` = {n} is out of range: expected a whole number from {min} to {max}"
                ),
            );
            return default;
        }
        n
    }

    pub(super) fn bool(&mut self, key: &'static str, default: bool) -> bool {
        match self.take(key) {
            None => default,
            Some(Value::Boolean(b)) => b,
            Some(other) => {
                self.wrong_type(key, &other, "true or false");
                default
            }
        }
    }

    pub(super) fn string(&mut self, key: &'static str) -> Option<String> {
        match self.take(key) {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.wrong_type(key, &other, "a quoted string");
                None
            }
        }
    }

    /// Reads a path. An empty string counts as missing.
    pub(super) fn path(&mut self, key: &'static str) -> Option<PathBuf> {
        self.string(key)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    }

    pub(super) fn string_list(&mut self, key: &'static str) -> Option<Vec<String>> {
        let value = self.take(key)?;
        let strings = match &value {
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>(),
            _ => None,
        };
        if strings.is_none() {
            self.wrong_type(
                key,
                &value,
                "an array of strings such as [\"/v1/chat/completions\"]",
            );
        }
        strings
    }

    pub(super) fn string_map(&mut self, key: &'static str) -> Option<BTreeMap<String, String>> {
        let value = self.take(key)?;
        let map = match &value {
            Value::Table(table) => table
                .iter()
                .map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect::<Option<BTreeMap<_, _>>>(),
            _ => None,
        };
        if map.is_none() {
            self.wrong_type(
                key,
                &value,
                "a table of strings such as { \"org/big\" = \"org/small\" }",
            );
        }
        map
    }

    /// Reports the keys left unread as unknown, with the closest known key as a suggestion.
    pub(super) fn finish(self) {
        let Section {
            checker,
            name,
            table,
            read,
        } = self;
        for key in table.keys() {
            let full = format!("{name}.{key}");
            let hint = match closest(key, read.iter().copied()) {
                Some(known) if checker.origins.is_env(&full) => format!(
                    "did you mean {}?",
                    env_var_name(name, known)
                ),
                Some(known) => format!("did you mean `{name}.{known}`?"),
                None if name == "provider" && key == "api_key" => {
                    "the API key is never read from the config: use the systemd credential `together_api_key` or TOGETHER_API_KEY".to_string()
                }
                None => format!("remove it; the keys of [{name}] are listed in README.md"),
            };
            checker.problem(&full, format!("`{full}` is not a known key: {hint}"));
        }
    }
}
