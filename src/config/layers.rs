//! The layers under the typed config: the TOML file, then `BATCHD_*` environment variables,
//! merged into one table before validation, and the API key from a systemd credential or the
//! environment.
//!
//! `BATCHD_<SECTION>__<KEY>` sets `section.key`: the names are lowercased and a double
//! underscore separates section from key, so `BATCHD_BATCH__MAX_REQUESTS=50` sets
//! `batch.max_requests`. The value is read as a TOML value when it parses as one (`50`, `0.5`,
//! `true`, `["a", "b"]`, `{ a = "b" }`) and as a plain string otherwise (`info`, a path).
//! Nothing here lists the keys, so a key added later can be set the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::ApiKey;

/// Prefix of the environment variables that set config keys.
pub const ENV_PREFIX: &str = "BATCHD_";

/// `BATCHD_*` variables with their own meaning, never read as config keys.
pub const ENV_RESERVED: [&str; 2] = ["BATCHD_LOG", "BATCHD_FAULT_POINT"];

/// Shorthand for `BATCHD_DAEMON__LOG_FORMAT`, next to `BATCHD_LOG`.
pub const ENV_LOG_FORMAT: &str = "BATCHD_LOG_FORMAT";

/// Environment variable that carries the API key.
pub const API_KEY_ENV: &str = "TOGETHER_API_KEY";

/// Name of the systemd credential (`LoadCredential=together_api_key:/path`) with the API key.
pub const API_KEY_CREDENTIAL: &str = "together_api_key";

/// The process environment as the config reads it; tests build their own.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// Captures the variables of this process (those with UTF-8 names and values).
    pub fn from_process() -> Self {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    pub fn from_vars<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Environment {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }
}

/// The sources of the merged table's values, for problem messages.
#[derive(Debug, Default)]
pub(super) struct Origins {
    /// The config file, or none when the config came from text.
    pub(super) file: Option<PathBuf>,
    /// Full key (`batch.max_requests`) to the variable that set it.
    pub(super) env: BTreeMap<String, String>,
}

impl Origins {
    /// Returns where the value of `key` came from: its variable, else the file.
    pub(super) fn describe(&self, key: &str) -> Option<String> {
        match self.env.get(key) {
            Some(var) => Some(var.clone()),
            None => self.file.as_ref().map(|p| p.display().to_string()),
        }
    }

    pub(super) fn is_env(&self, key: &str) -> bool {
        self.env.contains_key(key)
    }
}

/// Returns the variable that sets `section.key`.
pub fn env_var_name(section: &str, key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}__{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

/// Reads an environment value as a TOML value, or as a string when it is not one.
fn parse_env_value(text: &str) -> Value {
    // Only a single `value = ...` pair counts, so a value cannot smuggle in other keys.
    match toml::from_str::<Table>(&format!("value = {text}")) {
        Ok(mut table) if table.len() == 1 => table.remove("value").expect("one key"),
        _ => Value::String(text.to_string()),
    }
}

/// Merges the `BATCHD_*` variables into `root`, recording their origins. Returns problems with
/// variables that cannot be applied. `sections` are the known section names, used to spot a
/// single underscore where a double one was meant.
pub(super) fn merge_env(
    root: &mut Table,
    env: &Environment,
    sections: &[&str],
    origins: &mut Origins,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (var, text) in &env.vars {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if ENV_RESERVED.contains(&var.as_str()) {
            continue;
        }
        let (section, key) = if var == ENV_LOG_FORMAT {
            ("daemon".to_string(), "log_format".to_string())
        } else if let Some((section, key)) = rest.split_once("__") {
            (section.to_ascii_lowercase(), key.to_ascii_lowercase())
        } else {
            // Other tools' `BATCHD_*` variables pass through, but `BATCHD_BATCH_MAX_REQUESTS`
            // is almost surely a config key with one underscore too few.
            let lower = rest.to_ascii_lowercase();
            if let Some(section) = sections
                .iter()
                .find(|s| lower.strip_prefix(**s).is_some_and(|k| k.starts_with('_')))
            {
                let key = &lower[section.len() + 1..];
                problems.push(format!(
                    "{var}: not applied: separate section and key with a double underscore, as in {}",
                    env_var_name(section, key)
                ));
            }
            continue;
        };
        if section.is_empty() || key.is_empty() {
            problems.push(format!(
                "{var}: not applied: name a section and a key, as in BATCHD_BATCH__MAX_REQUESTS"
            ));
            continue;
        }
        let full = format!("{section}.{key}");
        let entry = root
            .entry(section.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(table) = entry else {
            problems.push(format!(
                "{var}: not applied: `{section}` in the config file is not a [{section}] section"
            ));
            continue;
        };
        table.insert(key, parse_env_value(text));
        origins.env.insert(full, var.clone());
    }
    problems
}

/// Reads the API key: the systemd credential first, then `TOGETHER_API_KEY`. A trailing newline
/// (as `echo key > file` writes) is removed.
pub(super) fn read_api_key(env: &Environment) -> Result<ApiKey, String> {
    if let Some(dir) = env.get("CREDENTIALS_DIRECTORY") {
        let path = Path::new(dir).join(API_KEY_CREDENTIAL);
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok(ApiKey::new(Some(trim_newline(&text).to_string()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "failed to read the API key credential {}: {e}: check `LoadCredential={API_KEY_CREDENTIAL}:...` in the unit",
                    path.display()
                ));
            }
        }
    }
    Ok(ApiKey::new(
        env.get(API_KEY_ENV).map(|k| trim_newline(k).to_string()),
    ))
}

fn trim_newline(text: &str) -> &str {
    text.trim_end_matches(['\n', '\r'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_parse_as_toml_or_string() {
        assert_eq!(parse_env_value("50"), Value::Integer(50));
        assert_eq!(parse_env_value("0.5"), Value::Float(0.5));
        assert_eq!(parse_env_value("true"), Value::Boolean(true));
        assert_eq!(parse_env_value("info"), Value::String("info".into()));
        assert_eq!(
            parse_env_value("/var/lib/batchd"),
            Value::String("/var/lib/batchd".into())
        );
        assert_eq!(
            parse_env_value("1\nother = 2"),
            Value::String("1\nother = 2".into())
        );
    }

    #[test]
    fn credential_wins_over_env_and_loses_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(API_KEY_CREDENTIAL), "from-credential\n").unwrap();
        let env = Environment::from_vars([
            ("CREDENTIALS_DIRECTORY", dir.path().to_str().unwrap()),
            (API_KEY_ENV, "from-env"),
        ]);
        let key = read_api_key(&env).unwrap();
        assert_eq!(key.expose(), Some("from-credential"));
    }

    #[test]
    fn env_key_used_without_credential_file() {
        let dir = tempfile::tempdir().unwrap();
        let env = Environment::from_vars([
            ("CREDENTIALS_DIRECTORY", dir.path().to_str().unwrap()),
            (API_KEY_ENV, "from-env\n"),
        ]);
        let key = read_api_key(&env).unwrap();
        assert_eq!(key.expose(), Some("from-env"));
    }
}
